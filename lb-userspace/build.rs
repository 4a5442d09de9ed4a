//! Builds lb-ebpf with the nightly toolchain (`LB_EBPF_TOOLCHAIN` names
//! another, such as a dated nightly; through aya-build) and leaves
//! the object in OUT_DIR for `include_bytes_aligned!`. Without bpf-linker,
//! or with AYA_BUILD_SKIP=1, an empty object is left instead, so that
//! `cargo check` and `cargo clippy` work on any machine; such a binary
//! refuses to load and says why.
use std::{env, fs, path::PathBuf};

fn on_path(program: &str) -> bool {
    env::var_os("PATH").is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("lb-userspace sits in the workspace");
    let ebpf_dir = workspace.join("lb-ebpf");
    println!("cargo:rerun-if-changed={}", workspace.join("lb-common").display());
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    let object = out_dir.join("lb-ebpf");

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip || !on_path("bpf-linker") {
        println!("cargo:rerun-if-changed={}", ebpf_dir.display());
        println!(
            "cargo:warning=eBPF object not built (bpf-linker not on PATH, or AYA_BUILD_SKIP); `lb run` will refuse to start"
        );
        fs::write(&object, [])?;
        return Ok(());
    }
    let root_dir = ebpf_dir.to_str().expect("UTF-8 path");
    // A pinned nightly (the Dockerfile's) or whatever `nightly` is here.
    let toolchain = env::var("LB_EBPF_TOOLCHAIN").ok();
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir, ..Default::default() }],
        toolchain.as_deref().map_or(aya_build::Toolchain::Nightly, aya_build::Toolchain::Custom),
    )
}
