"""`posttrain eval RECIPE --model PATH --out DIR`: score one model on every suite.

    posttrain eval recipes/tiny-cpu.yaml --model base --out outputs/eval/base
    posttrain eval recipes/tiny-cpu.yaml --model outputs/sft/final --out outputs/eval/after

`--model` is `base` (the recipe's student before training: the same seeded random
init for `model.tiny`, the named model otherwise), a model folder, or an adapter
folder (merged into the recipe's student). Reads top to bottom:

1. recipe -> the `eval:` section and each suite's `eval.<suite>` subsection, validated
   by that suite's Config before any model loads;
2. the model and the tokenizer it trains with (the training template);
3. held-out loss on the mix's eval split, per category (evals/heldout_loss.py), and
   the forgetting probe: loss on general text the SFT never saw (evals/forgetting.py);
4. the model saved as a folder (engines load folders; vLLM needs one) named by a
   digest of its weights, so the answer cache never mixes two models;
5. each generation suite (evals/retention.py, evals/tool_calls.py, evals/ifeval.py):
   build its items, render them with the student's own template, answer greedily
   through the project's engines (vLLM where the architecture runs on it,
   transformers otherwise), cached and resumable, then score;
6. OUT/scores.json (every suite's metrics), OUT/<suite>.json (per-item answers and
   verdicts).
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from evals import forgetting, heldout_loss
from pipeline.chat_template import prompt_text
from pipeline.engines import CachedEngine, Sampling
from pipeline.recipe import Recipe, RecipeError, add_recipe_arguments, load_recipe
from pipeline.contract import EvalScores, SuiteItems, read_conversations, write_report
from pipeline.records import validation_problems

log = logging.getLogger(__name__)

# Generation suites: recipe key -> module. Each exposes NAME, Config, build_items, score.
SUITES: dict[str, str] = {
    "retention": "evals.retention",
    "tool_calls": "evals.tool_calls",
    "ifeval": "evals.ifeval",
}
# Loss suites, scored on the loaded model (no generation): recipe key -> module with
# NAME, Config, evaluate(model, tokenizer, cfg).
LOSS_SUITES: dict[str, str] = {forgetting.NAME: "evals.forgetting"}
# Model families whose Mamba-1 layers vLLM cannot run on CPU (no selective-scan kernel).
MAMBA1_MODEL_TYPES = {"jamba", "mamba", "falcon_mamba"}


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--model", required=True,
                        help="'base' (the recipe's student before training), a model folder or an adapter folder")
    parser.add_argument("--out", required=True, help="folder for scores.json and per-suite answers")
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="test: the gated items; dev: other items of the same suites, to choose "
                             "learning rates, steps and mixes on (never the gated ones)")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    report = evaluate(recipe, args.model, Path(args.out), split=args.split)
    print(json.dumps({"model": report["model"], "engine": report["engine"], "scores": report["scores"]},
                     indent=1))
    return 0


# ------------------------------------------------------------------- the recipe
def suite_configs(recipe: Recipe) -> dict[str, Any]:
    """{suite name: its validated Config} for every enabled suite; one RecipeError
    naming every bad key (an unknown suite name is a bad key too)."""
    raw = recipe.eval.model_extra or {}
    configs, problems = {}, []
    for name in raw:
        if name not in SUITES and name not in LOSS_SUITES:
            problems.append(f"eval.{name}: unknown key (suites: {', '.join([*SUITES, *LOSS_SUITES])})")
    for name, module_name in {**SUITES, **LOSS_SUITES}.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            if name in raw:
                problems.append(f"eval.{name}: suite module {module_name} is not installed")
            continue
        try:
            cfg = module.Config.model_validate(raw.get(name) or {})
        except ValidationError as exc:
            problems += validation_problems(exc, prefix=f"eval.{name}")
            continue
        if getattr(cfg, "enabled", True):
            configs[name] = (module, cfg)
    if problems:
        raise RecipeError(f"recipe {recipe.path}:\n  " + "\n  ".join(problems))
    return configs


# -------------------------------------------------------------------- the model
def load_model(recipe: Recipe, spec: str):
    """(float32 model in eval mode, its training tokenizer, a description)."""
    from pipeline.student import load_for_inference

    if spec == "base":
        model, tokenizer, _ = load_for_inference(recipe.model, None)
        return model, tokenizer, "base (the recipe's student)"
    if not Path(spec).is_dir():
        raise RecipeError(f"--model {spec}: not 'base' and no such folder")
    return load_for_inference(recipe.model, spec)


def weights_digest(model, tokenizer) -> str:
    """A digest of every weight and of the chat template: names a model's answers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()[:16]


def save_folder(model, tokenizer, root: Path, digest: str) -> Path:
    """The model as a folder the engines load (kept: the same weights are not saved twice)."""
    folder = root / digest
    if not (folder / "config.json").is_file():
        tmp = root / f".{digest}.tmp"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    return folder


# ------------------------------------------------------------------- the engine
def engine_choice(section, config) -> str:
    if section.engine != "auto":
        return section.engine
    if getattr(config, "model_type", "") in MAMBA1_MODEL_TYPES and not torch.cuda.is_available():
        return "transformers"
    try:
        importlib.import_module("vllm")
    except ImportError:
        return "transformers"
    return "vllm"


def build_engine(section, kind: str, folder: Path, label: str, max_model_len: int):
    """An engine on `folder` rendering with the folder's own tokenizer template, cached."""
    from pipeline.engines import TransformersEngine, VLLMEngine

    if kind == "vllm":
        engine = VLLMEngine(str(folder), max_model_len=max_model_len, chat_template=None)
    else:
        engine = TransformersEngine(str(folder), batch_size=min(section.batch_size, 8),
                                    threads=section.threads, chat_template=None)
    engine.model = label  # the cache key: weights digest, not the folder path
    if section.cache_dir:
        return CachedEngine(engine, section.cache_dir, chunk=section.batch_size)
    return engine


