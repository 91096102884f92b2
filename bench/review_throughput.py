"""Benchmark: local Argilla start-up, then push and pull throughput beside the SDK's own.

    .venv/bin/python bench/review_throughput.py [--records 1000 10000]

Starts its own server in a temporary folder on free ports (cold: empty database,
migrations run; then warm: a restart on the same database). For each record count,
records like the pipelines' (two pipelines, a conversation, a source, validators,
teacher and length bucket, so each carries a suggestion and five metadata values):

  anchor  the SDK's plain `records.log` of the same review items, prebuilt as
          rg.Record, into a fresh dataset with the same settings (its default
          batch size): what a script calling the SDK gets from this server; and,
          for the counts given to --stock (default 1000), the same on a second
          server run as shipped (POSTTRAIN_ARGILLA_STOCK=1, without the two fixes
          in review/argilla_app.py)
  push    `posttrain review push` end to end: read and check the JSONL, list what
          the datasets hold, build the items, send them (review/push.py)
  again   the same push once more: nothing to add
  pull    two reviewers answer a tenth of the records each (the same tenth,
          disagreeing on a fifth of it), then `posttrain review pull` end to end,
          beside the SDK's plain iteration over the records with their responses

and prints records/s for each, the buckets, and Fleiss' kappa on that double-reviewed
sample. Stops everything it started.

Wall-clock rates depend on how busy the machine is (the load average is printed with
them), so each step also reports where its time went: CPU seconds of this process
(the client), of the API server and of its background worker, read from /proc. Push
and pull wait for each answer before sending the next request, so on an idle machine
a step takes about the sum of those: `cpu r/s` is N over that sum.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import functools
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.contract import Record, make_record, write_records  # noqa: E402
from pipeline.ports import free_port  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.records import read_json  # noqa: E402
from review import pull, push, server  # noqa: E402
from review.dataset import argilla_record, review_item, review_settings  # noqa: E402

PIPELINES = ("doc_qa", "table_qa")


def records(n: int, tag: str) -> list[Record]:
    out = []
    for i in range(n):
        pipeline = PIPELINES[i % 2]
        messages = [
            {"role": "system", "content": "Answer from the source."},
            {"role": "user", "content": f"Question {tag}-{i}: " + "what does the passage say? " * 8},
            {"role": "assistant", "content": f"Answer {i}: " + "the passage says this. " * 12},
        ]
        meta = {"teacher": "SmolLM2-135M-Instruct", "length_bucket": ["short", "medium", "long"][i % 3],
                "source": "A paragraph of source text. " * 20,
                "validators": {"well_formed": {"passed": True, "score": None, "reason": None},
                               "qa": {"passed": True, "score": 0.7, "reason": None}}}
        out.append(make_record(pipeline, messages, meta=meta))
    return out


def timed(fn):
    started = time.monotonic()
    result = fn()
    return time.monotonic() - started, result


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one when pid is None)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Measured:
    """Wall time and CPU time (client, server, worker) of one step."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def __call__(self, fn):
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()} | {"client": cpu_seconds()}
        wall, _ = timed(fn)
        after = {name: cpu_seconds(pid) for name, pid in self.pids.items()} | {"client": cpu_seconds()}
        return {"wall": wall, **{name: after[name] - before[name] for name in after}}


def run(n: int, tmp: Path, client, second, measure: Measured) -> dict:
    import argilla as rg

    tag = uuid.uuid4().hex[:6]
    data = records(n, tag)
    inputs = []
    for pipeline in PIPELINES:
        path = tmp / tag / "synth" / pipeline / "accepted.jsonl"
        write_records(path, [r for r in data if r.pipeline == pipeline])
        inputs.append(str(path))
    recipe = tmp / tag / "recipe.yaml"
    recipe.write_text(f"review:\n  mode: server\n  unreviewed: pending\n  dataset_prefix: ours{tag}\n")
    ns = argparse.Namespace(recipe=str(recipe), overrides=[], input=inputs, pairs=None, out=str(tmp / tag / "review"))
    cfg = load_recipe(str(recipe), []).review

    # Both sides get their (empty) datasets before the clock starts: creating one is
    # ~17 requests whatever the record count, timed apart.
    anchor = {}
    for pipeline in PIPELINES:
        dataset = rg.Dataset(name=f"sdk{tag}-{pipeline}", workspace=cfg.workspace,
                             settings=review_settings(pipeline, 1), client=client).create()
        anchor[pipeline] = (dataset, [argilla_record(review_item(r, cfg.display_chars))
                                      for r in data if r.pipeline == pipeline])
    create = measure(lambda: [push.ensure_dataset(client, cfg, f"ours{tag}-{p}", functools.partial(review_settings, p))
                              for p in PIPELINES])
    # The anchor: the SDK's records.log of the same items, prebuilt as rg.Record.
    sdk_push = measure(lambda: [d.records.log(rs) for d, rs in anchor.values()])
    ours = measure(lambda: push.main(ns))
    again = measure(lambda: push.main(ns))

    # Two reviewers answer the same tenth of the records; they disagree on a fifth of it.
    reviewed = 0
    for pipeline in PIPELINES:
        dataset = client.datasets(f"ours{tag}-{pipeline}", workspace=cfg.workspace)
        batch = []
        for i, record in enumerate(dataset.records()):
            if i % 10:
                continue
            first = "reject" if i % 30 == 0 else "accept"
            other = first if i % 50 else ("accept" if first == "reject" else "reject")
            record.responses.add(rg.Response("verdict", first, user_id=client.me.id, status="submitted"))
            record.responses.add(rg.Response("verdict", other, user_id=second.id, status="submitted"))
            batch.append(record)
        dataset.records.log(batch)
        reviewed += len(batch)
    datasets = [client.datasets(f"ours{tag}-{p}", workspace=cfg.workspace) for p in PIPELINES]
    sdk_pull = measure(lambda: [sum(1 for _ in d.records(with_responses=True, batch_size=1000)) for d in datasets])
    pulled = measure(lambda: pull.main(ns))
    stats = read_json(tmp / tag / "review" / "review_stats.json")
    return {"n": n, "create": create, "sdk_push": sdk_push, "push": ours, "again": again, "sdk_pull": sdk_pull,
            "pull": pulled, "reviewed": reviewed, "stats": stats, "load": os.getloadavg()[0]}


