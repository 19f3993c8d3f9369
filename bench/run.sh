#!/usr/bin/env bash
# apibox's benchmark, one command:
#
#   bench/run.sh                                    # direct, bare, apibox; 2 rounds of 3 s warm-up + 10 s
#   bench/run.sh --rounds 1 --duration 3 --warmup 1 # a quick check that everything works
#   bench/run.sh --with-litellm                     # also LiteLLM (installed in its own venv)
#   bench/run.sh --write-doc                        # and regenerate docs/PERFORMANCE.md
#
# Installs what it needs first (idempotent): wrk from Debian's packages, only with --profile
# py-spy from PyPI, and only with --with-litellm a venv ($LITELLM_VENV, default /tmp/peer-venv)
# with litellm[proxy].
# Every other argument goes to `python -m bench` (see `bench/run.sh --help`).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PYTHON=${PYTHON:-python3}
LITELLM_VENV=${LITELLM_VENV:-/tmp/peer-venv}
export LITELLM_VENV

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

for a in "$@"; do
  case "$a" in -h|--help|--report) cd "$REPO" && exec "$PYTHON" -m bench "$@" ;; esac
done

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)..." >&2
  as_root apt-get install -y -qq wrk >/dev/null 2>&1 || { as_root apt-get update -qq && as_root apt-get install -y -qq wrk; }
fi
command -v taskset >/dev/null || { echo "taskset (util-linux) is missing" >&2; exit 1; }

if ! "$PYTHON" -c 'import apibox, aiohttp' 2>/dev/null; then
  echo "apibox is not importable by $PYTHON: install it first (pip install -e '.[fast]')" >&2
  exit 1
fi
"$PYTHON" -c 'import uvloop' 2>/dev/null ||
  echo "warning: uvloop is missing, so every target runs on asyncio's own loop (pip install -e '.[fast]')" >&2

# py-spy only when asked to profile (PyPI, into the same interpreter)
for a in "$@"; do
  if [ "$a" = "--profile" ] && ! command -v py-spy >/dev/null; then
    echo "installing py-spy..." >&2
    "$PYTHON" -m pip install -q py-spy
  fi
done

# LiteLLM only when asked: its own venv, never the one apibox runs in
for a in "$@"; do
  if [ "$a" = "--with-litellm" ] && [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
    echo "installing LiteLLM into $LITELLM_VENV..." >&2
    [ -x "$LITELLM_VENV/bin/python" ] || python3 -m venv "$LITELLM_VENV"
    "$LITELLM_VENV/bin/pip" install -q --upgrade pip
    "$LITELLM_VENV/bin/pip" install -q 'litellm[proxy]'
  fi
done

cd "$REPO"
BENCH_LAUNCHER="bench/run.sh" exec "$PYTHON" -m bench "$@"
