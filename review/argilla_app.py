"""argilla-server with the SQL search engine registered: web server, worker, and app.

Runs inside the server's own virtualenv (.venv-argilla), from the repository root:
  python -m review.argilla_app serve PORT   migrate the database, make sure the
                                            owner account exists, serve API + UI on
                                            127.0.0.1:PORT
  python -m review.argilla_app worker       the background jobs (rq)
argilla_server looks its search engine up by name, so the "sql" engine must be
registered before the app or a job touches it: hence this module. Migration and
serving share one process because importing argilla_server takes ~8 s here.

It also removes two costs argilla-server 2.8.0 pays per record in a bulk upsert.
Profiled in-process (1,000 records like the pipelines', 5 metadata values and one
suggestion each), they were nine tenths of the time and held push to ~30 records/s
on two cores:
  - after committing, the server builds a webhook event for every record (a query
    loading the dataset with five relations, plus the record serialised), only to
    find that no webhook is enabled. Here the enabled webhooks are asked for once per
    request; with none, no event is built. With any, every event goes out as before.
  - each metadata value (and suggestion) is validated through a pydantic TypeAdapter
    built anew for it. Here one adapter per settings type, built once, does the same
    validation.
Neither changes what is stored or answered. They apply to that version only: another
version runs unpatched (and slower), never half-patched. POSTTRAIN_ARGILLA_STOCK=1
runs the server as shipped (bench/review_throughput.py measures the difference).
"""

import asyncio
import os
import sys
import weakref

import review.sql_search  # noqa: F401  registers the "sql" search engine
from argilla_server import app
from argilla_server._version import __version__ as SERVER_VERSION

PATCHED_VERSION = "2.8.0"


def _patch_bulk_overhead() -> None:
    from pydantic import TypeAdapter

    from argilla_server.api.schemas.v1.questions import QuestionSettings
    from argilla_server.bulk import records_bulk
    from argilla_server.contexts import webhooks
    from argilla_server.models.database import MetadataProperty, Question
    from argilla_server.models.metadata_properties import MetadataPropertySettings
    from argilla_server.webhooks.v1.records import notify_record_event

    hooked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # db session -> any webhook enabled

    async def notify_if_hooked(db, record_event, record):
        if db not in hooked:
            hooked[db] = bool(await webhooks.list_enabled_webhooks(db))
        return await notify_record_event(db, record_event, record) if hooked[db] else []

    records_bulk.notify_record_event_v1 = notify_if_hooked
    metadata_settings, question_settings = TypeAdapter(MetadataPropertySettings), TypeAdapter(QuestionSettings)
    MetadataProperty.parsed_settings = property(lambda self: metadata_settings.validate_python(self.settings))
    Question.parsed_settings = property(lambda self: question_settings.validate_python(self.settings))


if SERVER_VERSION == PATCHED_VERSION and not os.environ.get("POSTTRAIN_ARGILLA_STOCK"):
    _patch_bulk_overhead()


def serve(port: int) -> None:
    import uvicorn
    from argilla_server.cli.database.migrate import migrate_db
    from argilla_server.cli.database.users.create_default import _create_default

    migrate_db(revision="head")
    # The owner's key and password come from the environment, not argv: a command
    # line is visible to every user of the machine.
    asyncio.run(_create_default(os.environ["ARGILLA_OWNER_API_KEY"], os.environ["ARGILLA_OWNER_PASSWORD"], True))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def worker() -> None:
    from rq.worker import Worker

    from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION

    # One plain worker: the jobs are light (record status, webhooks) and the machine
    # small; argilla's own CLI starts a pool of two.
    Worker([HIGH_QUEUE, DEFAULT_QUEUE], connection=REDIS_CONNECTION).work()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        worker()
