"""Loading the student and its tokenizer: shared ground for every stage that needs
the student (train, audit, export, eval), so no stage imports another.

The student is either a hub id / local folder, or `model.tiny`: a small
`JambaForCausalLM` built from a config with random weights (the embedded CPU default)
that uses the packaged teacher's tokenizer. Without the fused CUDA kernels the Mamba
mixer's reference scan has an unusable backward (about 900 s per step at 2K
tokens on a tiny model), so on such machines the parallel scan of `mambapy` is switched on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from pipeline.chat_template import TemplateError, apply_training_template
from pipeline.recipe import ModelSection, RecipeError
from pipeline.records import InputError
from pipeline.model_paths import resolve_model_path

log = logging.getLogger(__name__)

# A hybrid that trains in seconds on a CPU: layers [m, m, A, m, m, m, A, m], MoE on
# every odd layer (4 experts, top-2). `model.tiny` entries override these.
TINY_JAMBA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_layer_period=4,
    attn_layer_offset=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    num_experts=4,
    num_experts_per_tok=2,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_dt_rank=8,
    max_position_embeddings=16384,
)

# Configs whose layers carry recurrent (Mamba/SSM) state.
MAMBA_MODEL_TYPES = {
    "jamba", "mamba", "mamba2", "bamba", "falcon_h1", "granitemoehybrid",
    "nemotron_h", "zamba", "zamba2", "falcon_mamba",
}


def has_mamba_layers(config) -> bool:
    return getattr(config, "model_type", "") in MAMBA_MODEL_TYPES


def mamba_kernels_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from transformers.utils.import_utils import is_causal_conv1d_available, is_mamba_ssm_available

    return is_mamba_ssm_available() and is_causal_conv1d_available()


def mamba_path(model) -> str:
    """Which Mamba implementation the model's forward will take."""
    config = model.config
    if not has_mamba_layers(config):
        return "none"
    if mamba_kernels_available() and next(model.parameters()).is_cuda:
        return "kernels"
    return "mambapy" if getattr(config, "use_mambapy", False) else "reference"


# A folder holding only this file stands for the model folder it names: the dpo stage
# writes one when preference training is off, so later stages always read one path.
POINTER_FILE = "posttrain_model.json"


def resolve_model_folder(path: str | os.PathLike, flag: str = "--model"):
    """The model or adapter folder `path` stands for: itself, or, for a pointer folder
    (POINTER_FILE inside), the folder the pointer names (followed once more if that is
    a pointer too). A relative target is read from the working directory, as written."""
    from pathlib import Path

    from pipeline.contract import ModelPointer, read_report

    path = Path(path)
    for _ in range(8):  # a chain of pointers is allowed; a cycle is an error
        pointer = path / POINTER_FILE
        if not pointer.is_file():
            return path
        try:
            target = read_report(pointer, ModelPointer).model
        except InputError as exc:
            raise InputError(f"{flag} {path}: {exc}") from None
        path = Path(target)
    raise InputError(f"{flag} {path}: {POINTER_FILE} pointers form a cycle")


def check_model_folder(path: str | os.PathLike, flag: str = "--model", trust_remote_code: bool = False) -> str:
    """'adapter' or 'model' for a folder the stages can load (a pointer folder is
    followed: see resolve_model_folder), checked before any weights are read; anything
    else raises InputError naming the path and what was expected."""
    from transformers import AutoConfig

    path = resolve_model_folder(path, flag)
    if not path.is_dir():
        raise InputError(f"{flag} {path}: no such folder")
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if not (path / "config.json").is_file():
        raise InputError(f"{flag} {path}: not a model folder: expected config.json (a model) "
                         "or adapter_config.json (a PEFT adapter)")
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{flag} {path}: config.json is not a transformers model config ({reason})") from None
    return "model"


def load_tokenizer(section: ModelSection):
    from transformers import AutoTokenizer

    source = section.tokenizer or section.name_or_path
    if source is None:
        raise RecipeError("model.tokenizer: required when model.tiny is used (e.g. 'teacher')")
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(source), trust_remote_code=section.trust_remote_code
    )
    try:
        return apply_training_template(tokenizer, section.chat_template,
                                       built_from_config=section.tiny is not None, source=source)
    except TemplateError as exc:
        raise RecipeError(f"model.chat_template: {exc}") from None


def config_overrides(section: ModelSection) -> dict[str, Any]:
    """Settings applied to any hybrid config: the Mamba fallback and router logits."""
    overrides: dict[str, Any] = {"output_router_logits": section.output_router_logits}
    if not mamba_kernels_available():
        overrides["use_mambapy"] = section.mamba_fallback == "mambapy"
    return overrides


