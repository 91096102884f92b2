"""`posttrain train RECIPE`: supervised fine-tuning of the hybrid student with TRL.

Reads top to bottom: recipe -> checks -> data -> tokenizer -> model -> LoRA ->
SFTTrainer (+ activation loss, sft/trainer.py) -> train -> save -> reports. Full fine-tuning when the
recipe has no `lora:` section. Writes into the output folder:
  final/                 the trained model or adapter (+ tokenizer)
  train_metrics.json     final loss, steps, runtime, tokens/s, activation-loss summary,
                         the records sft.max_length truncates or cuts to no answer
  loss_curve.json        one row per logging step (DVC plot data)
  lora_coverage.json     per target group: layers covered / present, trainable params
  activation_stats.json  per-layer max |activation| per site kind (activation loss on)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.contract import (
    ActivationStats,
    Conversation,
    LossCurve,
    TrainMetrics,
    read_conversations,
    write_report,
)
from pipeline.recipe import Recipe, RecipeError, add_recipe_arguments, check_paths, load_recipe
from pipeline.records import InputError, write_json

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--output-dir", help="default: sft.output_dir, else outputs/sft")
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None,
        help="resume from a checkpoint folder, or the latest one in the output folder",
    )
    # The deepspeed launcher passes --local_rank to every process.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    output_dir = Path(args.output_dir or recipe.sft.get("output_dir") or "outputs/sft")
    check_recipe(recipe)
    train(recipe, output_dir, resume=args.resume)
    return 0


def check_recipe(recipe: Recipe) -> None:
    """Everything that can be known wrong before any model is built or data read."""
    check_paths(recipe, ["data.train", "data.eval"])
    if not recipe.data.train:
        raise RecipeError(f"recipe {recipe.path}: data.train: no training files given")
    deepspeed = recipe.sft.get("deepspeed")
    if isinstance(deepspeed, str) and not Path(deepspeed).is_file():
        raise RecipeError(f"recipe {recipe.path}: sft.deepspeed: {deepspeed}: no such file")
    for key in ("train", "eval"):
        empty = [f for f in getattr(recipe.data, key) if not f.endswith(".parquet")
                 and not Path(f).read_text(encoding="utf-8").strip()]
        if empty:
            raise InputError(f"data.{key}: {', '.join(empty)}: no records (empty file)")
        _, bad = load_conversations(getattr(recipe.data, key))
        if bad and recipe.data.on_bad_record == "error":
            shown = "; ".join(f"{where}: {problem}" for where, problem in bad[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise InputError(f"data.{key}: {len(bad)} record(s) cannot train: {shown}{more} "
                             "(fix them, or set data.on_bad_record: skip)")
    if recipe.model.tiny is None:
        name = recipe.model.name_or_path
        if not name:
            raise RecipeError(f"recipe {recipe.path}: model: give model.name_or_path or model.tiny")
        try:  # a config is cheap to read: a wrong path fails here, not after data loading
            student_config(recipe)
        except (OSError, ValueError) as exc:
            raise RecipeError(
                f"recipe {recipe.path}: model.name_or_path: {name}: not a model folder and "
                f"not loadable from the hub ({str(exc).splitlines()[0]})"
            ) from None
    if recipe.sft.get("chat_template_path"):
        raise RecipeError(f"recipe {recipe.path}: sft.chat_template_path: use model.chat_template "
                          "(the template is chosen, and saved with the model, by the tokenizer loader)")
    if recipe.sft.get("packing") or recipe.sft.get("padding_free"):
        from pipeline.mamba_packing import packing_supported
        from pipeline.student import has_mamba_layers

        config = None if recipe.model.tiny is not None else student_config(recipe)
        model_type = "jamba" if config is None else config.model_type
        reason = packing_supported(model_type) if config is None or has_mamba_layers(config) else None
        if reason is not None:
            key = "sft.packing" if recipe.sft.get("packing") else "sft.padding_free"
            raise RecipeError(
                f"recipe {recipe.path}: {key}: refused: {reason}. Packed sequences share one "
                "row, and without boundaries the Mamba state runs from one conversation into "
                "the next. Use padding (packing: false) for this model."
            )


def load_conversations(files: list[str], limit: int | None = None) -> tuple[list[Conversation], list[tuple[str, str]]]:
    """(the first `limit` conversations that can train, (where, problem) for every
    record that cannot): the contract's Conversation, JSONL or parquet; `where` names
    the file, line (or row) and record id."""
    good: list[Conversation] = []
    bad: list[tuple[str, str]] = []
    for name in files:
        good += read_conversations(name, bad=bad)
    return (good if limit is None else good[:limit]), bad


def student_config(recipe: Recipe):
    from transformers import AutoConfig

    from pipeline.model_paths import resolve_model_path

    return AutoConfig.from_pretrained(
        resolve_model_path(recipe.model.name_or_path),
        trust_remote_code=recipe.model.trust_remote_code,
    )


def sft_config(recipe: Recipe, output_dir: Path):
    from trl import SFTConfig

    from sft.trainer import training_args

    return training_args(
        SFTConfig, recipe, "sft", output_dir,
        defaults={"logging_steps": 5, "dataset_num_proc": None},
        # The masks come with the tokenised records (tokenize_conversations), computed
        # from the student's own template; TRL's switch would need {% generation %}
        # markers in that template and refuses tokenised data, so it stays off.
        forced={"assistant_only_loss": False},
    )


def tokenize_conversations(conversations: list[Conversation], tokenizer, recipe: Recipe, name: str = "train"):
    """Records -> input_ids in the student's own chat template, plus assistant_masks
    (from which TRL builds labels: -100 outside the assistant turns) and the record's
    id. Returns (dataset, skipped records as {"id", "reason"}). A record the template
    cannot render faithfully fails the run, naming it, or is skipped when
    data.on_bad_record is `skip`."""
    from pipeline.chat_template import BadRecord, encode_conversation, template_source, turn_end

    if not conversations:
        return None, []
    marker = turn_end(tokenizer)
    rows, skipped = {"id": [], "input_ids": [], "assistant_masks": []}, []
    for index, record in enumerate(conversations):
        label = record.id or f"#{index}"
        try:
            encoded = encode_conversation(tokenizer, record.turns(), record.tools, marker)
        except BadRecord as exc:
            if recipe.data.on_bad_record == "error":
                raise RecipeError(
                    f"{name} record {label} (data.{name}): {exc}; template: "
                    f"{template_source(tokenizer)}. Set data.on_bad_record: skip to leave such "
                    "records out, or model.chat_template to train in another template") from None
            skipped.append({"id": label, "reason": str(exc)})
            continue
        rows["id"].append(label)
        rows["input_ids"].append(encoded["input_ids"])
        rows["assistant_masks"].append(encoded["assistant_masks"])
    if skipped:
        log.warning("%s: skipped %d of %d records the chat template cannot render (%s): %s",
                    name, len(skipped), len(conversations), template_source(tokenizer), skipped[0]["reason"])
    if not rows["input_ids"]:
        raise RecipeError(f"data.{name}: the chat template ({template_source(tokenizer)}) "
                          f"renders none of the {len(conversations)} records: {skipped[0]['reason']}")
    from datasets import Dataset

    return Dataset.from_dict(rows), skipped


def fit_records(dataset, args, recipe: Recipe, name: str = "train"):
    """The tokenised records as SFTTrainer takes them, under sft.max_length: each record
    longer than it is counted, and cut here (by sft.truncation_mode, so TRL cuts nothing
    more) or skipped, as sft/trainer.py's fit_to_max_length decides. Returns (dataset,
    report)."""
    from sft.trainer import fit_to_max_length

    if dataset is None:
        return None, {"truncated": 0, "answer_cut": 0, "skipped": []}
    limit = args.max_length
    window = slice(None) if limit is None else \
        slice(-limit, None) if args.truncation_mode == "keep_end" else slice(None, limit)
    keep, report = fit_to_max_length(
        ((row["id"], len(row["input_ids"]), sum(row["assistant_masks"][window])) for row in dataset),
        limit, recipe.data.on_truncated, f"data.{name}")
    dataset = dataset.select([i for i, kept in enumerate(keep) if kept])
    if report["truncated"]:
        dataset = dataset.map(lambda row: {"input_ids": row["input_ids"][window],
                                           "assistant_masks": row["assistant_masks"][window]})
    # Without assistant-only loss every token trains: TRL would still mask by the
    # assistant_masks column if it were there.
    unused = ["id"] if recipe.sft.get("assistant_only_loss", True) else ["id", "assistant_masks"]
    return dataset.remove_columns(unused), report


def train(recipe: Recipe, output_dir: Path, resume: str | None = None) -> dict[str, Any]:
    from trl import SFTTrainer

    from pipeline.student import load_student, load_tokenizer, mamba_path
    from sft.trainer import build_trainer, finish, save

    # ------------------------------------------------------------------ data
    train_set, unfit_train = load_conversations(recipe.data.train, recipe.data.max_train_samples)
    eval_set, unfit_eval = load_conversations(recipe.data.eval, recipe.data.max_eval_samples)
    unfit = {"train": unfit_train, "eval": unfit_eval}
    for key, bad in unfit.items():
        for where, problem in bad:  # only with data.on_bad_record: skip (check_recipe)
            log.warning("data.%s: skipping %s: %s", key, where, problem)
    if len(train_set) == 0:
        raise InputError(f"data.train: {', '.join(recipe.data.train)}: no record left to train on")

    # ------------------------------------------------------- tokenizer, model
    # The training arguments come first: under ZeRO-3 they make from_pretrained load
    # the weights sharded instead of whole on every rank.
    args = sft_config(recipe, output_dir)
    tokenizer = load_tokenizer(recipe.model)
    model = load_student(recipe.model, tokenizer)
    train_set, skipped = tokenize_conversations(train_set, tokenizer, recipe, "train")
    eval_set, eval_skipped = tokenize_conversations(eval_set, tokenizer, recipe, "eval")
    train_set, cut = fit_records(train_set, args, recipe, "train")
    eval_set, eval_cut = fit_records(eval_set, args, recipe, "eval")
    if len(train_set) == 0:
        raise InputError(f"data.train: every record is longer than sft.max_length {args.max_length} "
                         f"({cut['skipped'][0]['reason']}); raise sft.max_length")
    if eval_set is not None and len(eval_set) == 0:
        # Every eval record was cut away (counted in the truncation report). TRL cannot
        # prepare an empty split, and there is nothing to evaluate on.
        reason = f"every record is longer than sft.max_length {args.max_length} ({eval_cut['skipped'][0]['reason']})"
        if args.eval_strategy != "no":
            raise InputError(f"data.eval: {reason}; raise sft.max_length or set sft.eval_strategy: no")
        log.warning("data.eval: %s: no eval split", reason)
        eval_set = None

    # ------------------------------------------------------------------ LoRA
    peft_config, coverage = None, None
    if recipe.lora is not None:
        from sft.lora import build_lora_config

        peft_config, coverage = build_lora_config(recipe.lora, model)

    # ---------------------------------------------------------------- train
    trainer = build_trainer(
        SFTTrainer, recipe, model, coverage,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    result = trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)

    # ----------------------------------------------------------------- save
    final_dir = output_dir / "final"
    save(trainer, tokenizer, final_dir)
    metrics = dict(result.metrics)
    if trainer.is_world_process_zero():
        penalty = trainer.activation_loss
        history = [r for r in trainer.state.log_history if "loss" in r]
        write_report(output_dir / "loss_curve.json", LossCurve, [
            {"step": r["step"], "loss": r["loss"], **{k: v for k, v in r.items() if k.startswith("activation")}}
            for r in history
        ])
        metrics.update({
            "final_loss": history[-1]["loss"] if history else None,
            "first_loss": history[0]["loss"] if history else None,
            "global_step": trainer.state.global_step,
            "mode": "lora" if peft_config is not None else "full",
            "mamba_path": mamba_path(model),
            "train_samples": len(train_set),
            "chat_template": tokenizer.chat_template_source,
            # Records that cannot train (data.on_bad_record: skip): a wrong shape, or
            # what the chat template cannot render.
            "skipped_records": {"train": len(unfit["train"]) + len(skipped),
                                "eval": len(unfit["eval"]) + len(eval_skipped),
                                "examples": ([{"id": w, "reason": p} for w, p in unfit["train"] + unfit["eval"]]
                                             + skipped + eval_skipped)[:5]},
            # Records longer than sft.max_length, and of them those with no answer token
            # left: skipped (and so, with data.on_truncated: skip, every truncated one).
            "truncation": {"max_length": args.max_length, "on_truncated": recipe.data.on_truncated,
                           **{key: {"truncated": c["truncated"], "answer_cut": c["answer_cut"],
                                    "skipped": len(c["skipped"])} for key, c in (("train", cut), ("eval", eval_cut))},
                           "examples": (cut["skipped"] + eval_cut["skipped"])[:5]},
        })
        if torch.cuda.is_available():
            metrics["cuda_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        # Both reports are written on every run (DVC declares them), empty when off.
        write_json(output_dir / "lora_coverage.json", coverage or {"lora": False})
        if penalty is not None:
            metrics["activation_loss"] = penalty.summary()
        write_report(output_dir / "activation_stats.json", ActivationStats, penalty.layer_stats() if penalty else {})
        write_report(output_dir / "train_metrics.json", TrainMetrics, metrics)
        log.info("trained %d steps, loss %s -> %s; saved %s", metrics["global_step"],
                 metrics["first_loss"], metrics["final_loss"], final_dir)
    finish(trainer)
    return metrics
