"""What the training stages share: SFT (sft/train.py), DPO (sft/dpo.py) and GRPO
(sft/grpo.py). Each stage module reads top to bottom and calls these pieces:

  training_args(ConfigClass, recipe, "sft", ...)  TRL's config from the recipe's section
  fit_to_max_length(...)                          what max_length cuts: counted, skipped
  load_policy(recipe, folder, tokenizer)          the model after SFT (or DPO), to train on
  build_trainer(TrainerClass, recipe, model, ...) the trainer + activation loss + LoRA check
  save(trainer, tokenizer, folder)                the model or adapter + tokenizer
  write_pointer(folder, final, why)               a stage that is off: final/ names folder
  finish(trainer)                                 hooks off, process group down

The activation loss enters through a mixin on TRL's own trainer class
(`with_activation_loss(SFTTrainer)`, DPOTrainer, GRPOTrainer): every transformers
Trainer computes its loss in `compute_loss(model, inputs, return_outputs,
num_items_in_batch)`, so adding the term there works for all of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ arguments
def training_args(config_class, recipe: Recipe, section: str, output_dir: Path,
                  defaults: dict[str, Any], forced: dict[str, Any] | None = None):
    """`config_class` (trl.SFTConfig, DPOConfig, ...) from the recipe's `section`: our
    defaults, then the recipe's fields (which win), then `forced` fields."""
    on_gpu = torch.cuda.is_available()
    fields: dict[str, Any] = {
        "bf16": on_gpu,
        "report_to": "none",
        "save_strategy": "no",
        "seed": recipe.model.seed,
        **defaults,
        **getattr(recipe, section),
        "output_dir": str(output_dir),
        **(forced or {}),
    }
    if (fields.get("deepspeed") or int(os.environ.get("WORLD_SIZE", "1")) > 1) and not on_gpu:
        # DeepSpeed on CPU trains only with use_cpu=True (else a batch-size assertion
        # or a gloo allgather error). Plain DDP under torchrun without it
        # runs unsynchronised copies (every rank its own model and full data).
        fields["use_cpu"] = True
    if fields.get("gradient_checkpointing"):
        # Reentrant checkpointing recomputes without grad: hook-stored activations then
        # carry no gradient and the activation loss silently does nothing.
        kwargs = dict(fields.get("gradient_checkpointing_kwargs") or {})
        if kwargs.get("use_reentrant") and recipe.activation_loss.alpha > 0:
            raise RecipeError(
                f"recipe {recipe.path}: {section}.gradient_checkpointing_kwargs.use_reentrant: true "
                "drops the activation loss's gradient; use use_reentrant: false"
            )
        kwargs["use_reentrant"] = False
        fields["gradient_checkpointing_kwargs"] = kwargs
    return config_class(**fields)


# ----------------------------------------------------------------- max_length
def fit_to_max_length(items, max_length: int | None, on_truncated: str, where: str):
    """Which records train under `max_length`, so that none trains silently cut.

    `items` yields (id, length in tokens or None when only known to be longer,
    answer tokens left within max_length) per record. A record with no answer token
    left would train on nothing: it is always skipped. A record that keeps part of its
    answer follows `on_truncated` (data.on_truncated): keep (train on what fits, as
    TRL does), skip, or error. Returns (keep flags, report); the report counts
    `truncated` (every record longer than max_length) and, of those, `answer_cut`, and
    lists each skipped record's id and reason."""
    keep, skipped, too_long, truncated = [], [], [], 0
    for label, length, answer_left in items:
        if max_length is None or (length is not None and length <= max_length):
            keep.append(True)
            continue
        truncated += 1
        size = f"{length} tokens" if length is not None else "longer"
        if answer_left == 0:
            skipped.append({"id": label, "reason": f"answer_cut: no answer token within max_length "
                                                   f"{max_length} ({size})"})
        elif on_truncated == "skip":
            skipped.append({"id": label, "reason": f"truncated: {size} > max_length {max_length}"})
        elif on_truncated == "error":
            too_long.append(f"{label} ({size})")
        keep.append(answer_left > 0 and on_truncated == "keep")
    if too_long:
        raise RecipeError(
            f"{where}: {len(too_long)} record(s) longer than max_length {max_length}: "
            f"{', '.join(too_long[:5])}{' and more' if len(too_long) > 5 else ''}. Raise max_length, or "
            "set data.on_truncated: keep (train on what fits) or skip (leave them out)")
    answer_cut = sum(s["reason"].startswith("answer_cut") for s in skipped)
    if truncated:
        log.warning("%s: %d of %d records are longer than max_length %d: %d with no answer token left "
                    "(skipped), %d %s (data.on_truncated: %s)", where, truncated, len(keep), max_length,
                    answer_cut, truncated - answer_cut,
                    "trained truncated" if on_truncated == "keep" else "skipped", on_truncated)
    return keep, {"truncated": truncated, "answer_cut": answer_cut, "skipped": skipped}


