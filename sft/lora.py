"""LoRA for hybrid models: named target groups, coverage, and a gradient check.

`lora.target_modules` may name groups that expand to what the model actually has:
  attention  q_proj k_proj v_proj o_proj of the attention layers
  mamba      in_proj x_proj out_proj of the Mamba mixers (not dt_proj: see below)
  mlp        gate_proj up_proj down_proj of the dense (non-MoE) feed-forward layers
  experts    the routed experts' fused 3-D weights, through PEFT's `target_parameters`
             (transformers 5.x has no module per expert)
Groups combine with each other and with raw PEFT module names (`lm_head`, ...); every
other `lora:` key is a `peft.LoraConfig` field.

Adapters that silently cover part of a model are a known trap (peft issue 3554: loss
flat, no warning), and so are fused kernels that bypass an adapted module (peft 1612).
Hence: a group the model lacks is a RecipeError; the coverage (layers covered out of
layers present, trainable parameters per group) is measured on the wrapped model and
written as lora_coverage.json; and after the first optimisation step every adapted
module must have received a non-zero gradient, or training stops.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any

import torch
from transformers import TrainerCallback

from pipeline.recipe import RecipeError

log = logging.getLogger(__name__)

GROUP_MODULES = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    # dt_proj is left out: transformers' Jamba mixer (5.19, every path) multiplies by
    # `dt_proj.weight` directly instead of calling the module, so a LoRA there never
    # reaches the output and gets no gradient (the gradient check below caught it).
    # The model card's targets leave it out too. As a raw name it fails that check.
    "mamba": ("in_proj", "x_proj", "out_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
GROUPS = (*GROUP_MODULES, "experts")
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def module_group(name: str, parent: torch.nn.Module | None) -> str | None:
    """Which group a module belongs to, from its name and its parent's class."""
    leaf = name.rsplit(".", 1)[-1]
    kind = type(parent).__name__.lower() if parent is not None else ""
    if leaf in GROUP_MODULES["attention"] and "attention" in kind:
        return "attention"
    if leaf in GROUP_MODULES["mamba"] and ("mamba" in kind or "mixer" in kind):
        return "mamba"
    if leaf in GROUP_MODULES["mlp"] and "mlp" in kind and "moe" not in kind and "expert" not in kind:
        return "mlp"
    return None


