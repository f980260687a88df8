#!/usr/bin/env bash
# One command for the side-by-side benchmarks (not part of the test run): installs wrk, MLServer and py-spy (in
# bench/.work/mlserver), then runs bench/bench.py with the project's .venv and writes bench/RESULTS.md;
# with --memory first, bench/memory.py instead (bench/MEMORY.md).
set -o nounset -o errexit -o pipefail
top="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$top/bench/.work"
mkdir -p "$work"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
bash "$top/.ci/venv" examples,fast
if [ ! -x "$work/mlserver/bin/mlserver" ]; then
  python3 -m venv "$work/mlserver"
  # uvloop 0.22 breaks MLServer 1.7's parallel workers at start (SeldonIO/MLServer#2286)
  "$work/mlserver/bin/pip" install --quiet mlserver mlserver-sklearn "uvloop==0.21.0"
fi
[ -x "$work/mlserver/bin/py-spy" ] || "$work/mlserver/bin/pip" install --quiet py-spy
if [ "${1:-}" = --memory ]; then
  shift
  exec "$top/.venv/bin/python" "$top/bench/memory.py" --mlserver-python "$work/mlserver/bin/python" "$@"
fi
exec "$top/.venv/bin/python" "$top/bench/bench.py" --mlserver-python "$work/mlserver/bin/python" \
  --py-spy "$work/mlserver/bin/py-spy" "$@"
