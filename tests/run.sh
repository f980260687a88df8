#!/usr/bin/env bash
# Set up .venv with the test extras (and podman for the container tests) and run the test suite;
# arguments go to pytest. MD_CONTAINER_TESTS=0 leaves out the container tests (no podman, no root needed).
set -o nounset -o errexit -o pipefail

_main() {
  local top rc=0
  top="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  bash "$top/.ci/venv" test
  cd "$top"
  local select=()
  if [ "${MD_CONTAINER_TESTS:-1}" = 0 ]; then
    select=(-m "not container")
  else
    bash "$top/.ci/containers" bullseye   # podman and the debootstrapped base (root, the first time)
    bash "$top/.ci/wheelhouse" "${MD_WHEELHOUSE:-/var/cache/md-base/wheelhouse}"   # the laptop stack's wheels
  fi
  "$top/.venv/bin/python" -m pytest "${select[@]}" "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "---> no tests were collected: failing" >&2
    exit 1
  fi
  exit "$rc"
}

_main "$@"
