# syntax=docker/dockerfile:1
# The agent image: the `lb` binary (with its eBPF object embedded) and bpftool.
# Build from the repository root: docker build -t lb .

# The eBPF object needs a nightly toolchain with rust-src and bpf-linker 0.10,
# which uses that toolchain's own LLVM.
FROM rust:1.95-bookworm AS build
ARG EBPF_TOOLCHAIN=nightly-2026-05-19
RUN rustup toolchain install "${EBPF_TOOLCHAIN}" --profile minimal --component rust-src \
 && cargo install bpf-linker@0.10.1 --locked
WORKDIR /src
COPY . .
ENV LB_EBPF_TOOLCHAIN=${EBPF_TOOLCHAIN}
RUN cargo build --release --locked --package lb-userspace --bin lb

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends bpftool ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/lb /usr/local/bin/lb
ENTRYPOINT ["/usr/local/bin/lb"]
CMD ["run"]
