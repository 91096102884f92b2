"""`posttrain dpo RECIPE`: preference training (TRL DPO) of the SFT model.

Reads top to bottom: recipe -> off? pointer -> pairs -> SFT model -> reference ->
DPOTrainer (+ activation loss, sft/trainer.py) -> train -> save -> reports. The pairs are
`posttrain prefs`' pairs in TRL's conversational preference format; the DAG passes
review's data/prefs/review/reviewed.jsonl (accepted, or swapped by a reviewer). The
model is train's final/ folder:

  adapter       the recipe's student with that adapter loaded trainable: DPO continues
                the same adapter, so the result is again an adapter on the student
                (audit, eval, export and vLLM read it unchanged). The reference is the
                SFT model itself: TRL keeps a frozen copy of the adapter ("ref").
  full weights  policy and reference both load from the folder. With a `lora:`
                section DPO trains a new adapter on top (reference: adapter off);
                without one it is full DPO against a frozen copy.

The recipe's `dpo:` section is `trl.DPOConfig` fields plus our `enabled`. With
`dpo.enabled: false` (the default) nothing trains: final/ holds only a pointer to the
SFT folder (pipeline.student.resolve_model_folder follows it), so the stages after
this one always read outputs/dpo/final and turning DPO on is that one recipe line.
The activation loss, LoRA coverage and the first-step gradient check apply as in SFT.
Writes into the output folder:
  final/             the trained adapter or model (+ tokenizer), or the pointer
  dpo_metrics.json   reward margin and accuracy first/last, steps, pairs, runtime, and
                     the pairs dpo.max_length truncates or cuts to no answer (skipped)
  dpo_curve.json     one row per logging step (DVC plot data): margins, accuracies,
                     loss, activation loss
  dpo_curve.png      the margin and accuracy curves
  lora_coverage.json per target group: layers covered / present, trainable params
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.contract import DpoMetrics, Message, read_pairs, write_report
from pipeline.plotting import figure
from pipeline.recipe import Recipe, RecipeError, add_recipe_arguments, load_recipe
from pipeline.records import InputError, write_json

log = logging.getLogger(__name__)

CURVE_KEYS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "loss")


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--sft", default="outputs/sft/final", help="the SFT model or adapter folder")
    parser.add_argument("--pairs", default="data/prefs/pairs.jsonl",
                        help="preference pairs: prefs' pairs.jsonl, or review pull's reviewed.jsonl of them")
    parser.add_argument("--output-dir", help="default: dpo.output_dir, else outputs/dpo")
    # The deepspeed launcher passes --local_rank to every process.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def main(args) -> int:
    from pipeline.student import check_model_folder

    recipe = load_recipe(args.recipe, args.overrides)
    output_dir = Path(args.output_dir or recipe.dpo.get("output_dir") or "outputs/dpo")
    check_model_folder(args.sft, flag="--sft", trust_remote_code=recipe.model.trust_remote_code)
    if not recipe.dpo_enabled:
        write_pointer(Path(args.sft), output_dir)
        return 0
    deepspeed = recipe.dpo.get("deepspeed")
    if isinstance(deepspeed, str) and not Path(deepspeed).is_file():
        raise RecipeError(f"recipe {recipe.path}: dpo.deepspeed: {deepspeed}: no such file")
    pairs = load_pairs(Path(args.pairs))
    train(recipe, Path(args.sft), pairs, output_dir)
    return 0


# ------------------------------------------------------------------ DPO off
def write_pointer(sft_dir: Path, output_dir: Path) -> None:
    from sft.trainer import write_pointer as point

    target = point(sft_dir, output_dir / "final", "dpo.enabled is false", "--sft")
    write_report(output_dir / "dpo_metrics.json", DpoMetrics(enabled=False, model=str(target)))
    write_json(output_dir / "dpo_curve.json", [])
    write_json(output_dir / "lora_coverage.json", {"lora": False})
    plot_curve([], output_dir / "dpo_curve.png", note="DPO is off (dpo.enabled: false)")
    log.info("dpo.enabled is false: %s points to %s", output_dir / "final", target)


# --------------------------------------------------------------------- data
def load_pairs(path: Path):
    """pairs.jsonl -> a datasets.Dataset of id / prompt / chosen / rejected (+ tools as
    JSON text, which TRL parses back: tool schemas differ per record, one Arrow type
    cannot hold them all)."""
    from datasets import Dataset

    if not path.is_file():
        raise InputError(f"--pairs {path}: no such file (run posttrain prefs first)")
    rows = []
    for pair in read_pairs(path):
        rows.append({"id": pair.id,
                     "prompt": [clean_turn(t) for t in pair.prompt],
                     "chosen": [clean_turn(t) for t in pair.chosen],
                     "rejected": [clean_turn(t) for t in pair.rejected],
                     "tools": json.dumps(pair.tools) if pair.tools else None})
    if not rows:
        raise InputError(f"--pairs {path}: no pairs (prefs found no prompt with a passing and a failing "
                         "response, or reviewers rejected every pair; see prefs_stats.json, review_stats.json)")
    return Dataset.from_list(rows)


def clean_turn(turn: Message) -> dict[str, Any]:
    """A turn with the keys the chat template reads, the same keys and types in every
    turn (tool-call arguments as JSON text, OpenAI style) so Arrow can type them."""
    calls = None
    if turn.tool_calls:
        calls = []
        for call in turn.tool_calls:
            arguments = call["function"]["arguments"]
            calls.append({"type": "function", "function": {
                "name": call["function"]["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    return {"role": turn.role, "content": turn.content or "", "tool_calls": calls}


# ------------------------------------------------------------------- config
def dpo_config(recipe: Recipe, output_dir: Path):
    from trl import DPOConfig

    from sft.trainer import training_args

    return training_args(DPOConfig, recipe, "dpo", output_dir,
                         defaults={"logging_steps": 1, "dataset_num_proc": None, "gradient_checkpointing": False})


# ---------------------------------------------------------------- max_length
def fit_pairs(prepared, pairs, args, recipe: Recipe):
    """TRL's tokenised pairs (`prepared`: prompt_ids, chosen_ids, rejected_ids) under
    dpo.max_length, counted: TRL's collator cuts each prompt + answer to max_length
    (truncation_mode) and its preparation drops, without a word, a pair whose prompt
    alone fills max_length. Both are counted here, and a pair is skipped when either
    answer keeps no token (sft/trainer.py's fit_to_max_length). Returns (prepared
    without the skipped pairs, report)."""
    from sft.trainer import fit_to_max_length

    limit = args.max_length
    # Token counts per pair id: prompt, chosen answer, rejected answer.
    sizes = {i: (len(p), len(c), len(r)) for i, p, c, r in zip(
        prepared["id"], prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])}

    def answer_left(prompt, answer):
        if args.truncation_mode == "keep_end":
            return min(answer, limit)
        return min(answer, max(0, limit - prompt))

    def items():
        for pair_id in pairs["id"]:
            if pair_id not in sizes:  # dropped by TRL: the prompt alone is max_length or longer
                yield pair_id, None, 0
                continue
            prompt, chosen, rejected = sizes[pair_id]
            left = min(answer_left(prompt, chosen), answer_left(prompt, rejected)) if limit else None
            yield pair_id, prompt + max(chosen, rejected), left

    keep, report = fit_to_max_length(items(), limit, recipe.data.on_truncated, "--pairs")
    kept = {pair_id for pair_id, k in zip(pairs["id"], keep) if k}
    return prepared.select([i for i, pair_id in enumerate(prepared["id"]) if pair_id in kept]), report


# -------------------------------------------------------------------- train
def train(recipe: Recipe, sft_dir: Path, pairs, output_dir: Path) -> dict[str, Any]:
    from trl import DPOTrainer

    from pipeline.student import load_tokenizer, mamba_path, resolve_model_folder
    from sft.trainer import build_trainer, finish, load_policy, save

    sft_dir = resolve_model_folder(sft_dir, "--sft")
    args = dpo_config(recipe, output_dir)
    tokenizer = load_tokenizer(recipe.model)
    policy, reference, peft_config, coverage, mode = load_policy(recipe, sft_dir, tokenizer)
    plugin = getattr(args, "deepspeed_plugin", None)
    if (coverage is not None and args.gradient_checkpointing and recipe.activation_loss.alpha > 0
            and plugin is not None and plugin.zero_stage == 3):
        # TRL switches LoRA + ZeRO-3 + checkpointing to reentrant checkpointing, under
        # which the activation loss silently adds no gradient.
        raise RecipeError(f"recipe {recipe.path}: dpo.gradient_checkpointing: LoRA under ZeRO-3 makes TRL "
                          "use reentrant checkpointing, which drops the activation loss's gradient; turn "
                          "checkpointing off or use ZeRO-2")

    trainer = build_trainer(
        DPOTrainer, recipe, policy, coverage,
        ref_model=reference,
        args=args,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train_dataset, cut = fit_pairs(trainer.train_dataset, pairs, args, recipe)
    if len(trainer.train_dataset) == 0:
        raise InputError(f"--pairs: every pair is cut by dpo.max_length {args.max_length} "
                         f"({cut['skipped'][0]['reason']}); raise dpo.max_length")
    started = time.perf_counter()
    result = trainer.train()
    runtime = time.perf_counter() - started

    # ----------------------------------------------------------------- save
    final_dir = output_dir / "final"
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        # TRL's frozen copy of the SFT adapter: not part of the result.
        model.delete_adapter("ref")
    save(trainer, tokenizer, final_dir)
    metrics: dict[str, Any] = dict(result.metrics)
    if trainer.is_world_process_zero():
        penalty = trainer.activation_loss
        rows = [r for r in trainer.state.log_history if "rewards/margins" in r and "loss" in r]
        curve = [{"step": r["step"], **{k: r[k] for k in CURVE_KEYS if k in r},
                  **{k: v for k, v in r.items() if k.startswith("activation")}} for r in rows]
        write_json(output_dir / "dpo_curve.json", curve)
        plot_curve(curve, output_dir / "dpo_curve.png")
        first, last = (curve[0], curve[-1]) if curve else ({}, {})
        metrics.update({
            "enabled": True,
            "sft_model": str(sft_dir),
            "mode": mode,
            "mamba_path": mamba_path(model),
            "pairs": len(trainer.train_dataset),
            # Pairs longer than dpo.max_length, and of them those with no token left of
            # the chosen or the rejected answer: skipped.
            "truncation": {"max_length": args.max_length, "on_truncated": recipe.data.on_truncated,
                           "truncated": cut["truncated"], "answer_cut": cut["answer_cut"],
                           "skipped": len(cut["skipped"]), "examples": cut["skipped"][:5]},
            "global_step": trainer.state.global_step,
            "train_seconds": round(runtime, 1),
            "margin_first": first.get("rewards/margins"),
            "margin_last": last.get("rewards/margins"),
            "accuracy_first": first.get("rewards/accuracies"),
            "accuracy_last": last.get("rewards/accuracies"),
            "loss_first": first.get("loss"),
            "loss_last": last.get("loss"),
            "beta": args.beta,
        })
        if penalty is not None:
            metrics["activation_loss"] = penalty.summary()
        write_json(output_dir / "lora_coverage.json", coverage or {"lora": False})
        write_report(output_dir / "dpo_metrics.json", DpoMetrics, metrics)
        log.info("DPO %d steps on %d pairs, margin %s -> %s, accuracy %s -> %s; saved %s",
                 metrics["global_step"], metrics["pairs"], metrics["margin_first"], metrics["margin_last"],
                 metrics["accuracy_first"], metrics["accuracy_last"], final_dir)
    finish(trainer)
    return metrics


def plot_curve(curve: list[dict], path: Path, note: str | None = None) -> None:
    with figure(path, (6, 5), rows=2, dpi=110, sharex=True) as (_, (top, bottom)):
        steps = [r["step"] for r in curve]
        top.plot(steps, [r.get("rewards/margins") for r in curve], marker="o")
        top.set_ylabel("reward margin")
        top.axhline(0, color="grey", linewidth=0.5)
        bottom.plot(steps, [r.get("rewards/accuracies") for r in curve], marker="o", color="tab:green")
        bottom.set_ylabel("reward accuracy")
        bottom.set_xlabel("step")
        bottom.set_ylim(-0.05, 1.05)
        top.set_title(note or "DPO: chosen vs rejected implicit reward")
