"""Teacher engines and the generate stage: completions come back per conversation in
order, finished items are cached and never regenerated (even after SIGKILL), an
unreachable server fails with one error naming the endpoint, bad recipe keys are named,
and the vLLM engine runs the stage end to end."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.recipe import load_recipe
from pipeline.engines import CachedEngine, EngineError, OpenAIEngine, Sampling

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(path, teacher, generate):
    import yaml

    path.write_text(yaml.safe_dump({"teacher": teacher, "generate": generate}))
    return path


def run_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ----------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def transformers_engine(teacher_dir):
    from pipeline.engines import TransformersEngine

    return TransformersEngine("teacher", batch_size=4, threads=1)


@pytest.mark.slow  # loading torch + the teacher takes ~45 s on a busy CPU
def test_completions_per_conversation_in_order_and_cached(tmp_path, transformers_engine):
    engine = CachedEngine(transformers_engine, tmp_path, chunk=2, progress=False)
    convs = [[{"role": "user", "content": "What is the capital of France? One word."}],
             [{"role": "user", "content": "Say hello."}],
             [{"role": "user", "content": "What is the capital of France? One word."}]]
    sampling = Sampling(max_tokens=8, n=2, temperature=0.7)
    first = engine.chat(convs, sampling)
    assert [len(c) for c in first] == [2, 2, 2]
    assert first[0] == first[2]  # same prompt, same key: generated once
    assert engine.misses == 2 and all(c.tokens > 0 and c.finish_reason in ("stop", "length") for cs in first for c in cs)
    again = CachedEngine(transformers_engine, tmp_path, progress=False)  # a new process would do this
    assert again.chat(convs, sampling) == first and again.misses == 0
    # another sampling setting is another key
    again.chat(convs[:1], sampling.replace(max_tokens=4))
    assert again.misses == 1


# ---------------------------------------------------------------------- openai
class FlakyServer(BaseHTTPRequestHandler):
    """A real HTTP server that answers 503 `failures` times, then a chat completion."""

    failures = 2
    calls = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if type(self).calls <= self.failures:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        choices = [{"index": i, "finish_reason": "stop", "message": {
            "role": "assistant", "content": None if body.get("tools") else f"echo {i}",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
            if body.get("tools") else None}} for i in range(body["n"])]
        data = json.dumps({"choices": choices, "usage": {"completion_tokens": 3 * body["n"]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_engine_retries_5xx_then_answers():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = OpenAIEngine(f"http://127.0.0.1:{server.server_port}/v1", "m", max_retries=3, backoff_s=0.01,
                              concurrency=1)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        out = engine.chat([[{"role": "user", "content": "hi"}]] * 2, Sampling(n=2), [None, tools])
        assert [c.text for c in out[0]] == ["echo 0", "echo 1"]
        assert out[1][0].text == '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
        assert FlakyServer.calls == 4
    finally:
        server.shutdown()


class RecordingServer(BaseHTTPRequestHandler):
    """Answers every chat completion and keeps the request bodies."""

    bodies: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        data = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": " 42."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_engine_asks_the_server_to_continue_an_answer_prefix():
    # RULER's items end with an open assistant turn (lm-eval's gen_prefix): vLLM's
    # server continues it only when told, else it would close it and open a new turn.
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = OpenAIEngine(f"http://127.0.0.1:{server.server_port}/v1", "m", concurrency=1)
        question = {"role": "user", "content": "What is the special magic number for fig?"}
        prefix = {"role": "assistant", "content": "The special magic number for fig is"}
        out = engine.chat([[question, prefix], [question]], Sampling(temperature=0.0))
        assert [c[0].text for c in out] == [" 42.", " 42."]
        continued, fresh = RecordingServer.bodies
        assert continued["messages"][-1] == prefix
        assert (continued["add_generation_prompt"], continued["continue_final_message"]) == (False, True)
        assert "continue_final_message" not in fresh and "add_generation_prompt" not in fresh
    finally:
        server.shutdown()


def test_unreachable_server_fails_with_one_error_naming_the_endpoint_and_keeps_finished_items(tmp_path):
    from pipeline.ports import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    engine = CachedEngine(OpenAIEngine(url, "m", max_retries=2, backoff_s=0.01), tmp_path, progress=False)
    done = engine.key([{"role": "user", "content": "done"}], None, Sampling())
    engine.entries[done] = [{"text": "cached", "tokens": 1, "finish_reason": "stop"}]
    with pytest.raises(EngineError, match=f"{url}/chat/completions failed after 3 attempts"):
        engine.chat([[{"role": "user", "content": "done"}], [{"role": "user", "content": "new"}]], Sampling())
    assert engine.chat([[{"role": "user", "content": "done"}]], Sampling())[0][0].text == "cached"


class GatedServer(FlakyServer):
    """Holds each request until `expect` are in flight, a moment longer in case more
    come, and records the most it saw at once."""

    failures = 0
    expect = 4
    cond = threading.Condition()
    active = peak = 0

    def do_POST(self):
        cls = type(self)
        with cls.cond:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
            cls.cond.notify_all()
            cls.cond.wait_for(lambda: cls.active >= cls.expect, timeout=10)
            cls.cond.wait_for(lambda: cls.active > cls.expect, timeout=0.5)  # time for one too many to show
        super().do_POST()
        with cls.cond:
            cls.active -= 1


def test_teacher_concurrency_is_the_number_of_requests_in_flight(tmp_path):
    from pipeline.engines import build_engine
    from pipeline.recipe import RecipeError

    server = ThreadingHTTPServer(("127.0.0.1", 0), GatedServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    teacher = {"engine": "openai", "model": "m", "base_url": f"http://127.0.0.1:{server.server_port}/v1",
               "concurrency": GatedServer.expect}
    try:
        for batch_size in (16, 2):  # neither a larger nor a smaller batch changes it
            GatedServer.peak = 0
            recipe = write_recipe(tmp_path / "r.yaml", {**teacher, "batch_size": batch_size}, {})
            engine = build_engine(load_recipe(recipe).teacher, tmp_path / f"cache{batch_size}")
            out = engine.chat([[{"role": "user", "content": f"q{i}"}] for i in range(8)], Sampling(n=1))
            assert [c[0].text for c in out] == ["echo 0"] * 8
            assert GatedServer.peak == GatedServer.expect, batch_size
    finally:
        server.shutdown()
    with pytest.raises(RecipeError, match="teacher.concurrency"):
        load_recipe(recipe, ["teacher.concurrency=0"])


# ---------------------------------------------------------------- recipe checks
def test_bad_pipeline_key_is_named_before_the_teacher_loads(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"engine": "transformers"},
                          {"steerability": {"count": 2, "bogus": 1}})
    proc = run_cli("generate", "steerability", recipe, "--out", tmp_path / "out")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "generate.steerability.bogus" in err
    assert not (tmp_path / "out").exists()


def test_every_shipped_recipe_gives_each_pipeline_the_values_it_wrote():
    """What `posttrain generate` does first (four_steps.validate_config): every
    recipe's generate.<pipeline> section passes, and each value the recipe writes is
    the value the pipeline's Config holds."""
    from synth_data.four_steps import validate_config

    sections = 0
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        for name, written in (load_recipe(path).raw.get("generate") or {}).items():
            held = validate_config(name, written, path).model_dump()
            assert {key: held[key] for key in written} == written, (path.name, name)
            sections += 1
    assert sections >= 6  # the tiny recipe alone configures all six pipelines


