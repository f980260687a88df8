#!/usr/bin/env bash
# Set up .venv, train the iris example, and serve it on http://127.0.0.1:8080 (extra flags go to `serve`).
set -o nounset -o errexit -o pipefail

_main() {
  local top
  top="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  bash "$top/.ci/venv" examples
  echo "---> training examples/iris" >&2
  "$top/.venv/bin/python" "$top/examples/iris/train.py"
  echo "---> serving examples/iris (Ctrl-C stops it)" >&2
  exec "$top/.venv/bin/md-runtime" serve "$top/examples/iris" --host 127.0.0.1 "$@"
}

_main "$@"
