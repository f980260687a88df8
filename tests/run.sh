#!/usr/bin/env bash
# Set up .venv with the test extras (and podman for the container tests) and run the test suite in two parts,
# host then containers, printing each part's time; arguments go to pytest in both parts.
# MD_CONTAINER_TESTS=0 leaves out the container tests (no podman, no root needed).
set -o nounset -o errexit -o pipefail

SECONDS_AT=0
_started() { SECONDS_AT=$SECONDS; }
_took() { echo "---> $1: $((SECONDS - SECONDS_AT)) s" >&2; }

_pytest() { "$TOP/.venv/bin/python" -m pytest "$@"; }

_main() {
  local host_rc=0 container_rc=5
  TOP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  cd "$TOP"
  _started; bash "$TOP/.ci/venv" test; bash "$TOP/.ci/kubectl"; _took "test environment (.venv, kubectl)"
  if [ "${MD_CONTAINER_TESTS:-1}" != 0 ]; then
    _started
    bash "$TOP/.ci/containers" bullseye   # podman and the debootstrapped base (root, the first time)
    bash "$TOP/.ci/wheelhouse" "${MD_WHEELHOUSE:-/var/cache/md-base/wheelhouse}"   # wheels, so no test needs PyPI
    _took "podman, base image and wheelhouse"
  fi
  # the host tests in parallel, a test module per process (its servers start once); the container tests in
  # order, since they share the images they build
  _started; _pytest -m "not container" -n auto --maxprocesses 4 --dist loadfile "$@" || host_rc=$?; _took "host tests"
  if [ "${MD_CONTAINER_TESTS:-1}" != 0 ]; then
    container_rc=0
    _started; _pytest -m container "$@" || container_rc=$?; _took "container tests (image builds included)"
  fi
  if [ "$host_rc" -eq 5 ] && [ "$container_rc" -eq 5 ]; then
    echo "---> no tests were collected: failing" >&2
    exit 1
  fi
  for rc in "$host_rc" "$container_rc"; do   # 5, "no tests collected", is fine for one part (a file picked)
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
      exit "$rc"
    fi
  done
}

_main "$@"