def answer(engine, items: list[dict[str, Any]], default_max_tokens: int) -> list[str]:
    """Greedy answers, one per item, grouped by generation budget."""
    answers: list[str | None] = [None] * len(items)
    budgets: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        budgets.setdefault(int(item.get("max_tokens") or default_max_tokens), []).append(i)
    for budget, idx in sorted(budgets.items()):
        sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=budget, n=1, seed=0)
        outs = engine.chat([items[i]["messages"] for i in idx], sampling,
                           [items[i].get("tools") or None for i in idx])
        for i, completions in zip(idx, outs):
            answers[i] = completions[0].text
    return answers  # type: ignore[return-value]


def uniform_chance(model, result: dict[str, Any]) -> dict[str, Any]:
    """A loss's chance level: a model that predicts every token of its vocabulary alike
    scores ln(vocabulary) nats on every token."""
    loss = math.log(model.get_output_embeddings().weight.shape[0])
    items = [{**row, "loss": round(loss, 4)} for row in result["items"]]
    return {"metrics": {"overall": round(loss, 4)}, "items": items}


# ----------------------------------------------------------------------- stage
def evaluate(recipe: Recipe, model_spec: str, out: Path, split: str = "test") -> dict[str, Any]:
    section = recipe.eval
    configs = suite_configs(recipe)  # bad keys fail before any model loads
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.model.seed)
    model, tokenizer, source = load_model(recipe, model_spec)
    timings: dict[str, float] = {}

    # ------------------------------------------------------ held-out loss
    scores: dict[str, Any] = {}
    started = time.monotonic()
    files = [f for f in section.heldout_files if Path(f).is_file()]
    records = [r for f in files for r in read_conversations(f)][: section.heldout_max_records]
    if records:
        result = heldout_loss.evaluate(model, tokenizer, records, recipe.mix, section.heldout_max_length)
        scores[heldout_loss.NAME] = result["metrics"]
        write_report(out / f"{heldout_loss.NAME}.json", SuiteItems, {**result, "chance": uniform_chance(model, result)})
    else:
        log.warning("held-out loss: no records in %s; skipped", section.heldout_files)
    timings[heldout_loss.NAME] = round(time.monotonic() - started, 1)

    # ------------------------------------------- forgetting probe (general text)
    probe = configs.pop(forgetting.NAME, None)  # a loss suite: scored here, never generated
    if probe is not None:
        started = time.monotonic()
        result = forgetting.evaluate(model, tokenizer, probe[1])
        scores[forgetting.NAME] = result["metrics"]
        write_report(out / f"{forgetting.NAME}.json", SuiteItems, {**result, "chance": uniform_chance(model, result)})
        timings[forgetting.NAME] = round(time.monotonic() - started, 1)

    # ------------------------------------------------- items of every suite
    context = {"recipe": recipe, "split": split, "length_buckets": section.length_buckets,
               "retention_threshold": section.retention_threshold, "data_root": Path(section.data_root)}
    items = {name: module.build_items(cfg, tokenizer, context) for name, (module, cfg) in configs.items()}

    # -------------------------------------------- the model as an engine
    digest = weights_digest(model, tokenizer)
    cache_root = Path(section.cache_dir or out) / "models"
    cache_root.mkdir(parents=True, exist_ok=True)
    folder = save_folder(model, tokenizer, cache_root, digest)
    kind = engine_choice(section, model.config)
    del model
    gc.collect()

    # The engine's window: the longest prompt as the engines render it (answer prefix
    # included) plus its answer budget.
    longest = max((len(tokenizer(prompt_text(tokenizer, it["messages"], it.get("tools")),
                                 add_special_tokens=False)["input_ids"])
                   + int(it.get("max_tokens") or cfg.max_tokens)
                   for name, (_, cfg) in configs.items() for it in items[name]), default=0)
    engine = None
    try:
        if any(items.values()):
            engine = build_engine(section, kind, folder, f"{model_spec}@{digest}",
                                  max_model_len=max(2048, -(-longest // 256) * 256))
        for name, (module, cfg) in configs.items():
            started = time.monotonic()
            log.info("%s: %d items on %s", name, len(items[name]), kind)
            answers = answer(engine, items[name], cfg.max_tokens) if items[name] else []
            result = module.score(items[name], answers, cfg)
            scores[name] = result["metrics"]
            per_item = [{**verdict, "answer": text} for verdict, text in zip(result["items"], answers)]
            # The chance level: what an empty answer scores on the same items. The gate
            # calls a suite uninformative when the base does no better.
            chance = module.score(items[name], [""] * len(items[name]), cfg)
            write_report(out / f"{name}.json", SuiteItems, {
                "metrics": result["metrics"], "items": per_item,
                "chance": {"metrics": chance["metrics"], "items": chance["items"]}})
            timings[name] = round(time.monotonic() - started, 1)
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()

    report = {
        "model": source,
        "model_spec": model_spec,
        "split": split,
        "weights_digest": digest,
        "engine": kind,
        "scores": scores,
        "counts": {name: len(found) for name, found in items.items()} | (
            {heldout_loss.NAME: len(records)} if records else {}) | (
            {forgetting.NAME: scores[forgetting.NAME]["documents"]} if probe is not None else {}),
        "cache": {"hits": getattr(engine, "hits", 0), "generated": getattr(engine, "misses", 0)},
        "seconds": timings,
    }
    write_report(out / "scores.json", EvalScores, report)
    log.info("eval: %s on %s; wrote %s", source, kind, out / "scores.json")
    return report
