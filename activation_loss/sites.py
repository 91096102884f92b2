"""Where activations are captured: the sites of a hybrid model, found by class and name.

Four kinds of site (recipe `activation_loss.sites`):
  moe      the output of each MoE block (`layers.{i}.feed_forward`, a *SparseMoeBlock)
  experts  each routed expert's own output, before its routing weight
  mamba    the output of each Mamba mixer (`layers.{i}.mamba`)
  layers   the output of each decoder layer (`layers.{i}`)

Sites are found by class name and by the `layers.{i}` part of the module's name, so
the same code finds them inside a PEFT model (`base_model.model.model.layers.3.mamba`)
or a DeepSpeed engine (`module.…`), neither of which replaces these modules.

transformers 5.x has no module per expert: the experts of a layer are one module with
fused 3-D weights. Per-expert outputs are captured by an extra experts implementation
registered in `ALL_EXPERTS_FUNCTIONS` (the eager per-expert loop of `JambaExperts`,
which also hands each expert's output to the recorder) and selected with
`set_experts_implementation`; `detach` restores the model's own implementation.

`SiteRecorder` stores the raw outputs (still attached to the autograd graph); whoever
uses them computes on them *outside* the hooks (see term.py for why).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch
from torch import nn

SITE_KINDS = ("moe", "experts", "mamba", "layers")
RECORDING_EXPERTS = "posttrain_recording"

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


@dataclasses.dataclass(frozen=True, order=True)
class Site:
    kind: str
    layer: int
    expert: int | None = None

    @property
    def key(self) -> str:
        """The site's key within its kind, as in activation_stats.json: "3" or "3.1"."""
        return str(self.layer) if self.expert is None else f"{self.layer}.{self.expert}"

    @property
    def name(self) -> str:
        if self.kind == "layers":
            return f"layers.{self.layer}"
        if self.kind == "experts":
            return f"layers.{self.layer}.experts.{self.expert}"
        return f"layers.{self.layer}.{self.kind}"


def _is_mamba_mixer(module: nn.Module) -> bool:
    return type(module).__name__.endswith("MambaMixer")


def _is_moe_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith("SparseMoeBlock")


def _is_fused_experts(module: nn.Module) -> bool:
    # PEFT's target_parameters wraps the experts module in ParamWrapper(s); the
    # original class sits at `.base_layer` and is the one whose forward runs the experts.
    name = type(module).__name__
    return name.endswith("Experts") and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")


def find_sites(
    model: nn.Module, kinds: list[str] | tuple[str, ...], last_n_mamba: int | None = None
) -> list[tuple[Site, nn.Module]]:
    """The (site, module) pairs of the requested kinds, ordered by layer. For `experts`
    the module is the fused experts module of that layer, one entry per expert."""
    unknown = sorted(set(kinds) - set(SITE_KINDS))
    if unknown:
        raise ValueError(f"unknown activation sites {unknown}; known: {list(SITE_KINDS)}")
    found: dict[Site, nn.Module] = {}
    for name, module in model.named_modules():
        if "layers" in kinds and (match := DECODER_LAYER.search(name)):
            found.setdefault(Site("layers", int(match[1])), module)
            continue
        match = LAYER_INDEX.search(name)
        if match is None:
            continue
        layer = int(match[1])
        if "mamba" in kinds and _is_mamba_mixer(module):
            found.setdefault(Site("mamba", layer), module)
        elif "moe" in kinds and _is_moe_block(module):
            found.setdefault(Site("moe", layer), module)
        elif "experts" in kinds and _is_fused_experts(module):
            for expert in range(module.gate_up_proj.shape[0]):
                found.setdefault(Site("experts", layer, expert), module)
    if last_n_mamba is not None:
        mamba_layers = sorted(s.layer for s in found if s.kind == "mamba")
        keep = set(mamba_layers[-last_n_mamba:]) if last_n_mamba > 0 else set()
        found = {s: m for s, m in found.items() if s.kind != "mamba" or s.layer in keep}
    return sorted(found.items(), key=lambda item: (item[0].layer, SITE_KINDS.index(item[0].kind), item[0].expert or 0))