def dtype_of(section: ModelSection) -> torch.dtype:
    return torch.float32 if section.dtype in ("float32", "auto") else getattr(torch, section.dtype)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def init_device():
    """Where a model built from config is initialised: the GPU for a single process
    that has one; otherwise the host (the trainer or DeepSpeed places it later)."""
    if torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device("cuda")
    return contextlib.nullcontext()


def load_student(section: ModelSection, tokenizer):
    """Build or load the student. Returns the model (float32 unless model.dtype says)."""
    from transformers import AutoConfig, AutoModelForCausalLM, JambaConfig, JambaForCausalLM

    torch.manual_seed(section.seed)
    if section.tiny is not None:
        fields = {**TINY_JAMBA, **section.tiny}
        unknown = sorted(set(fields) - set(JambaConfig().to_dict()))
        if unknown:
            raise RecipeError(f"model.tiny: not JambaConfig fields: {', '.join(unknown)}")
        config = JambaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **fields,
        )
        for key, value in config_overrides(section).items():
            setattr(config, key, value)
        if section.attn_implementation:
            config._attn_implementation = section.attn_implementation
        # Built in the target dtype, on the GPU when one process has one: a
        # Jamba-Mini-sized config built in float32 on the host first needs 4 bytes
        # per parameter of host memory and minutes of CPU init. (Not _from_config:
        # under ZeRO-3 it opens deepspeed.zero.Init, whose batch-size check fails on
        # CPU processes.)
        with init_device(), default_dtype(dtype_of(section)):
            model = JambaForCausalLM(config)
    elif section.name_or_path:
        path = resolve_model_path(section.name_or_path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=section.trust_remote_code)
        if has_mamba_layers(config):
            for key, value in config_overrides(section).items():
                setattr(config, key, value)
        kwargs: dict[str, Any] = {"config": config, "trust_remote_code": section.trust_remote_code}
        if section.attn_implementation:
            kwargs["attn_implementation"] = section.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, dtype=section.dtype, **kwargs)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            # Chat markers added to the tokenizer (ChatML on a model without a template)
            # need rows of their own, and the end-of-turn marker must stop generation.
            model.resize_token_embeddings(len(tokenizer))
            eos = model.generation_config.eos_token_id
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, *eos]
    else:
        raise RecipeError("model: give either model.name_or_path or model.tiny")

    path_taken = mamba_path(model)
    if path_taken == "mambapy" and section.dtype not in ("float32", "auto"):
        # mambapy's scan mixes dtypes when the weights are half precision; mixed
        # precision (sft.bf16 / sft.fp16 autocast) works on this path.
        raise RecipeError(
            f"model.dtype: {section.dtype} weights do not work with the mambapy scan; keep "
            "float32 weights and use sft.bf16: true (autocast) instead"
        )
    from pipeline.mamba_packing import enable_packing

    # Packed rows (TRL packing / padding_free) then reset the Mamba state at each
    # sequence start, as attention already separates them.
    enable_packing(model)
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "student: %s, %.1fM parameters, Mamba path: %s",
        type(model).__name__, params / 1e6, path_taken,
    )
    return model


def load_for_inference(section: ModelSection, model_path: str | os.PathLike | None):
    """(float32 model in eval mode, its training tokenizer, what was loaded) for the
    stages that read a trained model (audit, eval): a model folder, an adapter folder
    (merged into the recipe's student), a pointer folder (followed), or None for the
    recipe's student as built."""
    from pathlib import Path

    path = Path(model_path) if model_path is not None else None
    if path is not None:
        check_model_folder(path, trust_remote_code=section.trust_remote_code)
        path = resolve_model_folder(path)  # the dpo stage's pointer when DPO is off
    if path is not None and (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        # Training saves its tokenizer, with the template it trained in, beside the model.
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(section)

    if path is None:
        model, source = load_student(section, tokenizer), "the recipe's student"
    elif (path / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_student(section, tokenizer), path).merge_and_unload()
        source = f"adapter {path} merged into the recipe's student"
    else:  # check_model_folder made sure config.json is a model's
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, trust_remote_code=section.trust_remote_code)
        if has_mamba_layers(config):
            for key, value in config_overrides(section).items():
                setattr(config, key, value)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, trust_remote_code=section.trust_remote_code)
        source = f"model {path}"
    return model.float().eval(), tokenizer, source
