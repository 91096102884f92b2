"""`posttrain review push`: send validated candidates to Argilla for human review.

Reads the synthetic-data stage's accepted records (`--input`, globs allowed), picks
those to review per pipeline (all, or `review.sample_per_pipeline` chosen by a
seeded hash), and adds to each pipeline's dataset the records it does not hold yet:
pushing twice adds nothing, pushing after new records arrive adds only those, and a
push cut short (a server killed mid-way) is finished by running it again.

Records go to argilla-server's bulk upsert endpoint, `review.batch_size` per request
(500, the server's maximum), keyed by the record's stable id. The SDK's
`records.log` does the same request but rebuilds every record the server returns as
an SDK object, which on two cores costs about as much as the upload itself; here the
answer is only checked. A failed request is retried with backoff after reading the
ids the dataset holds by then, so a retry sends only what is missing. With `--pairs`,
prefs' preference pairs go to their own datasets the same way (review/pairs.py).
"""

from __future__ import annotations

import functools
import logging
import re
import time
import warnings
from typing import Any

from pipeline.contract import Pair, Record, read_pairs
from pipeline.recipe import load_recipe
from review import pairs
from review.dataset import (
    dataset_name, load_candidates, review_item, review_settings, sample_for_review,
)
from review.server import ReviewServerError, argilla_client, reachable_server

log = logging.getLogger(__name__)
RETRIES = 3
LIST_PAGE = 1000  # the server's largest page when listing records


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.review
    if getattr(args, "pairs", None):  # namespaces built by hand (tests, bench) review records
        candidates = load_candidates(args.pairs, read_pairs, "--pairs")
        name, settings, convert, what = pairs.dataset_name, pairs.pair_settings, pairs.pair_item, "pairs"
    else:
        candidates = load_candidates(args.input)
        name, settings, convert, what = dataset_name, review_settings, review_item, "records"
    conn, note = reachable_server(cfg.mode)
    if conn is None:
        print(f"nothing pushed: {note}")
        return 0
    client = argilla_client(conn)
    started = time.monotonic()
    totals: dict[str, dict[str, int]] = {}
    for pipeline, records in sorted(candidates.items()):
        totals[pipeline] = push_pipeline(client, cfg, name(cfg.dataset_prefix, pipeline), records,
                                         functools.partial(settings, pipeline), convert)
    elapsed = time.monotonic() - started
    for pipeline, counts in totals.items():
        print(f"{pipeline}: {counts['added']} added, {counts['already']} already there,"
              f" {counts['not_sampled']} not sampled  -> {name(cfg.dataset_prefix, pipeline)}")
    added = sum(c["added"] for c in totals.values())
    print(f"pushed {added} {what} to {conn.api_url} in {elapsed:.1f} s (workspace {cfg.workspace})")
    return 0


def push_pipeline(client, cfg, name: str, records: list[Record | Pair], settings, convert=review_item,
                  ) -> dict[str, int]:
    """Add to dataset `name` the records it lacks. `settings(min_submitted)` builds the
    dataset if it is new; `convert(record, display_chars)` makes a review item."""
    import tenacity

    dataset = ensure_dataset(client, cfg, name, settings)
    chosen = sample_for_review(records, cfg.sample_per_pipeline, cfg.seed)
    wanted = [r for r in records if r.id in chosen]
    questions = {q.name: str(q.id) for q in dataset.settings.questions}

    def send_missing() -> int:
        # Read the ids on every attempt: what a failed call already stored stays.
        existing = existing_ids(client, dataset.id)
        new = [r for r in wanted if r.id not in existing]
        for start in range(0, len(new), cfg.batch_size):
            records = new[start:start + cfg.batch_size]
            batch = [bulk_item(convert(r, cfg.display_chars), questions) for r in records]
            reply = client.http_client.put(f"/api/v1/datasets/{dataset.id}/records/bulk", json={"items": batch})
            if reply.status_code == 422:
                raise ReviewServerError(f"the server at {client.api_url} refused {refused(reply, records)}")
            if reply.status_code >= 400:
                raise BulkError(reply.status_code, reply.text[:500])
        return len(new)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(RETRIES + 1), wait=tenacity.wait_exponential(multiplier=1),  # 1, 2, 4 s
        retry=tenacity.retry_if_exception(_transient),
        before_sleep=tenacity.before_sleep_log(log, logging.WARNING), reraise=True,
    )
    try:
        added = retrying(send_missing)
    except ReviewServerError:
        raise
    except Exception as exc:  # httpx's errors and the server's answers
        raise ReviewServerError(
            f"pushing {name} to {client.api_url} failed after"
            f" {retrying.statistics.get('attempt_number', 1)} attempt(s): {type(exc).__name__}: {exc}"
        ) from None
    return {"added": added, "already": len(wanted) - added, "not_sampled": len(records) - len(chosen)}