# ----------------------------------------------------------------- kill/resume
@pytest.mark.slow
def test_killed_generation_run_resumes_without_regenerating_finished_items(tmp_path, teacher_dir):
    cache = tmp_path / "cache"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"engine": "transformers", "threads": 1, "batch_size": 2, "cache_dir": str(cache)},
        {"steerability": {"count": 8, "conversations": 0, "n": 1, "max_tokens": 12}},
    )
    lines = cache / "completions.jsonl"
    proc = run_cli("generate", "steerability", recipe, "--out", tmp_path / "out")
    deadline = time.monotonic() + 240
    while not (lines.is_file() and lines.read_text().count("\n") >= 2):  # one chunk finished
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no completion was cached in time"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {json.loads(line)["key"] for line in lines.read_text().splitlines() if line.strip()}
    assert 2 <= len(finished) < 8, "the kill should land mid-run"

    proc = run_cli("generate", "steerability", recipe, "--out", tmp_path / "out")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["cache"] == {"hits": len(finished), "generated": 8 - len(finished)}
    keys = [json.loads(line)["key"] for line in lines.read_text().splitlines() if line.strip()]
    assert len(keys) == len(set(keys)) == 8 and finished <= set(keys)  # none regenerated, none lost
    assert summary["generated"] == 8 == summary["accepted"] + summary["rejected"]


# ------------------------------------------------------------------------ vLLM
@pytest.mark.slow
def test_vllm_engine_runs_the_generate_stage_end_to_end(tmp_path, teacher_dir):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"engine": "vllm", "cache_dir": str(tmp_path / "cache")},
        {"steerability": {"count": 2, "conversations": 1, "turns": 2, "n": 2, "max_tokens": 24}},
    )
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = run_cli("generate", "steerability", recipe, "--out", tmp_path / "out", env=env)
    out, err = proc.communicate(timeout=480)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["generated"] == 2 * 2 + 1 == summary["accepted"] + summary["rejected"]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["teacher"]["engine"] == "vllm"
    rows = [json.loads(line) for line in (tmp_path / "cache" / "completions.jsonl").read_text().splitlines()]
    texts = [c["text"] for row in rows for c in row["completions"]]
    assert sum(bool(t.strip()) for t in texts) >= len(texts) // 2  # the model really wrote text