def inventory(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per group: the full names of the targets the model has, and their layers."""
    found: dict[str, dict[str, Any]] = {g: {"names": [], "layers": set()} for g in GROUPS}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Linear):
            continue
        group = module_group(name, modules.get(name.rsplit(".", 1)[0]) if "." in name else None)
        if group:
            found[group]["names"].append(name)
            found[group]["layers"].add(layer_index(name))
    for name, param in model.named_parameters():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in EXPERT_PARAMETERS:
            if param.dim() == 3 or getattr(param, "ds_shape", None) is not None:
                found["experts"]["names"].append(name)
                found["experts"]["layers"].add(layer_index(name))
    return found


def _suffix_match(name: str, key: str) -> bool:
    # PEFT's rule for a list of target names: exact, or the name ends with ".key".
    return name == key or name.endswith("." + key)


def build_lora_config(lora_fields: dict[str, Any], model: torch.nn.Module):
    """Expand target groups for this model -> (peft.LoraConfig, coverage dict).

    The coverage lists, per requested group (or raw name), the layers the model has
    and the layers the adapter will cover; trainable counts are filled in by
    GradientCoverageCallback once PEFT has wrapped the model.
    """
    from peft import LoraConfig

    fields = dict(lora_fields)
    requested = fields.get("target_modules")
    if requested is None:
        raise RecipeError(f"lora.target_modules: required; groups: {', '.join(GROUPS)}")
    if isinstance(requested, str):
        requested = [requested]
    requested = list(dict.fromkeys(requested))
    have = inventory(model)
    model_name = type(model).__name__

    missing = [g for g in requested if g in GROUPS and not have[g]["names"]]
    if missing:
        present = [g for g in GROUPS if have[g]["names"]]
        raise RecipeError(
            f"lora.target_modules: {model_name} has no {' / '.join(missing)} "
            f"{'layers' if len(missing) > 1 else 'layer'} to adapt (groups it has: "
            f"{', '.join(present) or 'none'}). Remove {', '.join(missing)} from lora.target_modules."
        )

    all_names = [n for n, _ in model.named_modules() if n]
    group_names: list[str] = []  # full names of the modules the groups select
    coverage_groups: dict[str, dict[str, Any]] = {}
    raw: list[str] = []
    for entry in requested:
        if entry in GROUP_MODULES:
            group_names += have[entry]["names"]
        elif entry != "experts":
            if entry != "all-linear" and not any(_suffix_match(n, entry) for n in all_names):
                raise RecipeError(
                    f"lora.target_modules: {entry!r} is neither a group ({', '.join(GROUPS)}) "
                    f"nor a module name in {model_name}"
                )
            raw.append(entry)
        layers = sorted(have[entry]["layers"] - {None}) if entry in GROUPS else None
        coverage_groups[entry] = {
            "layers_present": len(layers) if layers is not None else None,
            "layers_covered": None,
            "layers": layers,
            "adapted": None,
            "trainable_params": None,
        }

    # Short names ("q_proj") when they select exactly the groups' modules (readable
    # adapter_config.json, what vLLM expects); the full names otherwise.
    short = sorted({n.rsplit(".", 1)[-1] for n in group_names})
    by_short = {n for n in all_names if any(_suffix_match(n, s) for s in short)}
    targets = short if by_short == set(group_names) else sorted(group_names)
    targets += [r for r in raw if r not in targets]

    target_parameters = list(fields.get("target_parameters") or [])
    if "experts" in requested:
        for name in have["experts"]["names"]:
            suffix = ".".join(name.split(".")[-3:])  # e.g. feed_forward.experts.gate_up_proj
            if suffix not in target_parameters:
                target_parameters.append(suffix)
        if fields.get("lora_dropout"):
            raise RecipeError(
                "lora.lora_dropout: must be 0 when lora.target_modules includes experts "
                "(PEFT's parameter adapters cannot apply dropout)"
            )

    fields["target_modules"] = targets or None
    if target_parameters:
        fields["target_parameters"] = target_parameters
    fields.setdefault("task_type", "CAUSAL_LM")
    if fields["target_modules"] is None and not target_parameters:
        raise RecipeError("lora.target_modules: selects nothing")
    try:
        config = LoraConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"lora: {exc}") from None
    coverage = {
        "model": model_name,
        "requested": requested,
        "target_modules": targets,
        "target_parameters": target_parameters,
        "groups": coverage_groups,
    }
    return config, coverage


# ------------------------------------------------------------ after PEFT wrapping
def adapted_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Full name (without PEFT's prefix) -> LoRA layer, for every adapted target.

    A ParamWrapper stands for one 3-D parameter: it is named after that parameter
    (`...experts.gate_up_proj`), since nested wrappers share the module path.
    """
    from peft.tuners.lora.layer import LoraLayer

    out = {}
    for name, module in model.named_modules():
        # An adapted embedding keeps its adapter in lora_embedding_A, not lora_A.
        if not isinstance(module, LoraLayer) or not (module.lora_A or module.lora_embedding_A):
            continue
        name = re.sub(r"^(base_model\.model\.)", "", name)
        name = re.sub(r"(\.base_layer)+$", "", name)
        if hasattr(module, "parameter_name"):
            name = f"{name}.{module.parameter_name}"
        out[name] = module
    return out


def own_lora_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """A LoRA layer's own adapter weights (not those of a wrapper nested inside it)."""
    return [p for n, p in module.named_parameters()
            if p.requires_grad and "lora_" in n and ".base_layer." not in f".{n}"]


def _numel(param: torch.nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", 0) or param.numel())  # ZeRO-3 partitions


def entry_of(name: str, module: torch.nn.Module, coverage: dict[str, Any],
             parents: dict[str, torch.nn.Module]) -> str | None:
    """Which requested entry (group or raw name) an adapted module belongs to."""
    groups = coverage["groups"]
    if hasattr(module, "parameter_name"):
        return "experts" if "experts" in groups else next(
            (g for g in groups if g not in GROUPS and name.endswith(g)), None)
    group = module_group(name, parents.get(name.rsplit(".", 1)[0]))
    if group in groups:
        return group
    for entry in groups:
        if entry not in GROUPS and (entry == "all-linear" or _suffix_match(name, entry)):
            return entry
    return group


def measure_coverage(model: torch.nn.Module, coverage: dict[str, Any]) -> dict[str, list[str]]:
    """Fill layers covered, adapted count and trainable params per entry, in place.

    Returns entry -> adapted module names. Raises if a requested entry adapts nothing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parents = dict(base.named_modules())
    members: dict[str, list[str]] = defaultdict(list)
    params: dict[str, int] = defaultdict(int)
    layers: dict[str, set] = defaultdict(set)
    for name, module in adapted_modules(model).items():
        entry = entry_of(name, module, coverage, parents) or "other"
        members[entry].append(name)
        layers[entry].add(layer_index(name))
        params[entry] += sum(_numel(p) for p in own_lora_params(module))
    for entry, info in coverage["groups"].items():
        info["layers_covered"] = len(layers.get(entry, set()) - {None})
        info["adapted"] = len(members.get(entry, []))
        info["trainable_params"] = params.get(entry, 0)
        if info["layers_present"] is None:  # raw names: count what they reached
            info["layers_present"] = info["layers_covered"]
    if "other" in members:
        coverage["groups"]["other"] = {
            "layers_present": None, "layers_covered": len(layers["other"] - {None}),
            "adapted": len(members["other"]), "trainable_params": params["other"],
        }
    trainable = [p for p in model.parameters() if p.requires_grad]
    coverage["trainable_params"] = sum(_numel(p) for p in trainable)
    coverage["total_params"] = sum(_numel(p) for p in model.parameters())
    empty = [e for e, info in coverage["groups"].items() if e != "other" and not info["adapted"]]
    if empty:
        raise RecipeError(
            f"lora.target_modules: {', '.join(empty)} adapted nothing in {coverage['model']} "
            "after PEFT wrapping (check lora.layers_to_transform / exclude_modules)"
        )
    for entry, info in coverage["groups"].items():
        if info["layers_present"] and info["layers_covered"] < info["layers_present"]:
            log.warning("LoRA %s covers %d of %d layers", entry, info["layers_covered"],
                        info["layers_present"])
    return dict(members)


class GradientCoverageCallback(TrainerCallback):
    """Coverage on the wrapped model at train start; a gradient check after step one.

    Gradients are observed with tensor hooks on the LoRA parameters as backward
    computes them, so the check also works under DeepSpeed, whose engine reduces,
    partitions and zeroes `.grad` inside backward. A module counts as trained when any
    of its LoRA parameters saw a non-zero gradient (lora_A's is zero at the first
    step, since lora_B starts at zero).
    """

    def __init__(self, coverage: dict[str, Any]):
        self.coverage = coverage
        self.members: dict[str, list[str]] = {}
        self.seen: dict[str, bool] = {}
        self.hooks: list[Any] = []
        self.checked = False
        # GRPO: a step whose answers all scored alike has no policy gradient, so the
        # check waits for a step that has one (`ready()` true), counting every gradient
        # seen on the way. None: the first step decides.
        self.ready = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.members = measure_coverage(model, self.coverage)
        groups = self.coverage["groups"]
        log.info("LoRA coverage: %s; %d trainable parameters", ", ".join(
            f"{g} {i['layers_covered']}/{i['layers_present']} layers" for g, i in groups.items()
        ), self.coverage["trainable_params"])
        for name, module in adapted_modules(model).items():
            self.seen[name] = False
            for param in own_lora_params(module):
                self.hooks.append(param.register_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def record(grad: torch.Tensor) -> None:
            if not self.seen[name] and bool(grad.detach().abs().sum() > 0):
                self.seen[name] = True
        return record

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.checked or (self.ready is not None and not self.ready()):
            return
        self.checked = True
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        names = sorted(self.seen)
        flags = torch.tensor([float(self.seen[n]) for n in names])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must reach the same verdict, or the others would hang.
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            flags = flags.to(device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            flags = flags.cpu()
        dead = {n for n, f in zip(names, flags.tolist()) if f == 0}
        self.coverage["no_gradient"] = sorted(dead)
        if dead:
            by_entry = {e: [n for n in ms if n in dead] for e, ms in self.members.items()}
            detail = "; ".join(f"{e}: {len(d)} of {len(self.members[e])} (e.g. {d[0]})"
                               for e, d in by_entry.items() if d)
            raise RecipeError(
                "lora.target_modules: adapted modules received no gradient in the first "
                f"step ({detail}). A fused kernel may bypass them (peft issue 1612), or "
                "they are not on the loss's path; training would leave them untouched."
            )
        log.info("LoRA gradient check: all %d adapted modules received a gradient", len(names))

    def on_train_end(self, args, state, control, **kwargs):
        if self.checked:
            return
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.coverage["no_gradient"] = None
        log.warning("LoRA gradient check not run: no step had a gradient to check (every GRPO step's "
                    "answers to each prompt scored alike)")
