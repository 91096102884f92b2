"""`posttrain export RECIPE --model outputs/sft/final --out outputs/export`.

Turns a trained model into the folders people serve, and proves each one by reloading
it from disk and comparing its logits with the in-memory model on fixed inputs:

  adapter  the LoRA adapter in PEFT format (adapter_config.json +
           adapter_model.safetensors) + tokenizer
  merged   the adapter merged into the base: a plain model folder (weights, config,
           tokenizer) that loads with AutoModelForCausalLM
  vllm     the adapter without what vLLM cannot serve for Jamba LoRA: the routed
           experts (vLLM PR 14370). Compared with the in-memory model with those
           adapter weights switched off; the effect of dropping them (max |logit
           diff| against the full adapter) is reported, not a failure.

A profile whose reload differs by more than its tolerance fails the export (exit 1).
Saving and reloading is lossless, so adapter, vllm and a full fine-tune's merged folder
get `export.tolerance` (absolute, default 1e-5). A LoRA `merged` profile is a new
computation: W + s*BA is rounded once per adapted weight in the model's dtype, and that
error scales with the dtype's epsilon and with the logits. It gets export.tolerance +
r * max |logit| with r = `export.merged_relative_tolerance`, by default 256 machine
epsilons of the weights' dtype (fp32: 3.1e-5; bf16: 2.0, where merging cannot be told
from losing a small adapter and the report says so). A corrupted adapter tensor moves
the logits by far more. For a full fine-tune only `merged` applies. A base built from
`model.tiny` (random weights, rebuilt from model.seed) is saved beside the adapters as
`base/`, since no hub holds it. Everything is recorded in OUT/export_report.json.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.contract import ExportReport, write_report
from pipeline.recipe import RecipeError, add_recipe_arguments, load_recipe

log = logging.getLogger(__name__)

# Merge rounding allowance in machine epsilons of the weights' dtype, times max |logit|.
# Rounding W + s*BA once per weight moves the logits by tens of epsilons times their
# scale after a few dozen layers; 256 leaves room for deeper models and other data.
MERGE_EPSILONS = 256

# Fixed inputs for the logit comparison: chat turns rendered with the training template.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Add 12 and 30, then explain why the sum is even."}],
]


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--model", default="outputs/sft/final",
                        help="the trained model or adapter folder (train's final/)")
    parser.add_argument("--out", default="outputs/export", help="export folder")
    parser.add_argument("--report", default=None,
                        help="also write export_report.json here (DVC keeps metrics outside outputs)")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    model_dir, out = Path(args.model), Path(args.out)
    from pipeline.student import check_model_folder, resolve_model_folder

    if not model_dir.exists():
        raise RecipeError(f"--model {model_dir}: no such folder (run posttrain train first)")
    check_model_folder(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    model_dir = resolve_model_folder(model_dir)  # the dpo stage's pointer when DPO is off
    report = export(recipe, model_dir, out)
    if args.report:
        write_report(args.report, ExportReport, report)
    failed = {p: r for p, r in report["profiles"].items() if r.get("passed") is False}
    if failed:
        log.error("export failed: %s; see %s", ", ".join(
            f"{p} max |logit diff| {r['max_abs_logit_diff']:.3g} over tolerance {r['tolerance']:.3g}"
            for p, r in failed.items()), out / "export_report.json")
        return 1
    return 0


def probe_inputs(tokenizer) -> dict[str, torch.Tensor]:
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in PROBE_CONVERSATIONS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items()}
    out = model(**batch).logits.float().cpu()
    return out * inputs["attention_mask"].unsqueeze(-1)  # padding positions do not count


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def merge_tolerance(cfg, reference: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """The merged profile's allowance: absolute + relative * max |logit| (see above)."""
    eps = torch.finfo(dtype).eps
    relative = cfg.merged_relative_tolerance
    if relative is None:
        relative = MERGE_EPSILONS * eps
    scale = float(reference.abs().max())
    return {"tolerance": cfg.tolerance + relative * scale, "logit_scale": scale,
            "relative_tolerance": relative, "dtype": str(dtype).removeprefix("torch."),
            "machine_epsilon": eps}


def expert_lora_params(model) -> dict[str, torch.nn.Parameter]:
    """Adapter weights on routed experts (PEFT ParamWrappers on `experts.*`)."""
    return {n: p for n, p in model.named_parameters()
            if "lora_" in n and ".experts." in n}


class experts_off:
    """Zero the experts' lora_B for the duration (the adapter then adds nothing there)."""

    def __init__(self, model):
        self.params = {n: p for n, p in expert_lora_params(model).items() if "lora_B" in n}
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for name, param in self.params.items():
            self.saved[name] = param.data.clone()
            param.data.zero_()

    def __exit__(self, *exc):
        for name, param in self.params.items():
            param.data.copy_(self.saved[name])


