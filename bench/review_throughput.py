"""Benchmark: local Argilla start-up time, push and pull throughput for 1,000 records.

    .venv/bin/python bench/review_throughput.py [--records 1000]

Starts its own server in a temporary folder on free ports (cold: empty database,
migrations run; then warm: a restart on the same database), pushes N records over
two pipelines, submits reviews for a tenth of them through the SDK, pulls, and
prints the numbers. Stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.contract import make_record  # noqa: E402
from pipeline.ports import free_port  # noqa: E402
from pipeline.records import read_json, write_jsonl  # noqa: E402
from review import pull, push, server  # noqa: E402


def records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        pipeline = "doc_qa" if i % 2 else "table_qa"
        messages = [
            {"role": "system", "content": "Answer from the source."},
            {"role": "user", "content": f"Question {i}: " + "what does the passage say? " * 8},
            {"role": "assistant", "content": f"Answer {i}: " + "the passage says this. " * 12},
        ]
        meta = {"teacher": "SmolLM2-135M-Instruct", "length_bucket": ["short", "medium", "long"][i % 3],
                "source": "A paragraph of source text. " * 20,
                "validators": {"well_formed": {"passed": True, "score": None, "reason": None},
                               "qa": {"passed": True, "score": 0.7, "reason": None}}}
        out.append(make_record(pipeline, messages, meta=meta))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    opts = parser.parse_args()
    import logging

    for name in ("httpx", "argilla.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="argilla-bench-") as tmp:
        tmp = Path(tmp)
        state, port, redis_port = tmp / "state", free_port(), free_port()
        started = time.monotonic()
        conn = server.serve(state, port=port, redis_port=redis_port)
        cold = time.monotonic() - started
        server.stop(state)
        started = time.monotonic()
        conn = server.serve(state, port=port, redis_port=redis_port)
        warm = time.monotonic() - started
        os.environ.update(ARGILLA_API_URL=conn.api_url, ARGILLA_API_KEY=conn.api_key)
        try:
            data = records(opts.records)
            inputs = []
            for pipeline in ("doc_qa", "table_qa"):
                path = tmp / "synth" / pipeline / "accepted.jsonl"
                write_jsonl(path, [r for r in data if r["pipeline"] == pipeline])
                inputs.append(str(path))
            recipe = tmp / "recipe.yaml"
            recipe.write_text("review:\n  mode: server\n  unreviewed: pending\n")
            ns = argparse.Namespace(recipe=str(recipe), overrides=[], input=inputs, out=str(tmp / "review"))
            push.main(ns)  # warm the imports (SDK, trl via the recipe loader) before timing
            # ... which pushed everything: time a fresh push on new dataset names instead.
            ns.overrides = ["review.dataset_prefix=timed"]
            started = time.monotonic()
            push.main(ns)
            push_s = time.monotonic() - started
            started = time.monotonic()
            push.main(ns)
            repush_s = time.monotonic() - started

            import argilla as rg

            client = server.argilla_client(conn)
            me = client.me.id
            reviewed = 0
            for pipeline in ("doc_qa", "table_qa"):
                dataset = client.datasets(f"timed-{pipeline}", workspace="posttrain")
                batch = []
                for i, record in enumerate(dataset.records()):
                    if i % 10:
                        continue
                    record.responses.add(rg.Response("verdict", "reject" if i % 20 else "accept",
                                                     user_id=me, status="submitted"))
                    batch.append(record)
                dataset.records.log(batch)
                reviewed += len(batch)
            started = time.monotonic()
            pull.main(ns)
            pull_s = time.monotonic() - started
            stats = read_json(tmp / "review" / "review_stats.json")
        finally:
            server.stop(state)

    n = opts.records
    print()
    print(f"start-up, cold (new database, migrations): {cold:6.1f} s")
    print(f"start-up, warm (restart):                  {warm:6.1f} s")
    print(f"push  {n} records:  {push_s:6.1f} s  = {n / push_s:7.0f} records/s")
    print(f"push again (0 new): {repush_s:6.1f} s")
    print(f"pull  {n} records:  {pull_s:6.1f} s  = {n / pull_s:7.0f} records/s"
          f"  ({reviewed} reviewed; accepted {stats['accepted']}, rejected {stats['rejected']},"
          f" pending {stats['pending']})")


if __name__ == "__main__":
    main()
