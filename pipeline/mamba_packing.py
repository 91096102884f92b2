"""Exact sequence packing for Jamba's Mamba layers.

Packed rows (TRL `packing: true` / `padding_free: true`) hold several conversations.
Attention already keeps them apart: with no attention mask and no cache, transformers
builds a block-diagonal mask from `position_ids` that restart at 0. The Mamba mixer
does not: transformers' Jamba decoder layer hands it no boundaries, so its causal conv
and its SSM state run from one conversation into the next (packed logits off by ~1e-1).

`enable_packing(model)` (called by `load_student`) makes the mixer exact without
forking transformers or mamba-ssm:

- a forward pre-hook on every `JambaMambaDecoderLayer` reads the boundaries from what
  the layer receives anyway (the collator's `seq_idx`, else `cu_seq_lens_q`, else
  `position_ids` restarting at 0) and publishes them for the duration of that layer's
  forward (also during gradient checkpointing's recompute, which reruns the hooks);
- the mixer calls `causal_conv1d_fn` and `mamba_selective_scan` by their module-level
  names on every call, so wrappers installed there see the boundaries:
  * conv: a tap whose source token belongs to another sequence reads zero
    (causal-conv1d's `seq_idx` semantics; the CUDA kernel is given `seq_idx` itself);
  * scan: the scan has no reset flag (the CUDA `selective_scan_fn` neither), so the
    reset travels in its inputs. At each sequence start the raw dt becomes H = 2^40:
    the decay exp(softplus(H + bias) * A) underflows to exactly 0, so the state
    restarts; u is scaled by softplus(dt + bias) / H there so dt * B * u (the state's
    fresh input) is unchanged, and the skip term's difference D * (u - u') * silu(z)
    is added back to the output. The same transformation runs on every path
    (transformers' reference scan, mambapy's parallel scan, the CUDA kernel), so the
    CPU tests check the kernel path's arithmetic too.

Without boundaries (one sequence per row, or any forward with a cache: generation)
the original functions run untouched. The wrapped functions and classes are checked
against the transformers versions this was verified on; elsewhere packed input fails
with an error instead of leaking.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# transformers versions whose Jamba mixer / decoder layer this was checked against.
SUPPORTED_TRANSFORMERS = ">=5.19.0,<5.20"
# Model types whose Mamba layers get boundaries here.
PACKING_MODEL_TYPES = {"jamba"}
# A huge raw dt at sequence starts: exp(H * A) underflows in fp32 for |A| >= ~104 / H,
# and H + dt_bias rounds to H for |dt_bias| < 2^16.
RESET_DT = float(2**40)
_EXP_UNDERFLOW = 104.0

_current = threading.local()  # the sequence index of the Mamba layer running now
_last_index: tuple | None = None  # (weakref to the tensor it came from, index)


class PackingUnsupported(RuntimeError):
    """Packed input reached Mamba layers whose boundaries cannot be honoured."""


# ----------------------------------------------------------------- boundaries
def sequence_index(
    position_ids: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """(batch, length) int64 index of each token's sequence within its row, or None
    when every row holds one sequence (nothing to reset)."""
    if seq_idx is not None:
        index = seq_idx.long()
        if index.dim() == 1:
            index = index[None]
        return index - index[:, :1]
    if cu_seq_lens is not None:
        lengths = cu_seq_lens.long().diff()
        index = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        return index[None] if lengths.numel() > 1 else None
    if position_ids is None:
        return None
    if position_ids.dim() == 3:  # rotary variants with one row per axis: any works
        position_ids = position_ids[0]
    starts = position_ids == 0
    starts[:, 0] = True
    if not bool(starts[:, 1:].any()):
        return None
    return starts.long().cumsum(-1) - 1


def _index_from_kwargs(kwargs: dict) -> torch.Tensor | None:
    """The boundaries of a decoder layer's call, computed once per model forward: every
    layer (and every checkpoint recompute) receives the same tensors."""
    global _last_index
    for name, argument in (("seq_idx", "seq_idx"), ("cu_seq_lens_q", "cu_seq_lens"),
                           ("position_ids", "position_ids")):
        source = kwargs.get(name)
        if source is not None:
            break
    else:
        return None
    if _last_index is not None and _last_index[0]() is source:
        return _last_index[1]
    index = sequence_index(**{argument: source})
    _last_index = (weakref.ref(source), index)
    return index


def current_sequence_index() -> torch.Tensor | None:
    return getattr(_current, "index", None)


def _open_layer(module, args, kwargs):
    # A forward with a cache (generation, or a prefill that fills one) keeps
    # transformers' behaviour: the cache carries state by design.
    with_cache = kwargs.get("past_key_values") is not None or kwargs.get("use_cache")
    _current.index = None if with_cache else _index_from_kwargs(kwargs)


def _close_layer(module, args, kwargs, output):
    _current.index = None


def _refuse_packed(module, args, kwargs):
    with_cache = kwargs.get("past_key_values") is not None or kwargs.get("use_cache")
    if not with_cache and _index_from_kwargs(kwargs) is not None:
        raise PackingUnsupported(
            f"packed input (several sequences per row) reached {type(module).__name__}, "
            f"but sequence boundaries are handled only for transformers {SUPPORTED_TRANSFORMERS} "
            f"(this is {_transformers_version()}): the Mamba state would leak across "
            "sequences. Turn sft.packing / sft.padding_free off or use a supported version."
        )


# ------------------------------------------------------------------ the conv
def masked_causal_conv1d(x, weight, bias, activation, index):
    """Depthwise causal conv (x: batch, channels, length; weight: channels, taps) in
    which tap k reads zero where the token k steps back belongs to another sequence."""
    from transformers.activations import ACT2FN

    x = x.to(weight.dtype)
    length = x.shape[-1]
    taps = weight.shape[-1]
    out = x * weight[:, taps - 1, None]
    for shift in range(1, min(taps, length)):
        same = index[:, shift:] == index[:, :-shift]  # (batch, length - shift)
        source = x[..., :-shift] * same[:, None, :]
        out = out + F.pad(source * weight[:, taps - 1 - shift, None], (shift, 0))
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out


def _on_kernel(x: torch.Tensor, package: str) -> bool:
    if not x.is_cuda:
        return False
    from transformers.utils import import_utils

    check = {"causal_conv1d": import_utils.is_causal_conv1d_available,
             "mamba_ssm": import_utils.is_mamba_ssm_available}[package]
    return check()


def _make_conv(original):
    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        index = current_sequence_index()
        if index is None:
            return original(hidden_states, weight, bias, activation=activation, **kwargs)
        if _on_kernel(hidden_states, "causal_conv1d"):
            # causal-conv1d honours seq_idx natively, for channel-last input only.
            channel_last = hidden_states.transpose(1, 2).contiguous().transpose(1, 2)
            return original(channel_last, weight, bias, activation=activation,
                            seq_idx=index.to(torch.int32).contiguous())
        return masked_causal_conv1d(hidden_states, weight, bias, activation, index).to(hidden_states.dtype)

    causal_conv1d_fn._posttrain_original = original
    return causal_conv1d_fn


# ------------------------------------------------------------------ the scan
def reset_inputs(u, dt, A, D, z, delta_bias, delta_softplus, index):
    """The scan inputs that restart the state at every sequence start, plus the output
    correction that undoes the skip term's change there. Half-precision inputs come
    back as float32 (the kernel accepts any dtype shared by u, dt, B, C, z)."""
    min_decay = float(A.detach().abs().min())
    if RESET_DT * min_decay < _EXP_UNDERFLOW:
        raise PackingUnsupported(
            f"a Mamba channel decays too slowly (|A| = {min_decay:.3g}) for the reset at "
            "sequence starts to be exact; train without packing"
        )
    u, dt = u.float(), dt.float()
    z = z.float() if z is not None else None
    starts = torch.ones_like(index, dtype=torch.bool)
    starts[:, 1:] = index[:, 1:] != index[:, :-1]
    starts = starts[:, None, :]  # (batch, 1, length) against (batch, channels, length)
    step = dt + delta_bias.float()[:, None] if delta_bias is not None else dt
    if delta_softplus:
        step = F.softplus(step)
    new_u = torch.where(starts, u * (step / RESET_DT), u)
    new_dt = torch.where(starts, RESET_DT, dt)
    correction = None
    if D is not None:
        correction = (u - new_u) * D.float()[:, None]
        if z is not None:
            correction = correction * F.silu(z)
        correction = correction * starts
    return new_u, new_dt, z, correction


def _make_scan(original):
    def mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False, **kwargs):
        index = current_sequence_index()
        if index is None:
            return original(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                            delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
        u, new_dt, z, correction = reset_inputs(hidden_states, dt, A, D, z, delta_bias, delta_softplus, index)
        result = original(u, new_dt, A, B.float(), C.float(), D=D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
        if correction is None:
            return result
        if return_last_state:
            return result[0] + correction, result[1]
        return result + correction

    mamba_selective_scan._posttrain_original = original
    return mamba_selective_scan


# --------------------------------------------------------------- installation
def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def unsupported_reason() -> str | None:
    """Why this transformers cannot take the boundary wrappers, or None when it can."""
    from packaging.specifiers import SpecifierSet

    version = _transformers_version()
    if version not in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True):
        return f"transformers {version} is outside {SUPPORTED_TRANSFORMERS}, the versions checked"
    from transformers.models.jamba import modeling_jamba as mj

    names = set(inspect.unwrap(mj.JambaMambaMixer.forward).__code__.co_names)
    missing = {"causal_conv1d_fn", "mamba_selective_scan"} - names
    if missing or not all(hasattr(mj, n) for n in ("causal_conv1d_fn", "mamba_selective_scan")):
        return "JambaMambaMixer no longer calls module-level causal_conv1d_fn / mamba_selective_scan"
    if "position_ids" not in inspect.signature(mj.JambaMambaDecoderLayer.forward).parameters:
        return "JambaMambaDecoderLayer.forward no longer receives position_ids"
    return None


def packing_supported(model_type: str) -> str | None:
    """None when packed training is exact for this model type, else why not."""
    if model_type not in PACKING_MODEL_TYPES:
        return (f"model type {model_type!r} has Mamba layers whose sequence boundaries this "
                f"project does not handle (handled: {', '.join(sorted(PACKING_MODEL_TYPES))})")
    return unsupported_reason()


def _install_functions() -> None:
    from transformers.models.jamba import modeling_jamba as mj

    if not hasattr(mj.causal_conv1d_fn, "_posttrain_original"):
        mj.causal_conv1d_fn = _make_conv(mj.causal_conv1d_fn)
    if not hasattr(mj.mamba_selective_scan, "_posttrain_original"):
        mj.mamba_selective_scan = _make_scan(mj.mamba_selective_scan)


def enable_packing(model) -> str:
    """Make every Jamba Mamba layer in `model` honour packed-sequence boundaries.
    Returns "exact", "refused" (unsupported version: packed input raises) or "none"
    (no Jamba Mamba layers). Idempotent."""
    layers = [m for m in model.modules() if type(m).__name__ == "JambaMambaDecoderLayer"]
    if not layers:
        return "none"
    reason = unsupported_reason()
    if reason is None:
        _install_functions()
    else:
        log.warning("packed input will be refused by the Mamba layers: %s", reason)
    for layer in layers:
        if getattr(layer, "_posttrain_packing", None):
            continue
        if reason is None:
            layer.register_forward_pre_hook(_open_layer, with_kwargs=True)
            layer.register_forward_hook(_close_layer, with_kwargs=True, always_call=True)
        else:
            layer.register_forward_pre_hook(_refuse_packed, with_kwargs=True)
        layer._posttrain_packing = "exact" if reason is None else "refused"
    return "exact" if reason is None else "refused"
