"""`posttrain review SUBCOMMAND`: human review in Argilla.

  serve   start the local Argilla server (Redis + API/UI + worker, 127.0.0.1)
  stop    stop what `serve` started
  status  is the configured server up, and does it accept the key?
  push    send validated candidates for review
  pull    read the reviews back: reviewed.jsonl, rejected.jsonl, pending.jsonl,
          review_stats.json

push and pull take `--pairs data/prefs/pairs.jsonl` to review prefs' preference
pairs instead of records (own datasets; pull writes to data/prefs/review).

push and pull talk to ARGILLA_API_URL with ARGILLA_API_KEY when set, otherwise to
the local server started by `serve` (its credentials are in .argilla/).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.recipe import add_recipe_arguments

DEFAULT_INPUT = ["data/synth/*/accepted.jsonl"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[1].rstrip()
    sub = parser.add_subparsers(dest="review_command", metavar="SUBCOMMAND", required=True)

    from review import server

    for name, help_text in (
        ("serve", "start the local Argilla server and return once it answers"),
        ("stop", "stop the processes `serve` started (by pid)"),
        ("status", "check that the configured server answers and accepts the key"),
    ):
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--state-dir", default=str(server.STATE_DIR),
                             help="credentials, database, pids and logs (default: %(default)s)")
        if name == "serve":
            command.add_argument("--port", type=int, default=server.DEFAULT_PORT)
            command.add_argument("--redis-port", type=int, default=server.DEFAULT_REDIS_PORT)

    push = sub.add_parser("push", help="send validated candidates to Argilla for review",
                          description="Send validated candidates to Argilla (one dataset per pipeline).")
    add_recipe_arguments(push)
    what = push.add_mutually_exclusive_group()
    what.add_argument("--input", nargs="+", default=DEFAULT_INPUT, metavar="JSONL",
                      help="candidate records, globs allowed (default: %(default)s)")
    what.add_argument("--pairs", nargs="+", metavar="JSONL",
                      help="preference pairs (posttrain prefs' pairs.jsonl) instead of records")

    pull = sub.add_parser("pull", help="read reviews back into reviewed/rejected/pending records + stats",
                          description="Read reviews back; every input record ends in one bucket.")
    add_recipe_arguments(pull)
    what = pull.add_mutually_exclusive_group()
    what.add_argument("--input", nargs="+", default=DEFAULT_INPUT, metavar="JSONL",
                      help="the records that were pushed, globs allowed (default: %(default)s)")
    what.add_argument("--pairs", nargs="+", metavar="JSONL",
                      help="the preference pairs that were pushed, instead of records")
    pull.add_argument("--out", help="output folder (default: data/review; with --pairs data/prefs/review)")


def main(args: argparse.Namespace) -> int:
    from review.dataset import ReviewInputError
    from review.server import ReviewServerError

    # One line per HTTP request drowns the progress bar and the summary.
    for name in ("httpx", "argilla.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)

    if args.review_command in ("serve", "stop", "status"):
        from review import server

        run = {"serve": server.serve_main, "stop": server.stop_main, "status": server.status_main}
    else:
        from review import pull, push

        run = {"push": push.main, "pull": pull.main}
    try:
        return run[args.review_command](args)
    except (ReviewServerError, ReviewInputError) as exc:
        print(f"posttrain review {args.review_command}: error: {exc}", file=sys.stderr)
        return 2
