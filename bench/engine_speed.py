"""Engine speed: the same prompts through the `vllm` and `transformers` engines,
interleaved in rounds so that load from other processes on a shared machine hits both
alike; prints generated tokens/s for each and their ratio. With --acceptance it also
runs steerability and tool_use on the default teacher (vllm) and prints each
pipeline's acceptance rate and top rejection reasons.

    .venv/bin/python bench/engine_speed.py [--prompts 64] [--max-tokens 64] [--acceptance]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="0 = skip the speed part")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (transformers)")
    parser.add_argument("--acceptance", action="store_true")
    parser.add_argument("--count", type=int, default=32, help="prompts per pipeline for --acceptance")
    args = parser.parse_args()

    from synth_data import steerability
    from pipeline.engines import Sampling, TransformersEngine, VLLMEngine

    vllm_engine = VLLMEngine("teacher")
    if args.prompts > 0:
        cfg = steerability.Config(count=args.prompts, conversations=0)
        prompts = steerability.sample_prompts(cfg, random.Random(0))
        convs = [[{"role": "user", "content": steerability._user_turn(p["requests"][0], p["constraints"])}]
                 for p in prompts]
        sampling = Sampling(temperature=0.7, max_tokens=args.max_tokens)
        engines = {"vllm": vllm_engine,
                   "transformers": TransformersEngine("teacher", args.batch_size, threads=args.threads)}
        totals = {name: {"tokens": 0, "seconds": 0.0} for name in engines}
        size = -(-len(convs) // args.rounds)
        for r in range(args.rounds):
            chunk = convs[r * size : (r + 1) * size]
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                started = time.perf_counter()
                outs = engines[name].chat(chunk, sampling.replace(seed=r))
                totals[name]["seconds"] += time.perf_counter() - started
                totals[name]["tokens"] += sum(c.tokens for cs in outs for c in cs)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {t['tokens'] / t['seconds']:.0f} tok/s" for n, t in totals.items()), flush=True)
        speed = {n: t["tokens"] / t["seconds"] for n, t in totals.items()}
        print(json.dumps({"prompts": len(convs), "max_tokens": args.max_tokens,
                          "tokens_per_s": {n: round(s, 1) for n, s in speed.items()},
                          "ratio_vllm_over_transformers": round(speed["vllm"] / speed["transformers"], 2)},
                         indent=2), flush=True)

    if args.acceptance:
        from synth_data import four_steps, tool_use

        configs = ((tool_use, tool_use.Config(count=args.count, n=1)),
                   (steerability, steerability.Config(count=args.count, conversations=max(1, args.count // 4),
                                                      n=2, max_tokens=128)))
        with tempfile.TemporaryDirectory() as tmp:
            for module, pcfg in configs:
                stats = four_steps.run(module, pcfg, vllm_engine, Path(tmp) / module.NAME)
                top = list(stats["reject_reasons"].items())[:5]
                print(json.dumps({"pipeline": module.NAME, "generated": stats["generated"],
                                  "acceptance_rate": stats["acceptance_rate"], "top_reject_reasons": top}),
                      flush=True)


if __name__ == "__main__":  # vLLM may spawn processes that re-import this module
    main()