class BulkError(RuntimeError):
    def __init__(self, status_code: int, text: str):
        super().__init__(f"HTTP {status_code}: {text}")
        self.status_code = status_code


def refused(reply, records: list[Record | Pair]) -> str:
    """What the server's 422 says, naming the record (by id) it is about."""
    try:
        errors = reply.json()["detail"]["params"]["errors"]
        first = errors[0]
        where = first["loc"]
        record = records[where[2]].id if len(where) > 2 and isinstance(where[2], int) else None
        message = " ".join(f"{'.'.join(str(p) for p in where[3:])}: {first['msg']}".split())[:400]
        return (f"record {record!r}: {message}" if record else message) + (
            f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
    except (ValueError, KeyError, IndexError, TypeError):
        position = re.search(r"[Rr]ecord at position (\d+)", reply.text)
        if position and int(position[1]) < len(records):
            return f"record {records[int(position[1])].id!r}: {reply.text[:400]}"
        return reply.text[:500]


def bulk_item(item: dict[str, Any], questions: dict[str, str]) -> dict[str, Any]:
    """A review item as the bulk endpoint takes it: our id as external_id, suggestions
    by question id."""
    return {
        "external_id": item["id"],
        "fields": item["fields"],
        "metadata": item["metadata"],
        "suggestions": [{"question_id": questions[s["question"]], "value": s["value"], "score": s.get("score"),
                         "agent": s.get("agent"), "type": "model"} for s in item.get("suggestions", [])],
    }


def ensure_dataset(client, cfg, name: str, settings):
    import argilla as rg

    with warnings.catch_warnings():  # "not found" is the expected answer the first time
        warnings.simplefilter("ignore")
        workspace = client.workspaces(cfg.workspace)
        if workspace is None:
            workspace = rg.Workspace(name=cfg.workspace, client=client).create()
        dataset = client.datasets(name, workspace=workspace)
    wanted = settings(cfg.min_submitted)
    if dataset is None:
        return rg.Dataset(name=name, workspace=workspace, settings=wanted, client=client).create()
    have = [f.name for f in dataset.settings.fields]
    if sorted(have) != sorted(f.name for f in wanted.fields):
        raise ReviewServerError(
            f"dataset {name} in workspace {cfg.workspace} has fields {have}, made by another version of"
            f" this layout (now {[f.name for f in wanted.fields]}): delete it in the UI or push under"
            " another review.dataset_prefix"
        )
    # Guidelines and the reviewers a record needs follow the recipe and the code.
    changed = False
    if (dataset.settings.guidelines or "").strip() != wanted.guidelines.strip():
        dataset.settings.guidelines, changed = wanted.guidelines, True
    if dataset.settings.distribution.min_submitted != cfg.min_submitted:
        dataset.settings.distribution, changed = wanted.distribution, True
    if changed:
        dataset.update()
    return dataset


def existing_ids(client, dataset_id) -> set[str]:
    """The record ids (our stable ids) the dataset holds, read page by page."""
    ids: set[str] = set()
    offset = 0
    while True:
        reply = client.http_client.get(f"/api/v1/datasets/{dataset_id}/records",
                                       params={"offset": offset, "limit": LIST_PAGE})
        if reply.status_code >= 400:
            raise BulkError(reply.status_code, reply.text[:500])
        items = reply.json()["items"]
        ids.update(str(item["external_id"]) for item in items)
        offset += len(items)
        if len(items) < LIST_PAGE:
            return ids


def _transient(exc: Exception) -> bool:
    import httpx

    status = getattr(exc, "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)) or isinstance(
        exc.__cause__ or exc.__context__, httpx.TransportError
    )