# -------------------------------------------------------------------- model
def load_policy(recipe: Recipe, folder: Path, tokenizer, reference: bool = True):
    """The model a stage after SFT trains, from `folder` (train's or dpo's final/):
    (policy, reference or None, peft_config or None, coverage or None, mode).

      adapter       the recipe's student with that adapter loaded trainable: the stage
                    continues the same adapter (TRL keeps a frozen copy, "ref", as the
                    reference)
      full weights  the policy loads from the folder; with a `lora:` section a new
                    adapter goes on top (reference: adapter off), without one it trains
                    in full against a frozen copy (`reference`: load it here)"""
    from pipeline.student import config_overrides, has_mamba_layers, load_student

    if (folder / "adapter_config.json").is_file():
        from peft import LoraConfig, PeftModel

        from sft.lora import build_lora_config

        base = load_student(recipe.model, tokenizer)
        saved = LoraConfig.from_pretrained(folder)
        # Coverage is measured against what was asked for: the recipe's lora: section
        # (the one SFT trained with), else the adapter's own targets.
        fields = recipe.lora or {"target_modules": sorted(saved.target_modules or []),
                                 "target_parameters": list(saved.target_parameters or [])}
        _, coverage = build_lora_config(fields, base)
        policy = PeftModel.from_pretrained(base, folder, is_trainable=True)
        return policy, None, None, coverage, "lora (SFT adapter continued)"

    from transformers import AutoConfig, AutoModelForCausalLM

    def from_folder():
        config = AutoConfig.from_pretrained(folder, trust_remote_code=recipe.model.trust_remote_code)
        if has_mamba_layers(config):
            for key, value in config_overrides(recipe.model).items():
                setattr(config, key, value)
        return AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)

    policy = from_folder()
    if recipe.lora is not None:
        from sft.lora import build_lora_config

        peft_config, coverage = build_lora_config(recipe.lora, policy)
        return policy, None, peft_config, coverage, "lora (new adapter on the SFT weights)"
    return policy, from_folder() if reference else None, None, None, "full"


# -------------------------------------------------------------------- trainer
class ActivationLossMixin:
    """Put before a transformers Trainer class (TRL's SFTTrainer, DPOTrainer,
    GRPOTrainer): adds the activation-loss term to its loss (a no-op when the penalty
    is None). The term comes from the training forward whose outputs the hooks stored
    (a no-grad forward, such as DPO's reference or GRPO's generation, stores none)."""

    def __init__(self, *args, activation_loss=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation_loss = activation_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Outputs only when asked: TRL then recomputes the logits in an extra no-grad
        # forward, which would also overwrite the activations the hooks stored.
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if return_outputs else (result, None)
        if self.activation_loss is not None and model.training:
            term = self.activation_loss.term(self.state.global_step)
            if term is not None:
                loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers' Trainer reads a full checkpoint back with a plain, non-strict
        # load_state_dict, but save_pretrained wrote it in the hub layout (one tensor
        # per MoE expert, where the model holds them fused): the experts silently
        # kept their initial weights on resume (huggingface/transformers#48805).
        # from_pretrained applies the layout conversion; copy its weights in.
        from transformers import PreTrainedModel

        model = self.model if model is None else model
        if self.is_fsdp_enabled or not isinstance(model, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(resume_from_checkpoint, config=model.config)
        model.load_state_dict(saved.state_dict())  # strict: every weight is restored


def with_activation_loss(trainer_class: type) -> type:
    """`trainer_class` with ActivationLossMixin in front."""
    return type(f"Hybrid{trainer_class.__name__}", (ActivationLossMixin, trainer_class), {})


def build_trainer(trainer_class: type, recipe: Recipe, model, coverage: dict[str, Any] | None, **kwargs):
    """`trainer_class` with the recipe's activation loss (none at alpha 0) and, for
    LoRA (`coverage` from sft.lora.build_lora_config), the first-step gradient check;
    the penalty's hooks go on the model as the trainer wrapped it (PEFT, DeepSpeed).
    `kwargs` are the trainer's own (args, datasets, processing_class, peft_config, ...)."""
    callbacks = []
    if coverage is not None:
        from sft.lora import GradientCoverageCallback

        callbacks.append(GradientCoverageCallback(coverage))
    penalty = None
    if recipe.activation_loss.alpha > 0:
        from activation_loss.term import ActivationLoss, ActivationLossCallback

        # Sites are found on the model being trained: a DPO reference is frozen, not penalised.
        penalty = ActivationLoss(model, recipe.activation_loss)
        callbacks.append(ActivationLossCallback(penalty))
    trainer = with_activation_loss(trainer_class)(
        model=model, callbacks=callbacks, activation_loss=penalty, **kwargs)
    if penalty is not None:
        penalty.attach(trainer.model)
    return trainer


# --------------------------------------------------------------- save, finish
def save(trainer, tokenizer, final_dir: Path) -> None:
    """The trained model or adapter (every rank takes part: ZeRO-3 gathers the shards),
    and the tokenizer with the template it trained in (rank zero)."""
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final_dir)


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's files: a pointer changes whenever the model it points
    to does, so DVC reruns what reads the pointer."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_pointer(folder: Path, final: Path, why: str, flag: str) -> Path:
    """A stage that is off trains nothing: `final` holds only a pointer to the model
    folder it was given (pointers followed), so the stages after it read one path
    whatever is on. Returns the folder pointed to."""
    import shutil

    from pipeline.contract import ModelPointer, write_report
    from pipeline.student import POINTER_FILE, resolve_model_folder

    target = resolve_model_folder(folder, flag)
    if final.exists():
        shutil.rmtree(final)
    write_report(final / POINTER_FILE, ModelPointer(model=str(target), why=why, sha256=folder_digest(target)))
    return target


def finish(trainer) -> None:
    if trainer.activation_loss is not None:
        trainer.activation_loss.detach()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # ZeRO-3 under the deepspeed launcher exits 250 unless the group is destroyed.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
