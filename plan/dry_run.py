"""`posttrain plan RECIPE [--gpus N] [--gpu-memory GB]`: the whole recipe validated and
sized before any GPU hour is spent. Offline, no weights, seconds.

Reads top to bottom:
1. the recipe through the same loader every stage uses, plus each pipeline's and each
   eval suite's own Config;
2. the student's architecture from its config alone: a shipped copy under
   recipes/models/<hub id>/config.json (the hub is not needed), a local folder, or
   `model.tiny`; parameter counts from the model built on the meta device;
3. generation: each pipeline's own `sample_prompts` and `generate`, run against an
   engine that answers nothing and counts what it is asked (prompts, candidates,
   teacher sequences, tokens); a pipeline asked for more than `--sample` prompts is
   run on that many and its counts scaled (building and tokenising thousands of
   256K-token documents took minutes; the plan must take seconds);
4. training: records and tokens per epoch after packing, optimizer steps; GRPO (when
   `grpo.enabled`): its prompts from each pipeline's own prompt step, as
   `posttrain grpo-prompts` samples them, completions and tokens per step;
5. evaluation: each suite's items (its own `build_items` where that needs no model);
6. memory per GPU from DeepSpeed's own model-state estimators, plus a rough figure for
   activations; time from the throughput figures the recipe's `plan:` section states;
7. refusals, one line each naming the recipe key: max_length beyond the window, LoRA
   that misses the routed experts, memory over budget, packing that cannot be exact.

Exit status 2 when anything is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.engines import Completion, Sampling
from pipeline.recipe import Recipe, RecipeError, add_recipe_arguments, load_recipe

ROOT = Path(__file__).resolve().parents[1]
# Published config.json files of the students the recipes name, so that planning
# never needs the hub: recipes/models/<hub id>/config.json.
SHIPPED_CONFIGS = ROOT / "recipes" / "models"
# The packaged teacher's names (pipeline/model_paths.py) and the model it is.
PACKAGED = {"teacher": "HuggingFaceTB/SmolLM2-135M-Instruct", "packaged": "HuggingFaceTB/SmolLM2-135M-Instruct"}
GB = 1e9
# Prompts per pipeline the plan runs through the pipeline's own steps; a larger count is
# scaled from them (`--sample 0`: every prompt, exact). SIZES: the Config fields whose
# sum is a pipeline's prompt count (steerability's conversations are prompts too).
SAMPLE = 256
SIZES = ("count", "conversations")


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--gpus", type=int, help="GPUs that train (default: plan.gpus)")
    parser.add_argument("--gpu-memory", type=float, metavar="GB", help="memory per GPU (default: plan.gpu_memory_gb)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--sample", type=int, default=SAMPLE, metavar="N",
                        help=f"run at most N prompts per pipeline and scale the counts (default {SAMPLE}; 0: all, exact)")


def main(args) -> int:
    overrides = list(args.overrides)
    if args.gpus is not None:
        overrides.append(f"plan.gpus={args.gpus}")
    if args.gpu_memory is not None:
        overrides.append(f"plan.gpu_memory_gb={args.gpu_memory}")
    if args.sample < 0:
        raise RecipeError(f"--sample: {args.sample} is negative (0 plans every prompt)")
    # Libraries the plan imports (DeepSpeed's accelerator notice) log to stdout, which
    # --json keeps for the plan alone.
    with contextlib.redirect_stdout(sys.stderr):
        recipe = load_recipe(args.recipe, overrides)
        result = plan(recipe, args.sample)
    print(json.dumps(result, indent=1) if args.json else render(result))
    for line in result["refused"]:
        print(f"posttrain plan: refused: {line}", file=sys.stderr)
    return 2 if result["refused"] else 0


# --------------------------------------------------------------------- the plan
def plan(recipe: Recipe, sample: int = SAMPLE) -> dict[str, Any]:
    refused: list[str] = []
    config, source = student_config(recipe)
    counts = parameter_counts(recipe, config, refused)
    generation = generation_plan(recipe, sample)
    training = training_plan(recipe, generation)
    rl = grpo_plan(recipe)
    evaluation = eval_plan(recipe)
    memory = memory_plan(recipe, config, counts, training)
    check_window(recipe, config, refused)
    check_packing(recipe, config, refused)
    if memory["per_gpu_gb"] > recipe.plan.gpu_memory_gb:
        refused.append(
            f"memory: {memory['per_gpu_gb']:.1f} GB per GPU ({memory['what']}) is over the "
            f"{recipe.plan.gpu_memory_gb:g} GB budget (plan.gpu_memory_gb, --gpu-memory); add GPUs "
            "(--gpus), offload (zero_optimization.offload_optimizer in sft.deepspeed) or lower "
            "sft.max_length")
    return {
        "recipe": str(recipe.path),
        "student": {"source": source, "model_type": config.model_type, "window": window(config), **counts},
        "hardware": {"gpus": recipe.plan.gpus, "gpu_memory_gb": recipe.plan.gpu_memory_gb},
        "generate": generation,
        "train": training,
        "grpo": rl,
        "eval": evaluation,
        "memory": memory,
        "time": time_plan(recipe, generation, training, rl, evaluation),
        "refused": refused,
    }


# --------------------------------------------------------------- the student
def student_config(recipe: Recipe):
    """(the student's transformers config, where it came from), without weights."""
    from transformers import AutoConfig, JambaConfig

    section = recipe.model
    if section.tiny is not None:
        from pipeline.student import TINY_JAMBA

        fields = {**TINY_JAMBA, **section.tiny}
        unknown = sorted(set(fields) - set(JambaConfig().to_dict()))
        if unknown:
            raise RecipeError(f"recipe {recipe.path}: model.tiny: not JambaConfig fields: {', '.join(unknown)}")
        # The tiny student takes its vocabulary from its tokenizer (pipeline/student.py):
        # the packaged teacher's, whose config ships here.
        vocab = JambaConfig().vocab_size
        if (section.tokenizer or "teacher") in PACKAGED:
            vocab = shipped_config(PACKAGED["teacher"]).vocab_size
        return JambaConfig(vocab_size=vocab, **fields), "model.tiny (pipeline/student.py TINY_JAMBA)"
    name = section.name_or_path
    if not name:
        raise RecipeError(f"recipe {recipe.path}: model: give model.name_or_path or model.tiny")
    hub_id = PACKAGED.get(name, name)
    if (SHIPPED_CONFIGS / hub_id / "config.json").is_file():
        return shipped_config(hub_id), f"recipes/models/{hub_id}/config.json"
    if (Path(name) / "config.json").is_file():
        return AutoConfig.from_pretrained(name), f"{name}/config.json"
    raise RecipeError(
        f"recipe {recipe.path}: model.name_or_path: {name}: no config under recipes/models/{hub_id}/ "
        "and no such model folder (plan reads the architecture offline: add its config.json there)")


def shipped_config(hub_id: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(SHIPPED_CONFIGS / hub_id)


def window(config) -> int:
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def parameter_counts(recipe: Recipe, config, refused: list[str]) -> dict[str, Any]:
    """Total parameters, the largest module's own (what ZeRO-3 gathers at once), and for
    LoRA the adapter's trainable ones: the model and the adapter built on the meta
    device, so a 398B model costs no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        counts = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
            "experts": int(getattr(config, "num_experts", 1) or 1),
            "adapter": None,
        }
        if recipe.lora is not None:
            check_lora_experts(recipe, config, refused)
            from peft import get_peft_model

            from sft.lora import build_lora_config

            peft_config, _ = build_lora_config(recipe.lora, model)
            wrapped = get_peft_model(model, peft_config)
            counts["adapter"] = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return counts


def check_lora_experts(recipe: Recipe, config, refused: list[str]) -> None:
    """An MoE student whose LoRA names the MLP projections (as 4.x model cards do, meaning
    every expert's) but not the experts: in transformers 5 the routed experts are fused
    3-D weights that module names never reach (sft/lora.py), so the adapter would
    silently skip most of the model. The `mlp` group means the dense layers only."""
    if int(getattr(config, "num_experts", 1) or 1) <= 1:
        return
    targets = recipe.lora.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    mlp_names = {"gate_proj", "up_proj", "down_proj", "all-linear"}
    if mlp_names & set(targets) and "experts" not in targets and not recipe.lora.get("target_parameters"):
        refused.append(
            f"lora.target_modules: {', '.join(sorted(mlp_names & set(targets)))} reach the dense MLP "
            f"layers only; the {config.num_experts} routed experts are fused weights that LoRA reaches "
            "only through target_parameters: add the `experts` group")


# --------------------------------------------------------------- generation
@dataclass
class CountingEngine:
    """Stands in for the teacher: answers every request with an empty completion and
    counts what it was asked. Pipelines that ask again only after a passing answer
    (steerability's later conversation turns) are counted for their first turn."""

    defaults: Sampling
    name: str = "plan"
    model: str = "plan"
    sequences: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    conversations: list = field(default_factory=list)

    def chat(self, conversations, sampling: Sampling, tools=None):
        from pipeline.sources import conversation_tokens

        tools = tools or [None] * len(conversations)
        for conversation, offered in zip(conversations, tools):
            self.prompt_tokens += conversation_tokens(conversation, offered)
        self.conversations += conversations
        self.sequences += len(conversations) * sampling.n
        self.new_tokens += len(conversations) * sampling.n * sampling.max_tokens
        return [[Completion("", 0, "stop") for _ in range(sampling.n)] for _ in conversations]


def dag_pipelines() -> list[str]:
    """The pipelines the DAG generates (params.yaml), every one whatever the recipe says."""
    from synth_data.four_steps import PIPELINES

    params = ROOT / "params.yaml"
    if params.is_file():
        return list(yaml.safe_load(params.read_text()).get("pipelines") or PIPELINES)
    return list(PIPELINES)


def generation_plan(recipe: Recipe, sample: int = SAMPLE) -> dict[str, dict[str, Any]]:
    from synth_data import four_steps

    raw = recipe.raw.get("generate") or {}
    unknown = sorted(set(raw) - set(four_steps.PIPELINES))
    if unknown:
        raise RecipeError(f"recipe {recipe.path}: generate.{unknown[0]}: unknown pipeline "
                          f"(known: {', '.join(four_steps.PIPELINES)})")
    out = {}
    for name in dag_pipelines():
        cfg = four_steps.validate_config(name, raw.get(name), f"recipe {recipe.path}")
        scale, sizes = 1.0, {k: getattr(cfg, k) for k in SIZES if hasattr(cfg, k)}
        if sample and sum(sizes.values()) > sample:  # every size field by the same factor
            fraction = sample / sum(sizes.values())
            cfg = cfg.model_copy(update={k: max(1, round(v * fraction)) if v else 0 for k, v in sizes.items()})
            scale = sum(sizes.values()) / sum(getattr(cfg, k) for k in sizes)
        module = four_steps.load_pipeline(name)
        engine = CountingEngine(Sampling(**recipe.teacher.sampling.model_dump()))
        try:  # the stage's own steps (i) and (ii), seeded as four_steps.run seeds them
            prompts = module.sample_prompts(cfg, random.Random(getattr(cfg, "seed", 0)))
            candidates = module.generate(prompts, engine, cfg)
        except ValueError as exc:
            raise RecipeError(f"recipe {recipe.path}: generate.{name}: {exc}") from None
        # One training record per prompt at most, as long as its length bucket (long
        # context), else the teacher's prompt plus its answer budget.
        lengths = [p.get("length_bucket") or record_tokens(engine, getattr(cfg, "max_tokens", 0)) for p in prompts]
        planned = round(len(prompts) * scale)
        out[name] = {
            "prompts": planned,
            "candidates": round(len(candidates) * scale),
            "teacher_sequences": round(engine.sequences * scale),
            "prompt_tokens": round(engine.prompt_tokens * scale),
            "new_tokens_max": round(engine.new_tokens * scale),
            "record_tokens": [lengths[i % len(lengths)] for i in range(planned)] if lengths else [],
            "scaled_from": len(prompts) if scale != 1.0 else None,
        }
    return out


def record_tokens(engine: CountingEngine, max_tokens: int | None) -> int:
    asked = len(engine.conversations)
    return (engine.prompt_tokens // asked if asked else 0) + int(max_tokens or 0)


# ------------------------------------------------------------------ training
def sft_value(recipe: Recipe, key: str) -> Any:
    """sft.<key>, else trl.SFTConfig's default."""
    if key in recipe.sft and recipe.sft[key] is not None:
        return recipe.sft[key]
    from trl import SFTConfig

    default = SFTConfig.__dataclass_fields__[key]
    return default.default_factory() if default.default is dataclasses.MISSING else default.default


def training_plan(recipe: Recipe, generation: dict[str, dict[str, Any]]) -> dict[str, Any]:
    max_length = sft_value(recipe, "max_length")
    packing = bool(sft_value(recipe, "packing") or sft_value(recipe, "padding_free"))
    lengths = [t for row in generation.values() for t in row["record_tokens"]]
    if recipe.mix.max_records is not None:
        lengths = lengths[: recipe.mix.max_records]
    lengths = lengths[: len(lengths) - round(len(lengths) * recipe.mix.eval_fraction)]
    over = sum(t > max_length for t in lengths) if max_length else 0
    if recipe.data.on_truncated == "skip":
        lengths = [t for t in lengths if not max_length or t <= max_length]
    tokens = sum(min(t, max_length) if max_length else t for t in lengths)
    rows = math.ceil(tokens / max_length) if packing and max_length else len(lengths)
    gpus = recipe.plan.gpus
    batch = sft_value(recipe, "per_device_train_batch_size") * sft_value(recipe, "gradient_accumulation_steps") * gpus
    epochs = sft_value(recipe, "num_train_epochs")
    max_steps = sft_value(recipe, "max_steps")
    steps = max_steps if max_steps and max_steps > 0 else math.ceil(math.ceil(rows / batch) * epochs)
    return {
        "mode": "lora" if recipe.lora is not None else "full",
        "max_length": max_length,
        "packing": packing,
        "records_max": len(lengths),
        "records_over_max_length": over,
        "tokens_per_epoch_max": tokens,
        "rows_per_epoch": rows,
        "global_batch": batch,
        "epochs": epochs,
        "steps": steps,
        "steps_from": "sft.max_steps" if max_steps and max_steps > 0 else "epochs x rows / global batch",
        "tokens_trained_max": steps * batch * max_length if packing else min(steps * batch, rows * epochs) * (
            tokens // max(rows, 1)),
    }


def grpo_value(recipe: Recipe, key: str) -> Any:
    """grpo.<key>, else trl.GRPOConfig's default."""
    if recipe.grpo.get(key) is not None:
        return recipe.grpo[key]
    from trl import GRPOConfig

    return GRPOConfig.__dataclass_fields__[key].default


def grpo_plan(recipe: Recipe) -> dict[str, Any]:
    """GRPO's prompts (before decontamination, which needs the held-out items' text),
    completions per optimizer step and the tokens they cost. Generation and the policy
    update both scale with the completions' tokens: TRL samples `num_generations`
    completions per prompt, `per_device_train_batch_size` counts completions."""
    if not recipe.grpo_enabled:
        return {"enabled": False}
    from synth_data.grpo_prompts import sample
    from pipeline.sources import conversation_tokens

    own = recipe.grpo_own
    prompts, prompt_tokens = {}, 0
    for name, count in own.prompts.items():
        sampled = sample(recipe, name, count, own.seed, "grpo.prompts")
        prompts[name] = len(sampled)
        prompt_tokens += sum(conversation_tokens(p.turns(), p.tools) for p in sampled)
    total = sum(prompts.values())
    completion = grpo_value(recipe, "max_completion_length")
    per_step = (grpo_value(recipe, "per_device_train_batch_size") * recipe.plan.gpus
                * grpo_value(recipe, "gradient_accumulation_steps"))
    max_steps = grpo_value(recipe, "max_steps")
    epochs = grpo_value(recipe, "num_train_epochs")
    steps = max_steps if max_steps and max_steps > 0 else math.ceil(
        math.ceil(total * grpo_value(recipe, "num_generations") / per_step) * epochs)
    mean_prompt = prompt_tokens / total if total else 0
    return {"enabled": True, "prompts": prompts, "prompts_total": total,
            "mean_prompt_tokens": round(mean_prompt, 1),
            "num_generations": grpo_value(recipe, "num_generations"), "completions_per_step": per_step,
            "steps": steps, "steps_from": "grpo.max_steps" if max_steps and max_steps > 0
            else "epochs x prompts x num_generations / completions per step",
            "max_completion_length": completion,
            "generated_tokens_max": steps * per_step * completion,
            "tokens_trained_max": round(steps * per_step * (mean_prompt + completion))}


# ---------------------------------------------------------------------- eval
def eval_plan(recipe: Recipe) -> dict[str, Any]:
    from evals import evaluate, forgetting, retention
    from pipeline.sources import conversation_tokens

    configs = evaluate.suite_configs(recipe)  # every eval.<suite> key validated
    context = {"recipe": recipe, "split": "test", "length_buckets": recipe.eval.length_buckets,
               "retention_threshold": recipe.eval.retention_threshold,
               "data_root": Path(recipe.eval.data_root)}
    suites: dict[str, Any] = {}
    for name, (module, cfg) in configs.items():
        if module is retention:
            # build_items yields exactly `count` items per task and length (or fails);
            # building them needs the student's tokenizer and minutes at 256K.
            lengths = sorted(set(recipe.eval.length_buckets))
            suites[name] = {"items": len(cfg.tasks) * len(lengths) * cfg.count, "tasks": len(cfg.tasks),
                            "lengths": lengths, "per_task_and_length": cfg.count,
                            "tokens": len(cfg.tasks) * cfg.count * sum(lengths)}
        elif module is forgetting:
            suites[name] = {"items": len(forgetting.documents()[: cfg.count]),
                            "tokens": len(forgetting.documents()[: cfg.count]) * cfg.max_length}
        else:  # tool_calls, ifeval: items from the suite's own data, no tokenizer needed
            items = module.build_items(cfg, None, context)
            prompt = sum(conversation_tokens(it["messages"], it.get("tools")) for it in items)
            suites[name] = {"items": len(items), "tokens": prompt + len(items) * cfg.max_tokens}
    # base, trained (+ the SFT model, when DPO or GRPO follows it)
    models = 3 if recipe.dpo_enabled or recipe.grpo_enabled else 2
    return {"suites": suites, "models": models,
            "heldout_loss": "the mix's eval split (mix.eval_fraction)"}


# -------------------------------------------------------------------- memory
def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    value = recipe.sft.get("deepspeed")
    if not value:
        return {}
    if isinstance(value, dict):
        return value
    path = Path(value) if Path(value).is_file() else ROOT / value
    if not path.is_file():
        raise RecipeError(f"recipe {recipe.path}: sft.deepspeed: {value}: no such file")
    return json.loads(path.read_text())


def memory_plan(recipe: Recipe, config, counts: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """Per GPU: model states from DeepSpeed's estimators (16-bit weights, fp32 Adam),
    frozen base weights for LoRA, and activations at the layer boundaries gradient
    checkpointing keeps plus the logits (our rough figure: DeepSpeed has none)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    zero = deepspeed_config(recipe).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") != "none"
    offload_params = (zero.get("offload_param") or {}).get("device", "none") != "none"
    gpus = recipe.plan.gpus
    per_node = min(gpus, recipe.plan.gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    lora = counts["adapter"] is not None
    trainable = counts["adapter"] if lora else counts["parameters"]
    if stage == 3:
        _, states, _ = estimate_zero3_model_states_mem_needs(
            trainable, counts["largest_layer"], per_node, nodes, offload_optimizer, offload_params)
        what = f"ZeRO-3 over {gpus} GPU(s)"
    elif stage in (1, 2):
        _, states = estimate_zero2_model_states_mem_needs(trainable, per_node, nodes, offload_optimizer)
        what = f"ZeRO-{stage} over {gpus} GPU(s)"
    else:  # no ZeRO: every GPU holds all of it, as ZeRO-2 on one GPU does
        _, states = estimate_zero2_model_states_mem_needs(trainable, 1, 1, False)
        what = "no ZeRO (every GPU holds everything)"
    frozen = 0
    if lora:  # the base weights in the model's dtype, sharded only under ZeRO-3
        width = 4 if recipe.model.dtype in ("float32", "auto") else 2
        frozen = 0 if offload_params else counts["parameters"] * width / (gpus if stage == 3 else 1)
    tokens = sft_value(recipe, "per_device_train_batch_size") * (training["max_length"] or 0)
    kept = config.num_hidden_layers * config.hidden_size * 2 if sft_value(recipe, "gradient_checkpointing") \
        else config.num_hidden_layers * config.hidden_size * 2 * 16  # ~16 hidden-sized tensors per layer
    activations = tokens * (kept + config.vocab_size * 8)  # logits: 16-bit, fp32 loss copy, its gradient
    total = (states + frozen + activations) / GB
    parts = [f"{'adapter' if lora else 'model'} states {states / GB:.1f}"]
    if lora:
        parts.append(f"frozen base {frozen / GB:.1f}")
    parts.append(f"activations ~{activations / GB:.1f}")
    return {"per_gpu_gb": round(total, 1), "states_gb": round(states / GB, 2), "frozen_base_gb": round(frozen / GB, 2),
            "activations_gb": round(activations / GB, 2), "zero_stage": stage,
            "offload": {"optimizer": offload_optimizer, "params": offload_params},
            "what": f"{what}: {', '.join(parts)}"}


# ---------------------------------------------------------------------- time
def time_plan(recipe, generation, training, rl, evaluation) -> dict[str, float | None]:
    figures = recipe.plan
    new_tokens = sum(row["new_tokens_max"] for row in generation.values())
    eval_tokens = sum(s["tokens"] for s in evaluation["suites"].values()) * evaluation["models"]
    trained = training["tokens_trained_max"]

    def hours(tokens, rate):
        return None if rate is None else round(tokens / rate / 3600, 2)

    train_rate = None if figures.train_tokens_per_s_per_gpu is None else figures.train_tokens_per_s_per_gpu * figures.gpus
    times = {"generate_h": hours(new_tokens, figures.teacher_tokens_per_s), "train_h": hours(trained, train_rate)}
    if rl["enabled"]:
        # The policy's own sampling at the teacher's rate (an engine of the same kind),
        # then the update at the training rate.
        sample, update = hours(rl["generated_tokens_max"], figures.teacher_tokens_per_s), \
            hours(rl["tokens_trained_max"], train_rate)
        times["grpo_h"] = None if None in (sample, update) else round(sample + update, 2)
    times["eval_h"] = hours(eval_tokens, figures.eval_tokens_per_s)
    return times


# ----------------------------------------------------------------- refusals
def check_window(recipe: Recipe, config, refused: list[str]) -> None:
    limit = window(config)
    if not limit:
        return
    asked = {"sft.max_length": [sft_value(recipe, "max_length") or 0],
             "eval.length_buckets": recipe.eval.length_buckets}
    if recipe.dpo_enabled and recipe.dpo.get("max_length"):
        asked["dpo.max_length"] = [recipe.dpo["max_length"]]
    for name in ("doc_qa", "needle"):
        buckets = ((recipe.raw.get("generate") or {}).get(name) or {}).get("length_buckets")
        if buckets:
            asked[f"generate.{name}.length_buckets"] = buckets
    for key, values in asked.items():
        if max(values, default=0) > limit:
            refused.append(f"{key}: {max(values):,} tokens is beyond the student's window of "
                           f"{limit:,} (max_position_embeddings)")


def check_packing(recipe: Recipe, config, refused: list[str]) -> None:
    """Packing is exact only where each conversation's Mamba state restarts
    (pipeline/mamba_packing.py), and never with TRL's `wrapped` strategy, which cuts
    conversations across rows."""
    from pipeline.mamba_packing import packing_supported
    from pipeline.student import has_mamba_layers

    key = "sft.packing" if sft_value(recipe, "packing") else "sft.padding_free" \
        if sft_value(recipe, "padding_free") else None
    if key is None:
        return
    if sft_value(recipe, "packing") and sft_value(recipe, "packing_strategy") == "wrapped":
        refused.append("sft.packing_strategy: wrapped cuts conversations across rows; use bfd (exact)")
    reason = packing_supported(config.model_type) if has_mamba_layers(config) else None
    if reason is not None:
        refused.append(f"{key}: cannot be exact: {reason}; use packing: false")


# -------------------------------------------------------------------- output
def _k(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def render(p: dict[str, Any]) -> str:
    s, t, m, hw = p["student"], p["train"], p["memory"], p["hardware"]
    lines = [f"posttrain plan {p['recipe']}: {hw['gpus']} GPU(s) x {hw['gpu_memory_gb']:g} GB",
             f"student    {s['model_type']} from {s['source']}: {_k(s['parameters'])} parameters, "
             f"window {s['window']:,}" + (f", LoRA adapter {_k(s['adapter'])}" if s["adapter"] else ""),
             "generate   prompts  candidates  teacher seqs  prompt tok  new tok (max)"]
    for name, row in p["generate"].items():
        scaled = f"  ~ scaled from {row['scaled_from']} prompts" if row["scaled_from"] else ""
        lines.append(f"  {name:<12} {row['prompts']:>6} {row['candidates']:>11} {row['teacher_sequences']:>13} "
                     f"{_k(row['prompt_tokens']):>11} {_k(row['new_tokens_max']):>14}{scaled}")
    lines.append(f"train      {t['mode']}, max_length {t['max_length']:,}, "
                 f"{'packed (exact)' if t['packing'] else 'padded'}: <= {t['records_max']:,} records "
                 f"({t['records_over_max_length']:,} over max_length), <= {_k(t['tokens_per_epoch_max'])} "
                 f"tokens/epoch in {t['rows_per_epoch']:,} rows")
    lines.append(f"           {t['steps']:,} steps ({t['steps_from']}), global batch {t['global_batch']}")
    g = p["grpo"]
    if g["enabled"]:
        lines.append(f"grpo       {g['prompts_total']:,} prompts ({', '.join(f'{k} {v}' for k, v in g['prompts'].items())}), "
                     f"~{g['mean_prompt_tokens']:.0f} tokens each; {g['steps']:,} steps ({g['steps_from']}) x "
                     f"{g['completions_per_step']} completions ({g['num_generations']} per prompt), "
                     f"<= {_k(g['generated_tokens_max'])} tokens sampled")
    suites = p["eval"]["suites"]
    parts = []
    for name, row in suites.items():
        if "lengths" in row:
            parts.append(f"{name} {row['tasks']} tasks x {len(row['lengths'])} lengths "
                         f"({', '.join(_k(n) for n in row['lengths'])}) x {row['per_task_and_length']} = {row['items']:,}")
        else:
            parts.append(f"{name} {row['items']:,}")
    lines.append(f"eval       items: {'; '.join(parts)}; x {p['eval']['models']} models")
    lines.append(f"memory     {m['per_gpu_gb']:.1f} GB per GPU: {m['what']} (DeepSpeed estimators)")
    times = p["time"]
    lines.append("time       " + ", ".join(
        f"{k[:-2]} {'?' if v is None else f'~{v:g} h'}" for k, v in times.items())
        + ("  (? = no figure in plan:)" if None in times.values() else ""))
    lines.append("refused    " + (f"{len(p['refused'])}, one line each below" if p["refused"] else "nothing"))
    return "\n".join(lines)
