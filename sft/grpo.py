"""`posttrain grpo RECIPE`: RL on verifier rewards (TRL GRPO) of the model after DPO.

Reads top to bottom: recipe -> off? pointer -> prompts -> model -> rewards ->
GRPOTrainer (+ activation loss, sft/trainer.py) -> train -> save -> reports. The model
is dpo's final/ (itself a pointer to SFT's when DPO is off); the prompts are
`posttrain grpo-prompts`' data/grpo/prompts.jsonl, each with what its pipeline's
validator needs. The rewards are those validators (synth_data/rewards.py): the code
that accepts or rejects the SFT records scores the policy's answers.

The recipe's `grpo:` section is `trl.GRPOConfig` fields plus our `enabled`, `rewards`
(which, in order), `partial_credit` (tool calls) and `prompts` (counts per pipeline,
read by grpo-prompts). With `grpo.enabled: false` (the default) nothing trains: final/
holds only a pointer to the model it was given, so audit, eval and export always read
outputs/grpo/final. The model loads as for DPO (sft/trainer.py's load_policy): an
adapter is continued with the recipe's LoRA target groups (experts included) and TRL
keeps a frozen copy as the reference; full weights get a new adapter from `lora:`.

Each prompt is rendered here with the tokenizer's training template and its own tools
(TRL renders one tool list for all prompts), so the policy sees tool_use prompts as
SFT showed them. Generation on CPU is transformers' `generate` with the cache on: the
Mamba layers then carry their state from step to step (without the cache each new
token recomputes the whole sequence; the result is the same, tests/test_grpo.py).

With `--heldout` (grpo-prompts' heldout.jsonl, prompts no step trains on) the policy
answers each held-out prompt greedily before the first step and after the last; the
rewards of the two answers are paired prompt by prompt (evals/paired.compare, as the
gate pairs items), so GRPO's effect comes with its interval and p-value.

A reward that raises on a sample stops the run with one line naming the sample and its
pipeline; the steps finished before it are saved in OUTPUT/interrupted/.
Writes into the output folder:
  final/             the trained adapter or model (+ tokenizer), or the pointer
  grpo_metrics.json  reward first/last (all and per reward and pipeline), steps, prompts,
                     the activation loss and its share of the loss, seconds per step
  grpo_curve.json    one row per logging step (DVC plot data)
  lora_coverage.json per target group: layers covered / present, trainable params
  heldout_answers.json  with --heldout: each held-out prompt's answers and rewards,
                     before and after (grpo_metrics.json's heldout_reward pairs them)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.contract import GrpoMetrics, read_grpo_prompts, write_report
from pipeline.recipe import GRPO_PIPELINES, Recipe, RecipeError, add_recipe_arguments, load_recipe
from pipeline.records import InputError, write_json

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--model", default="outputs/dpo/final",
                        help="the model or adapter folder to train (dpo's final/, a pointer when DPO is off)")
    parser.add_argument("--prompts", default="data/grpo/prompts.jsonl", help="posttrain grpo-prompts' prompts.jsonl")
    parser.add_argument("--heldout", default=None,
                        help="posttrain grpo-prompts' heldout.jsonl: scored before and after training, paired")
    parser.add_argument("--output-dir", help="default: grpo.output_dir, else outputs/grpo")
    # The deepspeed launcher passes --local_rank to every process.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def main(args) -> int:
    from pipeline.student import check_model_folder

    recipe = load_recipe(args.recipe, args.overrides)
    output_dir = Path(args.output_dir or recipe.grpo.get("output_dir") or "outputs/grpo")
    check_model_folder(args.model, flag="--model", trust_remote_code=recipe.model.trust_remote_code)
    if not recipe.grpo_enabled:
        write_pointer(Path(args.model), output_dir)
        return 0
    check_batch(recipe)
    prompts = load_prompts(Path(args.prompts), recipe)
    heldout = load_prompts(Path(args.heldout), recipe, "--heldout", required=False) if args.heldout else []
    train(recipe, Path(args.model), prompts, output_dir, heldout)
    return 0


# ------------------------------------------------------------------ GRPO off
def write_pointer(model_dir: Path, output_dir: Path) -> None:
    from sft.trainer import write_pointer as point

    target = point(model_dir, output_dir / "final", "grpo.enabled is false", "--model")
    write_report(output_dir / "grpo_metrics.json", GrpoMetrics(enabled=False, model=str(target)))
    write_json(output_dir / "grpo_curve.json", [])
    write_json(output_dir / "lora_coverage.json", {"lora": False})
    log.info("grpo.enabled is false: %s points to %s", output_dir / "final", target)


# --------------------------------------------------------------- the input
def check_batch(recipe: Recipe) -> None:
    """TRL samples num_generations answers per prompt, and a generation batch must
    hold whole groups: say so naming the recipe's keys (TRL's own error names its
    derived generation_batch_size)."""
    from trl import GRPOConfig

    fields = recipe.grpo
    defaults = {f.name: f.default for f in GRPOConfig.__dataclass_fields__.values()}
    generations = fields.get("num_generations", defaults["num_generations"])
    per_device = fields.get("per_device_train_batch_size", defaults["per_device_train_batch_size"])
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if fields.get("generation_batch_size"):
        batch, source = fields["generation_batch_size"], "grpo.generation_batch_size"
    else:
        steps = fields.get("steps_per_generation") or fields.get("gradient_accumulation_steps") or 1
        batch = per_device * processes * steps
        source = (f"grpo.per_device_train_batch_size {per_device} x {processes} process(es) x "
                  f"{'steps_per_generation' if fields.get('steps_per_generation') else 'gradient_accumulation_steps'} {steps}")
    if generations is None or generations < 2:
        raise RecipeError(f"recipe {recipe.path}: grpo.num_generations: {generations}: GRPO compares answers "
                          "to one prompt, at least 2")
    if batch % generations:
        raise RecipeError(f"recipe {recipe.path}: grpo.num_generations {generations} does not divide the "
                          f"generation batch ({source} = {batch}); make the batch a multiple of it")


def load_prompts(path: Path, recipe: Recipe, flag: str = "--prompts", required: bool = True):
    """prompts.jsonl (pipeline.contract.GrpoPrompt) -> the rows the trainer reads: id,
    pipeline, prompt (turns), tools and verifier (+ the tools, which tool_calls checks
    against) as JSON text (their shapes differ per pipeline; one Arrow type cannot hold
    them all). The held-out file may be empty (grpo.heldout asks for none)."""
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file (run posttrain grpo-prompts first)")
    rows = read_grpo_prompts(path)
    if not rows and required:
        raise InputError(f"{flag} {path}: no prompts (grpo.prompts asks for none, or every one was "
                         "contaminated; see prompt_stats.json)")
    unknown = sorted({r.pipeline for r in rows} - set(GRPO_PIPELINES))
    if unknown:
        raise InputError(f"{flag} {path}: prompts of pipeline {unknown[0]!r}, which no reward scores")
    return [{"id": r.id, "pipeline": r.pipeline, "prompt": r.turns(),
             "tools": json.dumps(r.tools) if r.tools else None,
             "verifier": json.dumps({**r.verifier, **({"tools": r.tools} if r.tools else {})})}
            for r in rows]


def rendered(rows: list[dict[str, Any]], tokenizer):
    """A datasets.Dataset whose `prompt` is each conversation rendered with the
    tokenizer's template, its own tools and the generation prompt (TRL's text mode)."""
    from datasets import Dataset

    out = []
    for row in rows:
        tools = json.loads(row["tools"]) if row["tools"] else None
        text = tokenizer.apply_chat_template(row["prompt"], tools=tools, tokenize=False, add_generation_prompt=True)
        out.append({"id": row["id"], "pipeline": row["pipeline"], "prompt": text, "verifier": row["verifier"]})
    return Dataset.from_list(out)


# ------------------------------------------------------------------- config
def grpo_config(recipe: Recipe, output_dir: Path):
    from trl import GRPOConfig

    from sft.trainer import training_args

    args = training_args(GRPOConfig, recipe, "grpo", output_dir,
                         defaults={"logging_steps": 1, "gradient_checkpointing": False, "log_completions": False})
    if not args.use_vllm:
        # transformers' generate with the cache: the hybrid cache carries the Mamba
        # state (and attention's keys) from token to token. A model trained with
        # use_cache off would otherwise recompute the whole sequence per token.
        args.generation_kwargs = {"use_cache": True, **(args.generation_kwargs or {})}
    return args


# -------------------------------------------------------------------- train
def train(recipe: Recipe, model_dir: Path, rows: list[dict[str, Any]], output_dir: Path,
          heldout: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from trl import GRPOTrainer

    from pipeline.student import load_tokenizer, mamba_path, resolve_model_folder
    from sft.trainer import build_trainer, finish, load_policy, save
    from synth_data.rewards import RewardError, reward_functions

    model_dir = resolve_model_folder(model_dir, "--model")
    args = grpo_config(recipe, output_dir)
    tokenizer = load_tokenizer(recipe.model)
    policy, _, peft_config, coverage, mode = load_policy(recipe, model_dir, tokenizer, reference=False)
    prompts = rendered(rows, tokenizer)
    # The tokens generation stops at (TRL's list: the tokenizer's and the model's).
    stops = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    eos = sorted({tokenizer.eos_token_id, *stops} - {None})
    rewards = reward_functions(recipe.grpo_own.rewards, max_completion_length=args.max_completion_length,
                               eos_ids=eos, partial_credit=recipe.grpo_own.partial_credit)

    trainer = build_trainer(
        GRPOTrainer, recipe, policy, coverage,
        reward_funcs=rewards,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    wait_for_a_policy_gradient(trainer)
    if heldout:
        before = answer_heldout(trainer.model, tokenizer, heldout, rewards, args.max_completion_length, eos)
    started = time.perf_counter()
    try:
        result = trainer.train()
    except RewardError as exc:
        # The failing step had not updated the weights: what is saved is every step
        # that finished.
        kept = output_dir / "interrupted"
        save_policy(trainer, tokenizer, kept, save)
        finish(trainer)
        raise RewardError(f"{exc}; the {trainer.state.global_step} finished step(s) are saved in {kept}") from None
    runtime = time.perf_counter() - started

    # ----------------------------------------------------------------- save
    final_dir = output_dir / "final"
    save_policy(trainer, tokenizer, final_dir, save)
    metrics: dict[str, Any] = dict(result.metrics)
    if trainer.is_world_process_zero():
        penalty = trainer.activation_loss
        curve = curve_rows(trainer.state.log_history)
        write_json(output_dir / "grpo_curve.json", curve)
        first, last = (curve[0], curve[-1]) if curve else ({}, {})
        shares = [r["activation_loss_share"] for r in curve if r.get("activation_loss_share") is not None]
        steps = trainer.state.global_step
        metrics.update({
            "enabled": True,
            "model": str(model_dir),
            "mode": mode,
            "mamba_path": mamba_path(trainer.accelerator.unwrap_model(trainer.model)),
            "prompts": len(prompts),
            "prompts_per_pipeline": {p: prompts["pipeline"].count(p) for p in sorted(set(prompts["pipeline"]))},
            "rewards": recipe.grpo_own.rewards,
            "num_generations": args.num_generations,
            "global_step": steps,
            "train_seconds": round(runtime, 1),
            "seconds_per_step": round(runtime / steps, 1) if steps else None,
            "reward_first": first.get("reward"),
            "reward_last": last.get("reward"),
            "reward_by_name_and_pipeline_last": {k: v for k, v in last.items() if k.startswith("rewards/")},
            "activation_loss_share_mean": sum(shares) / len(shares) if shares else None,
            "beta": args.beta,
        })
        if penalty is not None:
            metrics["activation_loss"] = penalty.summary()
    if heldout:
        after = answer_heldout(trainer.accelerator.unwrap_model(trainer.model), tokenizer, heldout, rewards,
                               args.max_completion_length, eos)
        if trainer.is_world_process_zero():
            metrics["heldout_reward"] = heldout_effect(heldout, before, after, output_dir)
            log.info("held-out reward %.3f -> %.3f on %d prompts (p %.3g)", metrics["heldout_reward"]["before"],
                     metrics["heldout_reward"]["after"], len(heldout), metrics["heldout_reward"]["p"])
    if trainer.is_world_process_zero():
        write_json(output_dir / "lora_coverage.json", coverage or {"lora": False})
        write_report(output_dir / "grpo_metrics.json", GrpoMetrics, metrics)
        log.info("GRPO %d steps on %d prompts, reward %s -> %s, activation-loss share %s; saved %s",
                 steps, len(prompts), metrics["reward_first"], metrics["reward_last"],
                 metrics["activation_loss_share_mean"], final_dir)
    finish(trainer)
    return metrics


# ------------------------------------------------------------- held-out effect
def answer_heldout(model, tokenizer, rows: list[dict[str, Any]], rewards, max_new_tokens: int,
                   eos: list[int], batch_size: int = 8) -> list[dict[str, Any]]:
    """Each held-out prompt's greedy answer and its summed reward (TRL sums the
    rewards a prompt gets; None, another pipeline's reward, adds nothing). Prompts are
    rendered as in training and left-padded, answers cut after the first end token,
    as TRL cuts its completions."""
    import torch
    from tqdm.auto import tqdm

    data = rendered(rows, tokenizer)
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    training = model.training
    model.eval()
    texts, ids, stopped = [], [], []
    try:
        with torch.no_grad():
            # Minutes on CPU (greedy, max_new_tokens each): a bar, as every long step has.
            for start in tqdm(range(0, len(data), batch_size), desc="held-out answers", unit="batch"):
                batch = tokenizer(data["prompt"][start:start + batch_size], return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(model.device)
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id)
                for row in out[:, batch["input_ids"].shape[1]:].tolist():
                    cut = next((i + 1 for i, token in enumerate(row) if token in eos), None)
                    stopped.append(cut is not None)
                    ids.append(row[:cut])
                    texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
        model.train(training)
    totals = [0.0] * len(rows)
    columns = {"id": data["id"], "pipeline": data["pipeline"], "verifier": data["verifier"]}
    for reward in rewards:
        for i, value in enumerate(reward(prompts=data["prompt"], completions=texts, completion_ids=ids, **columns)):
            totals[i] += value or 0.0
    return [{"answer": text, "finish_reason": "stop" if stop else "length", "reward": total}
            for text, stop, total in zip(texts, stopped, totals)]


def heldout_effect(rows: list[dict[str, Any]], before: list[dict[str, Any]], after: list[dict[str, Any]],
                   output_dir: Path) -> dict[str, Any]:
    """The paired change of the held-out reward, overall and per pipeline; every
    prompt's two answers go to heldout_answers.json for review."""
    from evals.paired import compare

    write_json(output_dir / "heldout_answers.json", [
        {"id": row["id"], "pipeline": row["pipeline"], "before": b, "after": a}
        for row, b, a in zip(rows, before, after)])
    change = compare([b["reward"] for b in before], [a["reward"] for a in after])
    per_pipeline = {}
    for name in sorted({row["pipeline"] for row in rows}):
        idx = [i for i, row in enumerate(rows) if row["pipeline"] == name]
        per_pipeline[name] = {"prompts": len(idx), "before": sum(before[i]["reward"] for i in idx) / len(idx),
                              "after": sum(after[i]["reward"] for i in idx) / len(idx)}
    return {"prompts": len(rows), "before": change.before, "after": change.after, "delta": change.delta,
            "low": change.low, "high": change.high, "p": change.p, "better": change.better,
            "worse": change.worse, "per_pipeline": per_pipeline}


