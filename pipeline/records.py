"""Plain-file artifact I/O: JSONL records and JSON reports.

What a record holds is typed in `pipeline.contract`. Files are JSONL that
`datasets.load_dataset("json", ...)` reads; writes are atomic (temp file + rename)
so a killed stage never leaves half a file behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


class InputError(ValueError):
    """Bad input that a user can fix: a missing or broken file, a record that does not
    fit the contract, a folder that is not a model. `posttrain` prints it as one line
    naming the file, line, record or key, and exits 2 (no traceback unless -v)."""


def validation_problems(exc, prefix: str = "", whole: str = "", show_input: bool = True,
                        data: Any = None) -> list[str]:
    """Every error of a pydantic ValidationError as one `key.path: message` line: the
    key under `prefix` (a recipe section: "generate.tool_use"), or `whole` (what the
    object is: "record") when the error is about no one field; pydantic's "Value error, "
    dropped; the offending value shown when `show_input` (a whole record is too long).
    Given the validated `data`, a list entry that has an id is named by it too
    (`items.3 (id 'ruler/niah/1024/3').passed`), so a reader finds it without counting."""
    lines = []
    for err in exc.errors():
        key = ".".join(_key_parts(list(err["loc"]), data, [prefix] if prefix else [])) or whole
        got = f" (got {err.get('input')!r})" if show_input else ""
        lines.append(f"{key}: {err['msg'].removeprefix('Value error, ')}{got}")
    return lines


def _key_parts(loc: list, data: Any, parts: list[str]) -> list[str]:
    for part in loc:
        data = data[part] if isinstance(data, (dict, list)) and _has(data, part) else None
        named = isinstance(part, int) and isinstance(data, dict) and data.get("id") is not None
        parts.append(f"{part} (id {data['id']!r})" if named else str(part))
    return parts


def _has(container: dict | list, part: Any) -> bool:
    if isinstance(container, list):
        return isinstance(part, int) and -len(container) <= part < len(container)
    return part in container


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A short hex digest of JSON-serialisable parts (key order normalised)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file; a missing file, a broken line or a line that is not a
    JSON object raises InputError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield record


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as JSONL; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record and flush it to disk (for resumable caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def json_safe(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN/inf); tensors become numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # torch/numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write a JSON report (valid JSON: non-finite floats become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(json_safe(data), handle, indent=2, ensure_ascii=False, sort_keys=False, allow_nan=False)
        handle.write("\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    """A JSON report; a missing or broken file raises InputError naming it (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
