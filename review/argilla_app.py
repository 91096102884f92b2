"""argilla-server with the SQL search engine registered: web server, worker, and app.

Runs inside the server's own virtualenv (.venv-argilla), from the repository root:
  python -m review.argilla_app serve PORT   migrate the database, make sure the
                                            owner account exists, serve API + UI on
                                            127.0.0.1:PORT
  python -m review.argilla_app worker       the background jobs (rq)
argilla_server looks its search engine up by name, so the "sql" engine must be
registered before the app or a job touches it: hence this module. Migration and
serving share one process because importing argilla_server takes ~8 s here.
"""

import asyncio
import os
import sys

import review.sql_search  # noqa: F401  registers the "sql" search engine
from argilla_server import app


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
