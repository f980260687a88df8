#!/usr/bin/env bash
# One command for the side-by-side benchmarks (not part of the test run): installs wrk, and MLServer, LitServe and
# py-spy in venvs under bench/.work, then runs bench/bench.py with the project's .venv and writes bench/RESULTS.md;
# with --memory first, bench/memory.py instead (bench/MEMORY.md). Other arguments go to the Python script
# (bench/bench.py --help: --reps, --seconds, --only, --unset-blas-env).
set -o nounset -o errexit -o pipefail

_venv() {   # _venv NAME PACKAGE...: a venv in bench/.work/NAME with the packages, once
  local venv="$WORK/$1"; shift
  if [ ! -f "$venv/.installed" ]; then
    echo "---> installing $* into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "$@"
    touch "$venv/.installed"
  fi
}

_main() {
  local top
  top="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  WORK="$top/bench/.work"
  mkdir -p "$WORK"
  command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
  bash "$top/.ci/venv" examples,fast
  # uvloop 0.22 breaks MLServer 1.7's parallel workers at start (SeldonIO/MLServer#2286)
  _venv mlserver mlserver mlserver-sklearn "uvloop==0.21.0" py-spy
  _venv litserve litserve scikit-learn joblib pyzmq "uvloop==0.21.0"
  if [ "${1:-}" = --memory ]; then
    shift
    exec "$top/.venv/bin/python" "$top/bench/memory.py" --mlserver-python "$WORK/mlserver/bin/python" "$@"
  fi
  exec "$top/.venv/bin/python" "$top/bench/bench.py" --mlserver-python "$WORK/mlserver/bin/python" \
    --litserve-python "$WORK/litserve/bin/python" --py-spy "$WORK/mlserver/bin/py-spy" "$@"
}

_main "$@"
