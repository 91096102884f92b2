"""Acceptance rates of the table_qa, doc_qa, needle and chat pipelines on a teacher.

    .venv/bin/python bench/acceptance.py [--count 24] [--engine transformers] [--threads 1]
        [--pipelines table_qa doc_qa needle chat] [--out outputs/bench/acceptance]

Runs each pipeline's four steps (synth_data.four_steps.run) with default Config
values except `count`, and prints one JSON line per pipeline: acceptance rate, the
reject reasons ranked, seconds. Not a test: the numbers describe the teacher.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.recipe import TeacherSection
from synth_data import four_steps
from pipeline.engines import build_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pipelines", nargs="+", default=["table_qa", "doc_qa", "needle", "chat"])
    parser.add_argument("--set", nargs="*", default=[], metavar="PIPELINE.KEY=JSON",
                        help="Config overrides, e.g. chat.max_tokens=128")
    parser.add_argument("--out", default="outputs/bench/acceptance")
    args = parser.parse_args()

    teacher = TeacherSection(engine=args.engine, threads=args.threads, cache_dir=None)
    engine = build_engine(teacher)
    for name in args.pipelines:
        raw = {"count": args.count}
        for item in args.set:
            key, value = item.split("=", 1)
            if key.startswith(f"{name}."):
                raw[key.split(".", 1)[1]] = json.loads(value)
        cfg = four_steps.validate_config(name, raw)
        started = time.monotonic()
        stats = four_steps.run(four_steps.load_pipeline(name), cfg, engine, Path(args.out) / name)
        print(json.dumps({
            "pipeline": name, "engine": engine.name, "model": engine.model,
            "generated": stats["generated"], "accepted": stats["accepted"],
            "acceptance_rate": stats["acceptance_rate"], "reject_reasons": stats["reject_reasons"],
            "seconds": round(time.monotonic() - started, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
