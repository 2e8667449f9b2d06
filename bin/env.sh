# Sourced by bin/build-dev, bin/build-prod and bin/deploy: the project's Python with this
# checkout's code first on the path, and the toolchains' usual homes on PATH.
#   ROOT  the checkout          PY  its interpreter (.venv, made by bin/setup if missing)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$ROOT/bin/setup" >&2
fi
PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PATH:/usr/local/go/bin:/usr/local/sbin:/usr/sbin:/sbin"
