#!/usr/bin/env bash
# Build the md-base images: ./build.sh [--engine docker|podman] [--line exact|patched|both] [--base-image IMAGE]
#   [--registry PREFIX] [--push] [--reports DIR] [--audit OSV_DIR [--fail-on LEVEL] [--scope all|serving]]
#   [NAME...] [-- FLAGS...]     (./build.sh --help says more)
set -o nounset -o errexit -o pipefail
exec python3 "$(dirname "${BASH_SOURCE[0]}")/dockerfiles/images.py" build "$@"
