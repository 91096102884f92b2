"""Everything that needs a GPU, in one run of about 10 minutes on one H100: one line
per check, with its numbers. `make gpu-check`; on a machine without CUDA it prints one
line saying so and exits 0.

  packing       exact packing on the mamba-ssm / causal-conv1d kernel path: a packed
                row against each conversation alone (tiny Jamba, fp32), max |logit diff|
  lora_block    tests/test_gpu.py's LoRA run on one Jamba-Mini-shaped block (13.2B
                parameters, bf16, activation loss, export), its time and peak memory
  vllm_int8     the tiny Jamba trained a few LoRA steps and exported (posttrain train /
                export), its vLLM adapter served by vLLM with experts_int8 against
                transformers on the same prompt: max |logprob diff|, greedy agreement
  eval_speed    bench/eval_speed.py: vLLM against transformers on eval prompts

Needs the `gpu` extra (mamba-ssm, causal-conv1d, vllm) and the packaged teacher.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the chat fixtures the GPU tests train on


def run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Each check's heavy part in its own process, as DVC runs stages: the GPU starts empty."""
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------ checks
def check_packing() -> str:
    import torch
    from transformers import JambaConfig, JambaForCausalLM

    from pipeline.mamba_packing import enable_packing
    from pipeline.student import TINY_JAMBA, mamba_path

    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig(vocab_size=1000, **TINY_JAMBA)).cuda().eval()
    assert enable_packing(model) == "exact"
    lengths = [37, 120, 64]
    seqs = [torch.randint(0, 1000, (n,), device="cuda") for n in lengths]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
        positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
        packed = model(input_ids=torch.cat(seqs)[None], position_ids=positions, use_cache=False).logits[0]
    diff = (packed - alone).abs().max().item()
    assert diff < 1e-4, diff
    return f"path {mamba_path(model)}, {len(lengths)} conversations in one row, max |logit diff| {diff:.2e}"


def check_lora_block() -> str:
    started = time.monotonic()
    test = "tests/test_gpu.py::test_jamba_mini_lora_recipe_trains_exports_on_one_gpu"
    done = run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu", test], 480)
    assert done.returncode == 0, done.stdout[-2000:]
    peak = re.search(r'"cuda_peak_memory_gib": ([\d.]+)', done.stdout)
    runtime = re.search(r'"train_runtime": ([\d.]+)', done.stdout)
    return (f"8 LoRA steps + export in {time.monotonic() - started:.0f} s "
            f"(train {runtime.group(1) if runtime else '?'} s), peak {peak.group(1) if peak else '?'} GiB")


def check_vllm_int8(work: Path) -> str:
    import torch
    import yaml
    from fixtures_chat import write_chat_data

    # Train a few steps of the tiny recipe on the chat fixtures, then export it.
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    write_chat_data(work / "data")
    recipe["data"] = {"train": [str(work / "data" / "train.jsonl")], "eval": [str(work / "data" / "eval.jsonl")]}
    recipe["sft"].update(max_steps=4, output_dir=str(work / "sft"))
    recipe["export"] = {"profiles": ["vllm"]}
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for args in (["train", str(path)],
                 ["export", str(path), "--model", str(work / "sft" / "final"), "--out", str(work / "export"),
                  "--report", str(work / "export_report.json")]):
        done = run([sys.executable, "-m", "posttrain.cli", *args], 240)
        assert done.returncode == 0, done.stderr[-2000:]
    base, adapter = work / "export" / "base", work / "export" / "vllm"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = "The capital of France is Paris. The capital of Italy is"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda(),
                                      adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device="cuda"), use_cache=False).logits[0].float()
    reference = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0]
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    llm = LLM(str(base), quantization="experts_int8", dtype="bfloat16", enable_lora=True, max_lora_rank=rank,
              max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0),
                       lora_request=LoRARequest("tiny", 1, str(adapter)))[0]
    served = torch.tensor([next(iter(p.values())).logprob if len(p) == 1 else p[t].logprob
                           for p, t in zip(out.prompt_logprobs[1:], ids[1:])], device="cuda")
    diff = (served - reference).abs().max().item()
    greedy = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=8, do_sample=False)[0, len(ids):]
    agree = sum(int(a == b) for a, b in zip(greedy.tolist(), out.outputs[0].token_ids))
    return (f"experts_int8 + LoRA r{rank}: max |prompt logprob diff| vs transformers bf16 {diff:.3f} "
            f"over {len(ids) - 1} tokens, greedy tokens equal {agree}/8")


def check_eval_speed() -> str:
    done = run([sys.executable, "bench/eval_speed.py", "--items", "16", "--max-tokens", "32", "--rounds", "1"], 420)
    assert done.returncode == 0, done.stderr[-2000:]
    rates = [line.split(":")[-1].strip() for line in done.stdout.splitlines() if "vllm / transformers" in line]
    return f"vLLM / transformers tokens/s at 1K, 2K: {', '.join(rates)}"


def main() -> int:
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("gpu-check: skipped: no CUDA GPU on this machine")
        return 0
    checks = {"packing": check_packing, "lora_block": check_lora_block,
              "vllm_int8": check_vllm_int8, "eval_speed": check_eval_speed}
    failed = 0
    print(f"gpu-check on {torch.cuda.get_device_name(0)}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name, check in checks.items():
            started = time.monotonic()
            try:
                line = check(Path(work)) if name == "vllm_int8" else check()
                print(f"ok    {name:<11} {line} [{time.monotonic() - started:.0f} s]", flush=True)
            except Exception as exc:  # one failing check must not hide the others' numbers
                failed += 1
                message = " ".join(str(exc).split())[-300:]
                print(f"FAIL  {name:<11} {type(exc).__name__}: {message} [{time.monotonic() - started:.0f} s]",
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