def sdk_log(n: int, client, measure: Measured) -> dict:
    """The SDK's records.log of n records into a fresh dataset per pipeline."""
    import argilla as rg

    tag = uuid.uuid4().hex[:6]
    data = records(n, tag)
    logs = []
    for pipeline in PIPELINES:
        dataset = rg.Dataset(name=f"sdk{tag}-{pipeline}", workspace="posttrain",
                             settings=review_settings(pipeline, 1), client=client).create()
        logs.append((dataset, [argilla_record(review_item(r, 20_000)) for r in data if r["pipeline"] == pipeline]))
    return measure(lambda: [d.records.log(rs) for d, rs in logs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--stock", type=int, nargs="*", default=[1000],
                        help="record counts to also log with the SDK into argilla-server as shipped")
    opts = parser.parse_args()
    import logging
    import warnings

    import argilla as rg

    warnings.simplefilter("ignore")
    for name in ("httpx", "argilla.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)

    results = []
    with tempfile.TemporaryDirectory(prefix="argilla-bench-") as tmp:
        tmp = Path(tmp)
        state, port, redis_port = tmp / "state", free_port(), free_port()
        cold, conn = timed(lambda: server.serve(state, port=port, redis_port=redis_port))
        server.stop(state)
        warm, conn = timed(lambda: server.serve(state, port=port, redis_port=redis_port))
        os.environ.update(ARGILLA_API_URL=conn.api_url, ARGILLA_API_KEY=conn.api_key)
        pids = {name: info["pid"] for name, info in json.loads((state / "pids.json").read_text()).items()
                if name in ("server", "worker")}
        try:
            client = server.argilla_client(conn)
            second = rg.User(username=f"bench{uuid.uuid4().hex[:6]}", password=uuid.uuid4().hex, role="annotator",
                             client=client).create()
            rg.Workspace(name="posttrain", client=client).create()
            second.add_to_workspace(client.workspaces("posttrain"))
            measure = Measured(pids)
            run(50, tmp, client, second, measure)  # warm the imports and the server's caches
            results = [run(n, tmp, client, second, measure) for n in opts.records]
        finally:
            server.stop(state)
        stock = {}
        if opts.stock:
            state = tmp / "stock"
            os.environ["POSTTRAIN_ARGILLA_STOCK"] = "1"
            try:
                conn = server.serve(state, port=free_port(), redis_port=free_port())
            finally:
                del os.environ["POSTTRAIN_ARGILLA_STOCK"]
            pids = {name: info["pid"] for name, info in json.loads((state / "pids.json").read_text()).items()
                    if name in ("server", "worker")}
            try:
                client = server.argilla_client(conn)
                rg.Workspace(name="posttrain", client=client).create()
                for n in opts.stock:
                    stock[n] = sdk_log(n, client, Measured(pids))
            finally:
                server.stop(state)

    print()
    print(f"start-up, cold (new database, migrations): {cold:6.1f} s")
    print(f"start-up, warm (restart):                  {warm:6.1f} s")
    for r in results:
        n = r["n"]
        print(f"\n{n} records (load average {r['load']:.1f}; creating the two datasets took {r['create']['wall']:.1f} s)")
        print(f"  {'step':<22}{'wall s':>8}{'r/s':>8}   {'CPU s: client':>14}{'server':>8}{'worker':>8}{'cpu r/s':>9}")
        steps = [("sdk_push", "SDK records.log"), ("push", "review push"), ("again", "push again (0 new)"),
                 ("sdk_pull", "SDK read + responses"), ("pull", "review pull")]
        if n in stock:
            r["stock"] = stock[n]
            steps.insert(0, ("stock", "SDK log, stock server"))
        for key, label in steps:
            m = r[key]
            cpu = m["client"] + m["server"] + m["worker"]
            print(f"  {label:<22}{m['wall']:8.1f}{n / m['wall']:8.0f}   {m['client']:14.1f}{m['server']:8.1f}"
                  f"{m['worker']:8.1f}{n / cpu:9.0f}")
        s = r["stats"]
        kappa = {p: k["verdict"] for p, k in s["kappa"].items()}
        print(f"  {r['reviewed']} records reviewed twice: " + ", ".join(f"{b} {s[b]}" for b in pull.BUCKETS)
              + "; verdict kappa " + ", ".join(f"{p} {k['kappa']} ({k['records']} records)" for p, k in kappa.items()))


if __name__ == "__main__":
    main()
