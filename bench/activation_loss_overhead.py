"""What the activation loss costs: step time with the term on all sites (moe, experts,
mamba, layers) versus alpha = 0, on the same tiny student and the same batches, the
two settings interleaved step by step so machine noise hits both alike. Also prints
tokens/s of the tiny recipe's step and the peak RSS. Not a test: it prints ratios.

    python bench/activation_loss_overhead.py [--steps 20] [--batch 4] [--length 256]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activation_loss.term import ActivationLoss  # noqa: E402
from pipeline.recipe import ActivationLossSection, ModelSection  # noqa: E402
from pipeline.student import load_student, load_tokenizer  # noqa: E402

ALL_SITES = ["moe", "experts", "mamba", "layers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    base = load_student(section, tokenizer)
    models, penalties = {}, {}
    for name, alpha in (("off", 0.0), ("on", 1e-5)):
        model = copy.deepcopy(base).train()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        penalty = ActivationLoss(model, ActivationLossSection(alpha=alpha, sites=ALL_SITES))
        penalty.attach(model)
        models[name], penalties[name] = model, penalty
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(tokenizer), (args.batch, args.length), generator=generator)
               for _ in range(args.warmup + args.steps)]

    def step(name: str, ids: torch.Tensor, number: int) -> float:
        model, penalty, optimizer = models[name], penalties[name], optimizers[name]
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        term = penalty.term(number)
        if term is not None:
            loss = loss + term
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"off": [], "on": []}
    for number, ids in enumerate(batches):
        # Alternate which setting goes first, so neither always runs on a warmer cache.
        order = ("off", "on") if number % 2 == 0 else ("on", "off")
        for name in order:
            elapsed = step(name, ids, number)
            if number >= args.warmup:
                times[name].append(elapsed)

    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    ratios = [b / a for a, b in zip(times["off"], times["on"])]
    tokens = args.batch * args.length
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sites = len(penalties["on"].recorder.sites)
    print(f"tiny Jamba, batch {args.batch} x {args.length} tokens, {args.steps} interleaved steps, "
          f"{args.threads} threads, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    print(f"median step: alpha=0 {off:.3f} s, all {sites} sites {on:.3f} s")
    print(f"ratio (median step on / off): {on / off:.3f}x   "
          f"(median of per-step ratios {statistics.median(ratios):.3f}x)")
    print(f"tokens/s: alpha=0 {tokens / off:.0f}, activation loss on {tokens / on:.0f}")
    print(f"peak RSS: {peak_rss_mib:.0f} MiB (both models and optimizers in one process)")


if __name__ == "__main__":
    main()
