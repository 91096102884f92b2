"""Real text and tables that exist offline, and the student's token counter.

Always present (installed Python packages): scikit-learn's bundled datasets (tables),
gensim's Lee news corpus (300 real articles), Python's own `pydoc_data.topics` (the
language reference, ~465K characters). Used when present: Debian `fortunes`
(/usr/share/games/fortunes), preferred as haystack filler. Nothing here needs a
network or a root install; a missing optional source just is not offered.

Every item carries a stable id (`lee-042`, `pydoc-assert`, `iris`, `fortunes/art#12`)
so records can name their seeds.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Any

FORTUNES_DIR = Path("/usr/share/games/fortunes")

# ----------------------------------------------------------------------- documents
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def paragraphs(text: str, per_paragraph: int = 3) -> list[str]:
    """Lee articles are one line each: group sentences into paragraphs."""
    sents = sentences(text)
    return [" ".join(sents[i : i + per_paragraph]) for i in range(0, len(sents), per_paragraph)]


@functools.cache
def lee_documents() -> tuple[dict[str, str], ...]:
    """gensim's Lee background corpus: 300 news articles, one per line."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Lee news corpus ships with gensim: pip install gensim==4.4.0 (make setup does this)"
        )
    # Located without importing gensim (its import pulls scipy and takes seconds).
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Lee corpus is missing from the gensim package")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(
        {"id": f"lee-{i:03d}", "source": "lee", "text": " ".join(line.split())}
        for i, line in enumerate(lines)
        if line.strip()
    )


@functools.cache
def pydoc_documents() -> tuple[dict[str, str], ...]:
    """The Python language reference topics that ship with CPython (pydoc_data)."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        # Drop reST-ish indentation and blank runs; keep prose readable.
        text = "\n".join(line.strip() for line in topics[name].splitlines())
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) > 200:
            docs.append({"id": f"pydoc-{name}", "source": "pydoc", "text": text})
    return tuple(docs)


DOCUMENT_SOURCES = {"lee": lee_documents, "pydoc": pydoc_documents}


def documents(names: list[str] | tuple[str, ...]) -> list[dict[str, str]]:
    unknown = [n for n in names if n not in DOCUMENT_SOURCES]
    if unknown:
        raise ValueError(f"unknown document source(s) {unknown} (known: {sorted(DOCUMENT_SOURCES)})")
    return [doc for name in names for doc in DOCUMENT_SOURCES[name]()]


# -------------------------------------------------------------------------- filler
@functools.cache
def fortunes() -> tuple[dict[str, str], ...]:
    """Debian `fortunes` entries when the package is installed, else ()."""
    if not FORTUNES_DIR.is_dir():
        return ()
    entries = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        # Data files have no suffix; .dat are indexes, .u8 symlinks/encodings.
        if not path.is_file() or path.suffix or path.name.startswith("."):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, entry in enumerate(text.split("\n%\n")):
            entry = entry.strip().strip("%").strip()
            if 20 <= len(entry) <= 1200:
                entries.append({"id": f"fortunes/{path.name}#{i}", "source": "fortunes", "text": entry})
    return tuple(entries)


def filler_passages(source: str = "auto") -> list[dict[str, str]]:
    """Short passages of real text for haystacks. auto = fortunes if installed, else
    Lee sentences-paragraphs and pydoc paragraphs (always present)."""
    if source in ("auto", "fortunes") and fortunes():
        return list(fortunes())
    if source == "fortunes":
        raise FileNotFoundError(
            f"filler 'fortunes' asked for but {FORTUNES_DIR} is missing (apt-get install fortunes,"
            " or use filler: auto)"
        )
    if source not in ("auto", "lee", "pydoc"):
        raise ValueError(f"unknown filler source {source!r} (known: auto, fortunes, lee, pydoc)")
    passages = []
    if source in ("auto", "lee"):
        for doc in lee_documents():
            for j, para in enumerate(paragraphs(doc["text"], 2)):
                passages.append({"id": f"{doc['id']}#{j}", "source": "lee", "text": para})
    if source in ("auto", "pydoc"):
        for doc in pydoc_documents():
            for j, para in enumerate(p for p in doc["text"].split("\n\n") if len(p) > 80):
                passages.append({"id": f"{doc['id']}#{j}", "source": "pydoc", "text": para})
    return passages


# -------------------------------------------------------------------------- tables
# name -> (loader kwargs, what a row is called)
SKLEARN_TABLES = {
    "iris": ({}, "flower"),
    "wine": ({}, "wine"),
    "diabetes": ({"scaled": False}, "patient"),
    "breast_cancer": ({}, "sample"),
    "linnerud": ({}, "athlete"),
}


@functools.cache
def sklearn_table(name: str):
    """A scikit-learn bundled dataset as a DataFrame; a class target becomes a named
    column (e.g. iris `species`)."""
    import sklearn.datasets

    if name not in SKLEARN_TABLES:
        raise ValueError(f"unknown table {name!r} (known: {sorted(SKLEARN_TABLES)}, generated)")
    kwargs, _ = SKLEARN_TABLES[name]
    bunch = getattr(sklearn.datasets, f"load_{name}")(as_frame=True, **kwargs)
    frame = bunch.frame.copy()
    if name == "linnerud":  # features and targets are separate frames
        frame = bunch.data.join(bunch.target)
    names = getattr(bunch, "target_names", None)
    if "target" in frame and names is not None and len(names) == frame["target"].nunique():
        label = {"iris": "species", "wine": "cultivar", "breast_cancer": "diagnosis"}[name]
        frame[label] = [str(names[int(t)]) for t in frame.pop("target")]
    elif "target" in frame:
        frame = frame.rename(columns={"target": "disease progression"})
    return frame


# -------------------------------------------------------------------------- tokens
@functools.cache
def student_tokenizer():
    """The tiny student's tokenizer = the packaged teacher's (SmolLM2)."""
    from transformers import AutoTokenizer

    from pipeline.model_paths import teacher_path

    return AutoTokenizer.from_pretrained(teacher_path())


def count_tokens(text: str) -> int:
    return len(student_tokenizer()(text, add_special_tokens=False)["input_ids"])


def conversation_tokens(messages: list[dict[str, Any]], tools: list[dict] | None = None) -> int:
    """Tokens of a record as the student trains on it (rendered with its template)."""
    from pipeline.chat_template import CHATML_TOOLS_TEMPLATE

    text = student_tokenizer().apply_chat_template(
        messages, tools=tools, chat_template=CHATML_TOOLS_TEMPLATE, tokenize=False
    )
    return count_tokens(text)


def bucket_bounds(buckets: list[int]) -> dict[int, tuple[int, int]]:
    """Each bucket b holds records of (previous bucket, b] tokens; the smallest holds
    (b/2, b]. E.g. [1024, 2048] -> {1024: (512, 1024), 2048: (1024, 2048)}."""
    ordered = sorted(set(buckets))
    return {b: (ordered[i - 1] if i else b // 2, b) for i, b in enumerate(ordered)}