# --------------------------------------------------------------- per-expert outputs
def recording_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`JambaExperts.forward` (the eager loop over hit experts), plus one call of
    `self._posttrain_record(expert, output, token_idx)` per expert with its unweighted
    output and the (flattened) tokens it was computed for."""
    record: Callable | None = getattr(self, "_posttrain_record", None)
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
        if record is not None:
            record(int(expert_idx), current_hidden_states, token_idx)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def _register_recording_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if RECORDING_EXPERTS not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(RECORDING_EXPERTS, recording_experts_forward)


def _outermost_pretrained(model: nn.Module):
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ValueError("experts sites need a transformers PreTrainedModel inside the model")


def _check_experts_layout(module: nn.Module) -> None:
    layout = dict(
        is_transposed=getattr(module, "is_transposed", False),
        has_bias=getattr(module, "has_bias", False),
        has_gate=getattr(module, "has_gate", True),
        is_concatenated=getattr(module, "is_concatenated", True),
    )
    if layout != dict(is_transposed=False, has_bias=False, has_gate=True, is_concatenated=True):
        raise ValueError(
            f"{type(module).__name__}: per-expert capture supports the Jamba layout only "
            f"(concatenated gate/up, not transposed, no bias); got {layout}"
        )


# ------------------------------------------------------------------------ recorder
class SiteRecorder:
    """Forward hooks that keep each site's latest output while `recording` is True.

    One output per site: a site that fires again before `take()` (it does not in a
    Jamba forward) replaces its entry, so a consumer sees each site at most once.
    """

    def __init__(self, kinds, last_n_mamba: int | None = None):
        self.kinds = tuple(kinds)
        self.last_n_mamba = last_n_mamba
        self.recording = False
        self.outputs: dict[Site, torch.Tensor] = {}
        # Per experts site: the flattened (batch * length) token of each output row.
        self.token_index: dict[Site, torch.Tensor] = {}
        self.sites: list[Site] = []
        self._handles: list = []
        self._experts_modules: list[nn.Module] = []
        self._experts_owner = None
        self._previous_experts_impl: str | None = None

    def attach(self, model: nn.Module) -> list[Site]:
        if self._handles or self._experts_modules:
            raise RuntimeError("SiteRecorder is attached already; detach first")
        pairs = find_sites(model, self.kinds, self.last_n_mamba)
        self.sites = [site for site, _ in pairs]
        experts_layers: dict[int, nn.Module] = {}
        for site, module in pairs:
            if site.kind == "experts":
                experts_layers[site.layer] = module
            else:
                self._handles.append(module.register_forward_hook(self._hook(site)))
        if experts_layers:
            _register_recording_experts()
            for layer, module in experts_layers.items():
                _check_experts_layout(module)
                module._posttrain_record = self._expert_recorder(layer)
                self._experts_modules.append(module)
            owner = _outermost_pretrained(model)
            self._experts_owner = owner
            self._previous_experts_impl = owner.config._experts_implementation
            owner.set_experts_implementation(RECORDING_EXPERTS)
        return self.sites

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._experts_modules:
            del module._posttrain_record
        self._experts_modules = []
        if self._experts_owner is not None:
            self._experts_owner.set_experts_implementation(self._previous_experts_impl)
            self._experts_owner = None
        self.outputs = {}
        self.recording = False

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._experts_modules)

    def take(self) -> dict[Site, torch.Tensor]:
        """The stored outputs; clears them (and token_index) and stops recording until
        the next forward."""
        outputs, self.outputs = self.outputs, {}
        self.recording = False
        self.token_index = {}
        return outputs

    def _hook(self, site: Site):
        def hook(module, args, output):
            if self.recording:
                self.outputs[site] = output[0] if isinstance(output, tuple) else output

        return hook

    def _expert_recorder(self, layer: int):
        def record(expert: int, output: torch.Tensor, token_idx: torch.Tensor) -> None:
            if self.recording and output.numel():
                self.outputs[Site("experts", layer, expert)] = output
                self.token_index[Site("experts", layer, expert)] = token_idx

        return record