def wait_for_a_policy_gradient(trainer) -> None:
    """Where every answer to each prompt scored the same, the advantages are 0 and the
    GRPO loss gives no adapter a gradient: the first-step LoRA check (sft/lora.py)
    would call that a dead module. It waits for a step with some reward spread (TRL's
    frac_reward_zero_std for the step's generation batch, below 1)."""
    from sft.lora import GradientCoverageCallback

    def spread() -> bool:
        shares = trainer._metrics["train"].get("frac_reward_zero_std") or [1.0]
        return shares[-1] < 1.0

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, GradientCoverageCallback):
            callback.ready = spread


def save_policy(trainer, tokenizer, folder: Path, save) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        # TRL's frozen copy of the adapter it started from: not part of the result.
        model.delete_adapter("ref")
    save(trainer, tokenizer, folder)


def curve_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per training log: the rewards (TRL's mean over all, per reward, and ours
    per reward and pipeline), the loss, and the activation loss with its share of the
    loss magnitude (the GRPO loss itself sits near 0 and changes sign)."""
    rows = []
    for r in history:
        if "loss" not in r or "reward" not in r:
            continue
        row = {"step": r["step"], "loss": r["loss"], "reward": r["reward"],
               **{k: v for k, v in r.items() if k.startswith(("rewards/", "activation", "kl", "completions/mean"))}}
        term = r.get("activation_loss")
        if term is not None:
            rest = abs(r["loss"] - term)
            row["activation_loss_share"] = term / (rest + term) if rest + term > 0 else None
        rows.append(row)
    return rows
