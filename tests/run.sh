#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite; arguments go to pytest.
set -o nounset -o errexit -o pipefail

_main() {
  local top rc=0
  top="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  bash "$top/.ci/venv" test
  cd "$top"
  "$top/.venv/bin/python" -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "---> no tests were collected: failing" >&2
    exit 1
  fi
  exit "$rc"
}

_main "$@"
