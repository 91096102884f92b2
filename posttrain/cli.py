"""`posttrain`: one subcommand per stage. Each entry names the module that implements
it; the module exposes `add_arguments(parser)` and `main(args) -> int | None`. Modules
are imported only when their subcommand runs, so `posttrain --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from pipeline.records import InputError

# name -> (module, one-line help). The order is the DAG's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "teacher": ("posttrain.teacher", "materialise the packaged teacher model (SmolLM2-135M-Instruct)"),
    "generate": ("synth_data.generate", "synthetic data: run one pipeline's four steps with the teacher"),
    "dedup": ("synth_data.dedup", "deduplicate + decontaminate all pipelines' accepted records"),
    "review": ("review.cli", "human review in Argilla: serve / stop / status / push / pull"),
    "prefs": ("synth_data.prefs", "preference pairs ranked by code: a passing and a failing response per prompt"),
    "mix": ("sft.mix", "build the SFT mix (conversational / skill / long-context) + train/eval split"),
    "train": ("sft.train", "supervised fine-tuning of the student (full or LoRA, + activation loss)"),
    "dpo": ("sft.dpo", "preference training (TRL DPO) of the SFT model, + activation loss; off: a pointer"),
    "grpo-prompts": ("synth_data.grpo_prompts", "GRPO prompts from each pipeline's prompt step, decontaminated"),
    "grpo": ("sft.grpo", "RL on verifier rewards (TRL GRPO) of the DPO/SFT model, + activation loss; off: a pointer"),
    "audit": ("activation_loss.fp16_audit", "FP16 audit: per-layer activation maxima, fp16 vs fp32 forward"),
    "eval": ("evals.evaluate", "score a model (base, folder or adapter): retention, tool use, IFEval, held-out loss"),
    "gate": ("evals.gate", "before vs after report; block export if the model got worse or overflows FP16"),
    "export": ("sft.export", "export adapter / merged / vllm profiles, verified by reload"),
    "plots": ("posttrain.plots", "PNG plots: loss curve, activation maxima, acceptance per pipeline"),
    # Not stages: plan sizes a recipe before anything runs; summary reads the reports
    # above and prints what a person checks first.
    "plan": ("plan.dry_run", "dry run: validate a whole recipe and size it (counts, steps, memory, time), offline"),
    "summary": ("posttrain.summary", "print the last run's numbers in ~30 lines and where its files are"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training pipeline for hybrid Transformer-Mamba-MoE models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback behind an error")
    # The deepspeed launcher puts --local_rank before the subcommand; ranks come from
    # the environment (LOCAL_RANK), so the value is not used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        # Only the module of the command being run is imported.
        if name in argv:
            importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except InputError as exc:  # bad input (recipe, file, record, model folder): one line
        if args.verbose:
            traceback.print_exc()
        print(f"posttrain {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def one_line(exc: Exception) -> str:
    """A multi-line error (a recipe with several bad keys) as one line."""
    head, *rest = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    return head + (" " + "; ".join(rest) if rest else "")


if __name__ == "__main__":
    sys.exit(main())
