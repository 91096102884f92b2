"""`posttrain review push`: send validated candidates to Argilla for human review.

Reads the synthetic-data stage's accepted records (`--input`, globs allowed), picks
those to review per pipeline (all, or `review.sample_per_pipeline` chosen by a
seeded hash), and adds to each pipeline's dataset the records it does not hold yet:
pushing twice adds nothing, pushing after new records arrive adds only those.
Batches of `review.batch_size`; a failed batch is retried with backoff, and since
records are upserted by id a retry never duplicates one. With `--pairs`, prefs'
preference pairs go to their own datasets the same way (review/pairs.py).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

from pipeline.recipe import load_recipe
from review import pairs
from review.dataset import dataset_name, load_candidates, review_settings, sample_for_review, to_argilla_record
from review.server import ReviewServerError, argilla_client, reachable_server

log = logging.getLogger(__name__)
RETRIES = 3


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.review
    if getattr(args, "pairs", None):  # namespaces built by hand (tests, bench) review records
        candidates = load_candidates(args.pairs, pairs.check_pair, "--pairs")
        name, settings, convert, what = pairs.dataset_name, pairs.pair_settings, pairs.to_argilla_pair, "pairs"
    else:
        candidates = load_candidates(args.input)
        name, settings, convert, what = dataset_name, review_settings, to_argilla_record, "records"
    conn, note = reachable_server(cfg.mode)
    if conn is None:
        print(f"nothing pushed: {note}")
        return 0
    client = argilla_client(conn)
    started = time.monotonic()
    totals: dict[str, dict[str, int]] = {}
    for pipeline, records in sorted(candidates.items()):
        totals[pipeline] = push_pipeline(client, cfg, name(cfg.dataset_prefix, pipeline), records,
                                         settings, convert)
    elapsed = time.monotonic() - started
    for pipeline, counts in totals.items():
        print(f"{pipeline}: {counts['added']} added, {counts['already']} already there,"
              f" {counts['not_sampled']} not sampled  -> {name(cfg.dataset_prefix, pipeline)}")
    added = sum(c["added"] for c in totals.values())
    print(f"pushed {added} {what} to {conn.api_url} in {elapsed:.1f} s (workspace {cfg.workspace})")
    return 0


def push_pipeline(client, cfg, name: str, records: list[dict[str, Any]],
                  settings=review_settings, convert=to_argilla_record) -> dict[str, int]:
    """Add to dataset `name` the records it lacks. `settings` (min_submitted -> rg.Settings)
    builds the dataset if it is new; `convert` turns one record into an rg.Record."""
    import tenacity

    dataset = ensure_dataset(client, cfg, name, settings)
    chosen = sample_for_review(records, cfg.sample_per_pipeline, cfg.seed)
    wanted = [r for r in records if r["id"] in chosen]

    def send_missing() -> int:
        # Read the ids on every attempt: what a failed call already stored stays.
        existing = existing_ids(dataset)
        new = [r for r in wanted if r["id"] not in existing]
        if new:
            dataset.records.log([convert(r) for r in new], batch_size=min(cfg.batch_size, len(new)))
        return len(new)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(RETRIES + 1), wait=tenacity.wait_exponential(multiplier=1),  # 1, 2, 4 s
        retry=tenacity.retry_if_exception(_transient),
        before_sleep=tenacity.before_sleep_log(log, logging.WARNING), reraise=True,
    )
    try:
        added = retrying(send_missing)
    except Exception as exc:  # the SDK raises its own errors and httpx's
        raise ReviewServerError(
            f"pushing {name} to {client.api_url} failed after"
            f" {retrying.statistics.get('attempt_number', 1)} attempt(s): {type(exc).__name__}: {exc}"
        ) from None
    return {"added": added, "already": len(wanted) - added, "not_sampled": len(records) - len(chosen)}


def ensure_dataset(client, cfg, name: str, settings=review_settings):
    import argilla as rg

    with warnings.catch_warnings():  # "not found" is the expected answer the first time
        warnings.simplefilter("ignore")
        workspace = client.workspaces(cfg.workspace)
        if workspace is None:
            workspace = rg.Workspace(name=cfg.workspace, client=client).create()
        dataset = client.datasets(name, workspace=workspace)
    if dataset is None:
        dataset = rg.Dataset(
            name=name, workspace=workspace, settings=settings(cfg.min_submitted), client=client
        ).create()
    return dataset


def existing_ids(dataset) -> set[str]:
    return {str(r.id) for r in dataset.records(with_suggestions=False, with_responses=False, batch_size=1000)}


def _transient(exc: Exception) -> bool:
    import httpx

    status = getattr(exc, "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)) or isinstance(
        exc.__cause__ or exc.__context__, httpx.TransportError
    )
