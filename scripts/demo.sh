#!/usr/bin/env bash
# The demo: ClusterIP load balancing between pods in a sandbox of network
# namespaces, with the real agent, eBPF datapath and curl. Cleans up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --quiet -p lb-userspace -p lb-tests --bins
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/demo"
