"""The argilla-server ASGI app, worker and owner account, with the SQL search engine.

Runs inside the server's own virtualenv (.venv-argilla), from the repository root:
  python -m uvicorn review.argilla_app:app     the API and the web UI
  python -m review.argilla_app worker          the background jobs (rq)
  python -m review.argilla_app create-owner    the owner account, from the environment
argilla_server looks its search engine up by name, so the "sql" engine must be
registered before the app or a job touches it: hence one module for all three.
"""

import asyncio
import os
import sys

import review.sql_search  # noqa: F401  registers the "sql" search engine
from argilla_server import app  # noqa: F401


def worker() -> None:
    from rq.worker import Worker

    from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION

    # One plain worker: the jobs are light (record status, webhooks) and the machine
    # small; argilla's own CLI starts a pool of two.
    Worker([HIGH_QUEUE, DEFAULT_QUEUE], connection=REDIS_CONNECTION).work()


def create_owner() -> None:
    # Read from the environment, not argv: a command line is visible to every user.
    from argilla_server.cli.database.users.create_default import _create_default

    asyncio.run(_create_default(os.environ["ARGILLA_OWNER_API_KEY"], os.environ["ARGILLA_OWNER_PASSWORD"], True))


if __name__ == "__main__":
    {"worker": worker, "create-owner": create_owner}[sys.argv[1]]()