def export(recipe, model_dir: Path, out: Path) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.student import load_student, load_tokenizer

    profiles = list(recipe.export.profiles)
    is_adapter = (model_dir / "adapter_config.json").is_file()
    if (model_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)  # train saves it beside
    else:
        tokenizer = load_tokenizer(recipe.model)
    inputs = probe_inputs(tokenizer)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    report: dict[str, Any] = {
        "model": str(model_dir), "kind": "lora" if is_adapter else "full",
        "tolerance": recipe.export.tolerance, "probe_tokens": int(inputs["attention_mask"].sum()),
        "profiles": {},
    }

    def record(profile: str, path: Path, diff: float, tolerance: float | None = None, **extra) -> None:
        tolerance = recipe.export.tolerance if tolerance is None else tolerance
        passed = diff <= tolerance
        report["profiles"][profile] = {"path": str(path), "max_abs_logit_diff": diff,
                                       "tolerance": tolerance, "passed": passed, **extra}
        log.info("export %s: max |logit diff| %.3g (%s)", profile, diff,
                 "ok" if passed else f"FAILED, tolerance {tolerance:.3g}")

    def base_model():
        return load_student(recipe.model, tokenizer)

    if not is_adapter:
        # ----------------------------------------------------- full fine-tune
        for profile in profiles:
            if profile != "merged":
                report["profiles"][profile] = {"skipped": "full fine-tune: no adapter; "
                                               "only the merged profile applies"}
        if "merged" in profiles:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=recipe.model.dtype)
            reference = logits_of(model, inputs)
            path = out / "merged"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            del model
            reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=recipe.model.dtype)
            record("merged", path, max_diff(reference, logits_of(reloaded, inputs)))
        write_report(out / "export_report.json", ExportReport, report)
        return report

    # ------------------------------------------------------------ LoRA adapter
    base = base_model()
    base_logits = logits_of(base, inputs)
    model = PeftModel.from_pretrained(base, model_dir)
    reference = logits_of(model, inputs)
    # How far the adapter moves the logits: the scale a profile's diff is read against.
    report["adapter_effect_max_abs_logit_diff"] = max_diff(reference, base_logits)
    dropped = sorted(expert_lora_params(model))
    with experts_off(model):
        reference_vllm = logits_of(model, inputs)
    base_path = None
    if recipe.model.tiny is not None:
        # Random weights from a config: ship the base so the adapter can be used.
        base_path = out / "base"
        shipped = base_model()  # a clean copy: `base` now carries the adapter
        shipped.save_pretrained(base_path)
        tokenizer.save_pretrained(base_path)
        del shipped
        model.peft_config["default"].base_model_name_or_path = str(base_path)

    if "adapter" in profiles:
        path = out / "adapter"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        reloaded = PeftModel.from_pretrained(base_model(), path)
        record("adapter", path, max_diff(reference, logits_of(reloaded, inputs)))
        del reloaded

    if "vllm" in profiles:
        path = out / "vllm"
        write_vllm_adapter(model, path)
        tokenizer.save_pretrained(path)
        reloaded = PeftModel.from_pretrained(base_model(), path)
        record("vllm", path, max_diff(reference_vllm, logits_of(reloaded, inputs)),
               dropped_weights=[n.replace("base_model.model.", "", 1) for n in dropped],
               dropped_params=sum(int(p.numel()) for p in expert_lora_params(model).values()),
               drop_effect_max_abs_logit_diff=max_diff(reference, reference_vllm),
               note="routed-expert LoRA dropped: vLLM serves Jamba LoRA on attention and "
                    "Mamba projections, not on MoE experts (vLLM PR 14370)")
        del reloaded

    if "merged" in profiles:
        path = out / "merged"
        device = next(model.parameters()).device
        merged = model.merge_and_unload()  # last: merging rewrites the base in place
        rule = merge_tolerance(recipe.export, reference, next(merged.parameters()).dtype)
        merged.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del merged, model
        # Compared on the device the reference ran on: a host forward against a GPU
        # one would measure kernel differences, not the export.
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=recipe.model.dtype).to(device)
        diff = max_diff(reference, logits_of(reloaded, inputs))
        effect = report["adapter_effect_max_abs_logit_diff"]
        if rule["tolerance"] >= effect:
            rule["note"] = (f"the merge allowance ({rule['tolerance']:.3g}) is not below the "
                            f"adapter's own effect ({effect:.3g}): at {rule['dtype']} this check "
                            f"cannot tell merge rounding from a lost adapter")
            log.warning("export merged: %s", rule["note"])
        record("merged", path, diff, share_of_adapter_effect=diff / effect if effect else None, **rule)

    write_report(out / "export_report.json", ExportReport, report)
    return report


def write_vllm_adapter(model, path: Path) -> None:
    """Save the adapter without routed-expert weights and without target_parameters."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config["default"])
    config.target_parameters = None
    state = get_peft_model_state_dict(model)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items() if ".experts." not in k}
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
