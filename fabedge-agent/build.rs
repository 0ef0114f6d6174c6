//! Embeds the kernel object built by `cargo xtask build-ebpf` (its one build
//! path). Building the agent without it is an error that names the fix.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let object = manifest.join("../target/bpfel-unknown-none/release/fabedge");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fabedge.bpf.o");
    if let Err(e) = fs::copy(&object, &out) {
        panic!(
            "the eBPF object {} is missing ({e}): run `cargo xtask build-ebpf` first \
             (`cargo xtask test` and `cargo xtask demo` do it for you)",
            object.display()
        );
    }
}
