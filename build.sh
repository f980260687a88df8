#!/usr/bin/env bash
# Build the md-base images: ./build.sh [--engine docker|podman] [--base-image IMAGE] [--registry PREFIX] [--push]
#                                      [NAME...] [-- FLAGS...]     (./build.sh --help says more)
set -o nounset -o errexit -o pipefail
exec python3 "$(dirname "${BASH_SOURCE[0]}")/dockerfiles/images.py" build "$@"
