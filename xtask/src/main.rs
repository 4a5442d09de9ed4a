//! Developer tasks: `cargo xtask build-ebpf`, `cargo xtask bench`,
//! `cargo xtask fuzz`.
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (lb-ebpf) on its own, for bpftool or inspection.
    /// `cargo build` builds and embeds it anyway, through lb-userspace's build.rs.
    BuildEbpf {
        /// Build without optimisations (the verifier usually rejects that).
        #[arg(long)]
        debug: bool,
    },
    /// Run the benchmarks against kube-proxy's iptables and nftables modes
    /// and the direct path; writes bench/RESULTS.md and plots. Installs
    /// what is missing and builds in release first. Arguments go to the
    /// runner: --quick, --only crr,crr6,rr,packet,control,memory,
    /// --services 1,1000, --seconds S, --out DIR.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the differential test of the packet hooks (pod tc, external tc,
    /// XDP) against the reference model on many random frames each
    /// (release build; CI runs 100,000).
    Fuzz {
        /// How many frames.
        #[arg(long, default_value_t = 10_000_000)]
        packets: u64,
        /// The random seed (a run is repeatable with the same one).
        #[arg(long, default_value_t = 0x5eed_1234)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf { debug } => build_ebpf(debug),
        Task::Bench { args } => bench(&args),
        Task::Fuzz { packets, seed } => fuzz(packets, seed),
    }
}

fn fuzz(packets: u64, seed: u64) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let status = Command::new("bash").current_dir(root).args(["-c", "source scripts/setup.sh"]).status()?;
    if !status.success() {
        bail!("scripts/setup.sh failed");
    }
    let status = Command::new("cargo")
        .current_dir(root)
        .args(["test", "--release", "-p", "lb-tests", "--test", "differential", "--", "--nocapture"])
        .env("LB_DIFFERENTIAL_PACKETS", packets.to_string())
        .env("LB_DIFFERENTIAL_SEED", seed.to_string())
        .status()?;
    if !status.success() {
        bail!("the differential test found a disagreement (above)");
    }
    Ok(())
}

/// The same build aya-build runs from lb-userspace/build.rs: nightly,
/// core rebuilt for the BPF target, BTF emitted by bpf-linker.
fn build_ebpf(debug: bool) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args(["run", &toolchain, "cargo", "build", "--package", "lb-ebpf", "--bins"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf", std::env::consts::ARCH),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    if !debug {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running rustup (is rustup installed?)")?;
    if !status.success() {
        bail!("building lb-ebpf failed ({status}); scripts/setup.sh installs nightly, rust-src and bpf-linker");
    }
    let target_dir = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), Into::into);
    let profile = if debug { "debug" } else { "release" };
    println!("{}", target_dir.join("bpfel-unknown-none").join(profile).join("lb-ebpf").display());
    Ok(())
}

/// Installs what is missing (scripts/setup.sh), builds every binary in
/// release (the agent, the load tools, the runner), and runs the runner.
fn bench(args: &[String]) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let status = Command::new("bash").current_dir(root).args(["-c", "source scripts/setup.sh"]).status()?;
    if !status.success() {
        bail!("scripts/setup.sh failed");
    }
    let status = Command::new("cargo").current_dir(root).args(["build", "--release", "--bins"]).status()?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let status = Command::new("cargo")
        .current_dir(root)
        .args(["run", "--release", "--quiet", "-p", "lb-tests", "--bin", "bench", "--"])
        .args(args)
        .status()?;
    if !status.success() {
        bail!("the benchmark runner failed");
    }
    Ok(())
}
