//! fabedge's developer entry points. `cargo xtask <command>`.

mod build;
mod setup;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "fabedge build, setup, test and demo")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install build and test dependencies (apt packages, bpf-linker, rust-src).
    Setup,
    /// Build the eBPF object (with BTF) and print its path.
    BuildEbpf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = workspace();
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::BuildEbpf => {
            setup::run()?;
            let object = build::build_ebpf(&ws)?;
            println!("{}", object.display());
            Ok(())
        }
    }
}
