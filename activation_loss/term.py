"""The activation loss (Jamba-1.5, arXiv 2408.12570 §3.2): alpha times the mean square
of selected activations, added to the training loss so that no activation grows past
FP16's range (65,504). The paper used alpha = 1e-5 on expert and last-Mamba-layer
outputs and brought maxima from ~4e6 down to 2-3K with no loss in quality.

How it is wired (sft/trainer.py, for SFT, DPO and any TRL trainer):
    penalty = ActivationLoss(model, recipe.activation_loss)
    trainer = with_activation_loss(SFTTrainer)(..., activation_loss=penalty,
                                               callbacks=[ActivationLossCallback(penalty)])
    penalty.attach(trainer.model)          # PEFT / DeepSpeed-wrapped or plain
    ... compute_loss: loss + penalty.term(global_step)

Why hooks only *store* outputs and the term is computed in `compute_loss`:
computing inside a hook breaks gradient checkpointing (the recompute sees different
saved tensors: CheckpointError). Under checkpointing every checkpointed layer runs
twice per step: the forward, then the recompute during backward. A forward pre-hook
on the root model opens recording; `term()` takes the stored outputs and closes it,
so the recompute (which runs inside backward, after `term()`) stores nothing and each
site counts once per step. With *reentrant* checkpointing the stored outputs carry no
gradient and the term would silently do nothing; sft/trainer.py forces non-reentrant.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from activation_loss.sites import SITE_KINDS, Site, SiteRecorder, find_sites
from pipeline.recipe import ActivationLossSection

log = logging.getLogger(__name__)


def real_token_outputs(outputs, token_index, real_tokens):
    """Each site's output restricted to real tokens: rows of (batch, length, hidden)
    outputs where the attention mask is 1; for an expert, the routed tokens that are real."""
    if real_tokens is None or bool(real_tokens.all()):
        return outputs
    flat = real_tokens.reshape(-1)
    kept = {}
    for site, value in outputs.items():
        if site in token_index:
            keep = flat[token_index[site]]
        elif value.shape[:2] == real_tokens.shape:
            keep = real_tokens
        else:
            raise ValueError(f"activation loss: {site.name} output {tuple(value.shape)} does not "
                             f"line up with the attention mask {tuple(real_tokens.shape)}")
        real = value[keep]
        if real.numel():  # an expert that saw only padding drops out, as in a packed batch
            kept[site] = real
    return kept


class ActivationLoss:
    def __init__(self, model: nn.Module, cfg: ActivationLossSection):
        self.cfg = cfg
        self.recorder = SiteRecorder(cfg.sites, cfg.last_n_mamba)
        self._root_handle = None
        self.last_term: float | None = None
        self._last_term_tensor: torch.Tensor | None = None
        # Maxima kept as tensors (no device sync per step); floats only when logged.
        self._seen_max: dict[Site, torch.Tensor] = {}
        self._window_max: dict[str, torch.Tensor] = {}
        self._window_terms: list[torch.Tensor] = []
        self._real_tokens: torch.Tensor | None = None
        self.last_site_count = 0
        if self.enabled:
            sites = find_sites(model, cfg.sites, cfg.last_n_mamba)
            missing = sorted(set(cfg.sites) - {site.kind for site, _ in sites})
            if missing:
                raise ValueError(
                    f"activation_loss.sites: {type(model).__name__} has no {missing} sites "
                    f"(class names searched: *SparseMoeBlock, *Experts, *MambaMixer, layers.N)"
                )
            log.info("activation loss: alpha %g on %d sites (%s)", cfg.alpha, len(sites),
                     ", ".join(f"{k}: {sum(s.kind == k for s, _ in sites)}" for k in cfg.sites))

    @property
    def enabled(self) -> bool:
        return self.cfg.alpha > 0

    # ----------------------------------------------------------------- hooks
    def attach(self, model: nn.Module) -> None:
        """Hook the (possibly PEFT/DeepSpeed-wrapped) model. alpha = 0 attaches nothing."""
        if not self.enabled:
            return
        self.recorder.attach(model)
        self._root_handle = model.register_forward_pre_hook(self._open, with_kwargs=True)

    def detach(self) -> None:
        self.recorder.detach()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None

    def _open(self, module, args, kwargs) -> None:
        # A new forward of the whole model: record it if it is a training forward that
        # builds a graph. A no-grad forward (metrics, logits recomputed for logging)
        # must not replace the stored outputs, or the term would carry no gradient.
        if not torch.is_grad_enabled():
            self.recorder.recording = False
            return
        self.recorder.outputs = {}
        self.recorder.token_index = {}
        self.recorder.recording = module.training
        # Padded batches: the term and the maxima see real tokens only. (Padding-free
        # packing sends no mask: every position is a real token.)
        mask = kwargs.get("attention_mask")
        self._real_tokens = mask.bool() if mask is not None and mask.dim() == 2 else None

    # ------------------------------------------------------------------ term
    def alpha_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.start_step:
            return 0.0
        if cfg.warmup_steps <= 0:
            return cfg.alpha
        return cfg.alpha * min(1.0, (step - cfg.start_step + 1) / cfg.warmup_steps)

    def term(self, step: int) -> torch.Tensor | None:
        """alpha(step) * reduction over sites of mean(activation^2), from the outputs the
        last forward stored; None when inactive. Clears the stored outputs."""
        token_index = self.recorder.token_index
        outputs = self.recorder.take()
        if not outputs:
            return None
        outputs = real_token_outputs(outputs, token_index, self._real_tokens)
        self.last_site_count = len(outputs)
        with torch.no_grad():
            for site, value in outputs.items():
                low, high = torch.aminmax(value.detach())  # one pass, no |x| temporary
                peak = torch.maximum(high.abs(), low.abs()).float()
                seen = self._seen_max.get(site)
                self._seen_max[site] = peak if seen is None else torch.maximum(seen, peak)
                window = self._window_max.get(site.kind)
                self._window_max[site.kind] = peak if window is None else torch.maximum(window, peak)
        alpha = self.alpha_at(step)
        if alpha == 0:
            return None
        # ||x||^2 / n: one fused pass, no x^2 temporary kept for backward.
        squares = torch.stack([
            torch.linalg.vector_norm(value, dtype=torch.float32).square() / value.numel()
            for value in outputs.values()
        ])
        if self.cfg.reduction == "mean":
            reduced = squares.mean()
        elif self.cfg.reduction == "sum":
            reduced = squares.sum()
        else:
            reduced = squares.max()
        term = alpha * reduced
        self._last_term_tensor = term.detach()
        self._window_terms.append(self._last_term_tensor)
        return term

    # -------------------------------------------------------------- reports
    def log_values(self) -> dict[str, float]:
        """Since the last call: mean term and max |activation| per site kind."""
        values: dict[str, float] = {}
        if self._window_terms:
            values["activation_loss"] = torch.stack(self._window_terms).mean().item()
        for kind in SITE_KINDS:
            if kind in self._window_max:
                values[f"activation_max_{kind}"] = self._window_max[kind].item()
        self._window_terms, self._window_max = [], {}
        return values

    def summary(self) -> dict[str, Any]:
        last = self._last_term_tensor.item() if self._last_term_tensor is not None else None
        by_kind: dict[str, float] = {}
        for site, peak in self._seen_max.items():
            by_kind[site.kind] = max(by_kind.get(site.kind, 0.0), peak.item())
        return {
            "alpha": self.cfg.alpha,
            "sites": list(self.cfg.sites),
            "reduction": self.cfg.reduction,
            "last_term": last,
            "max_abs": by_kind,
        }

    def layer_stats(self) -> dict[str, dict[str, float]]:
        """Per site kind, per layer ("3") or layer.expert ("3.1"): max |activation| seen."""
        stats: dict[str, dict[str, float]] = {}
        for site in sorted(self._seen_max):
            value = self._seen_max[site].item()
            stats.setdefault(site.kind, {})[site.key] = value if math.isfinite(value) else None
        return stats


class ActivationLossCallback(TrainerCallback):
    """Puts the term and max |activation| per site kind into every training log (and
    so into `log_history`, whose record Trainer.log appends before calling us)."""

    def __init__(self, penalty: ActivationLoss):
        self.penalty = penalty
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        values = self.penalty.log_values()
        logs.update(values)
        term = values.get("activation_loss", 0.0)
        if not self.warned and args.max_grad_norm and term > 10 * max(logs["loss"] - term, 1e-6):
            # Global-norm clipping scales every gradient by one factor, so a dominant
            # term starves the cross-entropy, and Adam's beta2 remembers those steps
            # (README, "Clipping and a large term").
            self.warned = True
            log.warning(
                "activation loss %.3g is over 10x the rest of the loss: with sft.max_grad_norm "
                "%g, clipping shrinks the cross-entropy's gradient by the same factor as the "
                "term's while the term is this large; consider sft.max_grad_norm: 0 and "
                "sft.adam_beta2: 0.95 until the activations are in range", term, args.max_grad_norm)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
