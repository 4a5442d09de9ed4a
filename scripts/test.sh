#!/usr/bin/env bash
# Every test: unit tests, BPF_PROG_TEST_RUN tests of the datapath, and
# end-to-end tests in network namespaces. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The end-to-end tests run the real `lb` binary of the same profile.
cargo build --quiet --bins
cargo test "$@"
