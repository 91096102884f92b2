"""`posttrain audit RECIPE [--model PATH] --out DIR`: is this model safe to run in FP16?

On a few reference batches (recipe `audit:`; records from audit.data, else data.eval,
else data.train, rendered with the chat template):
  1. an FP32 forward with every site hooked (moe, experts, mamba, decoder layers):
     per-layer, per-site max |activation| over the real (unpadded) tokens;
  2. an FP16 forward of a half-precision copy: max |logit difference| against FP32
     and the count of non-finite logits and activations.
Verdict: fp16-safe unless some FP32 activation exceeds 65,504 (FP16's largest finite
value) or anything is non-finite; the offending sites are listed. Writes
DIR/fp16_audit.json and DIR/fp16_audit.png (per-layer maxima against the 65,504 line).

--model: a trained model folder, a PEFT adapter folder (applied to the recipe's
student and merged), or nothing (the recipe's student as built).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from activation_loss.sites import SITE_KINDS, Site, SiteRecorder
from pipeline.contract import Fp16Audit, read_conversations, write_report
from pipeline.plotting import figure
from pipeline.recipe import Recipe, RecipeError, add_recipe_arguments, check_paths, load_recipe

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--model", default=None,
                        help="trained model folder or adapter folder (default: the recipe's student)")
    parser.add_argument("--out", required=True, help="folder for fp16_audit.json and fp16_audit.png")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    report = audit(recipe, args.model, Path(args.out))
    verdict = "fp16-safe" if report["fp16_safe"] else "NOT fp16-safe"
    print(f"{verdict}: max |activation| {report['max_abs']:.4g}, "
          f"max |logit diff| {report['logits']['max_abs_diff']}, "
          f"offending: {[o['site'] for o in report['offending']] or 'none'}")
    return 0


# ---------------------------------------------------------------------- loading
def load_model(recipe: Recipe, model_path: str | None):
    """(model in float32, eval mode, tokenizer, description of what was loaded)."""
    from pipeline.student import load_for_inference

    model, tokenizer, source = load_for_inference(recipe.model, model_path)
    return on_gpu_if_it_fits(model), tokenizer, source


def on_gpu_if_it_fits(model: nn.Module) -> nn.Module:
    """The audit holds a float32 and a float16 copy: on the GPU when both fit in its
    free memory, else on the host."""
    if not torch.cuda.is_available():
        return model
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info()
    on_gpu = next(model.parameters()).is_cuda
    if size * 1.5 < free + (size if on_gpu else 0):
        return model.cuda()
    log.info("audit: %.1f GB of float32 weights do not fit the GPU twice; auditing on the host",
             size / 1e9)
    return model.cpu()


def audit_batches(recipe: Recipe, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The reference batches: records rendered with the chat template, right-padded."""
    section = recipe.audit
    files = section.data or recipe.data.eval or recipe.data.train
    check_paths(recipe, ["audit.data", "data.eval", "data.train"])
    if not files:
        raise RecipeError(f"recipe {recipe.path}: audit: no data (audit.data, data.eval or data.train)")
    records = [r for f in files for r in read_conversations(f)][: section.num_batches * section.batch_size]
    texts = [tokenizer.apply_chat_template(r.turns(), tools=r.tools, tokenize=False)
             for r in records]
    batches = []
    for start in range(0, len(texts), section.batch_size):
        encoded = tokenizer(texts[start:start + section.batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=section.max_length, add_special_tokens=False)
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


# -------------------------------------------------------------------- measuring
def _peak(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max |value| over real tokens; expert outputs are already per routed token."""
    value = value.detach().float().abs()
    if value.dim() == 3 and value.shape[:2] == mask.shape:
        value = value[mask.bool()]
    return value.amax() if value.numel() else torch.tensor(0.0)


@torch.no_grad()
def measure(model: nn.Module, batches, kinds=SITE_KINDS) -> tuple[dict[Site, float], list[torch.Tensor]]:
    """Per-site max |activation| over the batches, and each batch's logits."""
    recorder = SiteRecorder(kinds)
    recorder.attach(model)
    peaks: dict[Site, float] = {}
    logits = []
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            recorder.recording = True
            logits.append(model(**batch).logits.float().cpu())
            for site, value in recorder.take().items():
                peak = _peak(value, batch["attention_mask"]).item()
                peaks[site] = peak if site not in peaks else _worse(peaks[site], peak)
    finally:
        recorder.detach()
    return peaks, logits


def _worse(a: float, b: float) -> float:
    """max() that keeps a NaN (max drops it depending on order): NaN marks a site unsafe."""
    return a if a != a else b if b != b else max(a, b)


def half_copy(model: nn.Module) -> nn.Module:
    """A float16 copy of the model that can run forward.

    mambapy's parallel scan fails with half-precision weights (dtype mismatch), so the
    copy uses transformers' reference scan, which keeps the recurrence in float32 and
    casts where a half kernel would. Unlike autocast, half weights make every linear,
    residual add and expert output a real FP16 tensor — the case an FP16 deployment
    hits — so an overflow shows up as inf here rather than being absorbed by an FP32
    residual stream.
    """
    half = copy.deepcopy(model)
    for module in half.modules():
        if hasattr(module, "use_mambapy"):
            module.use_mambapy = False
    return half.half().eval()


def audit(recipe: Recipe, model_path: str | None, out_dir: Path) -> dict[str, Any]:
    torch.manual_seed(recipe.model.seed)
    model, tokenizer, source = load_model(recipe, model_path)
    batches = audit_batches(recipe, tokenizer)
    limit = recipe.audit.fp16_limit

    peaks32, logits32 = measure(model, batches)
    peaks16, logits16 = measure(half_copy(model), batches)

    diff, nonfinite16, nonfinite32 = 0.0, 0, 0
    for batch, l32, l16 in zip(batches, logits32, logits16):
        mask = batch["attention_mask"].bool()
        l32, l16 = l32[mask], l16[mask]
        nonfinite32 += int((~torch.isfinite(l32)).sum())
        nonfinite16 += int((~torch.isfinite(l16)).sum())
        both = torch.isfinite(l32) & torch.isfinite(l16)
        if both.any():
            diff = max(diff, (l32[both] - l16[both]).abs().max().item())

    offending = []
    for site, peak in sorted(peaks32.items()):
        peak16 = peaks16.get(site, 0.0)
        reasons = []
        if not peak == peak or peak == float("inf"):
            reasons.append("non-finite in fp32")
        elif peak > limit:
            reasons.append(f"fp32 max {peak:.4g} > {limit:g}")
        if not (peak16 == peak16 and peak16 != float("inf")):
            reasons.append("non-finite in fp16")
        if reasons:
            offending.append({"site": site.name, "kind": site.kind, "layer": site.layer,
                              "expert": site.expert, "max_abs_fp32": _json_float(peak),
                              "reason": "; ".join(reasons)})

    per_layer: dict[str, dict[str, float | None]] = {}
    for site, peak in sorted(peaks32.items()):
        per_layer.setdefault(site.kind, {})[site.key] = _json_float(peak)
    finite_peaks = [p for p in peaks32.values() if p == p and p != float("inf")]
    report = {
        "model": source,
        "fp16_safe": not offending and nonfinite16 == 0 and nonfinite32 == 0,
        "fp16_limit": limit,
        "offending": offending,
        "max_abs": max(finite_peaks) if len(finite_peaks) == len(peaks32) else float("inf"),
        "max_abs_by_kind": {kind: max((v for v in layers.values() if v is not None), default=None)
                            for kind, layers in per_layer.items()},
        "max_abs_per_layer": per_layer,
        "logits": {"max_abs_diff": _json_float(diff), "nonfinite_fp16": nonfinite16,
                   "nonfinite_fp32": nonfinite32},
        "fp16_path": "half-precision weights, reference Mamba scan (mambapy fails with half weights)",
        "batches": len(batches),
        "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(out_dir / "fp16_audit.json", Fp16Audit, report)  # an inf max_abs is written as null
    plot(per_layer, limit, out_dir / "fp16_audit.png", title=f"{source}: "
         + ("fp16-safe" if report["fp16_safe"] else "NOT fp16-safe"))
    log.info("audit: %s, max |activation| %.4g, %d offending sites; wrote %s",
             "fp16-safe" if report["fp16_safe"] else "NOT fp16-safe", report["max_abs"],
             len(offending), out_dir / "fp16_audit.json")
    return report


def _json_float(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def plot(per_layer: dict[str, dict[str, float | None]], limit: float, path: Path, title: str) -> None:
    """Bars: per layer, the max |activation| of each site kind (experts: the max over
    the layer's experts), log scale, with FP16's limit drawn across."""
    kinds = [k for k in SITE_KINDS if k in per_layer]
    layer_max: dict[str, dict[int, float]] = {}
    for kind in kinds:
        for key, value in per_layer[kind].items():
            layer = int(key.split(".")[0])
            shown = limit * 10 if value is None else max(value, 1e-8)  # non-finite: above the line
            layer_max.setdefault(kind, {})[layer] = max(layer_max.get(kind, {}).get(layer, 0.0), shown)
    layers = sorted({layer for values in layer_max.values() for layer in values})
    with figure(path, (max(6, len(layers) * 0.6), 4)) as (fig, ax):
        width = 0.8 / max(1, len(kinds))
        for i, kind in enumerate(kinds):
            xs = [layer + (i - (len(kinds) - 1) / 2) * width for layer in layers if layer in layer_max[kind]]
            ys = [layer_max[kind][layer] for layer in layers if layer in layer_max[kind]]
            ax.bar(xs, ys, width=width, label=kind)
        ax.axhline(limit, color="red", linestyle="--", label=f"fp16 max {limit:,.0f}")
        ax.set_yscale("log")
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("max |activation| (fp32)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
