//! fabedge's developer entry points: `cargo xtask <command>`. Every command
//! first runs `setup`, which installs what is missing and says so.

mod build;
mod crd;
mod fuzz;
mod image;
mod kube;
mod recap;
mod setup;
mod test;
mod toolchain;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "fabedge build, setup, test and demo")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install build and test dependencies (apt packages, bpf-linker, rust-src, kube-apiserver).
    Setup,
    /// Build the eBPF object (with BTF) and print its path.
    BuildEbpf,
    /// Run every test: unit, datapath (BPF_PROG_TEST_RUN), network namespaces, kernel VMs.
    Test {
        /// Leave out the Debian-kernel VM suite (says so in the output).
        #[arg(long)]
        skip_vm: bool,
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Per-packet cost of each datapath verdict, as ratios to a baseline run in the same
    /// process; edge tunnel throughput; the connector's packet rate per datapath variant;
    /// connector failover gaps and probe cost with two connectors.
    Bench {
        /// Also write every figure, under stable keys, to this JSON file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run only these sections (comma-separated): verdicts, edge-tunnel, connector, edge-rx,
        /// ha, scale, scale-kube, edge-watch.
        #[arg(long)]
        only: Option<String>,
    },
    /// Bring up the mini cluster in network namespaces, show every path working, tear down.
    Demo,
    /// Build the agent's OCI image (static binary, no base) as an oci-archive tar.
    Image {
        /// Where to write the archive (default target/image/fabedge-agent.oci.tar).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write deploy/crd.yaml (the Community CRD) from the agent's Rust types.
    GenCrd,
    /// Prove the VM harness on every kernel (exit codes, netns + VXLAN, ESP with AES-GCM).
    VmSelfTest,
    /// Boot a Debian kernel VM and run one command in it (the host root is shared read-only).
    Vm {
        #[arg(long, default_value = "6.12")]
        kernel: vm::Kernel,
        /// Modules to keep out of this boot (comma-separated, e.g. esp4,esp6):
        /// not preloaded, and refused when the kernel asks for them.
        #[arg(long, value_delimiter = ',')]
        without_modules: Vec<String>,
        /// KEY=VALUE set for the program (repeatable), e.g.
        /// FABEDGE_TEST_AGENT=<the static agent> as `cargo xtask test` sets it.
        #[arg(long = "env")]
        env: Vec<String>,
        program: PathBuf,
        args: Vec<String>,
    },
}

/// The workspace `cargo xtask` runs in. `cargo run` sets CARGO_MANIFEST_DIR
/// at run time too; that one wins over the path baked in at build time, so
/// a target dir copied from another checkout (a git worktree) builds and
/// tests this checkout, not the one the binary was compiled in.
pub fn workspace() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Build the agent, then run one of the `fabedge-tests` binaries.
fn run_tests_bin(ws: &Path, bin: &str, what: &str, release: bool, args: &[String]) -> Result<()> {
    let status = Command::new("cargo")
        .current_dir(ws)
        .args(["build", "--quiet", "-p", "fabedge-agent"])
        .status()?;
    if !status.success() {
        bail!("building fabedge-agent failed");
    }
    let mut cmd = Command::new("cargo");
    cmd.current_dir(ws)
        .args(["run", "--quiet", "-p", "fabedge-tests", "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = workspace();
    setup::run()?;
    match cli.command {
        Cmd::Setup => kube::ensure().map(drop),
        Cmd::BuildEbpf => {
            let object = build::build_ebpf(&ws)?;
            println!("{}", object.display());
            Ok(())
        }
        Cmd::Test { skip_vm, filter } => {
            kube::ensure()?;
            build::build_ebpf(&ws)?;
            test::run(&ws, &test::Options { skip_vm, filter })
        }
        Cmd::Demo => {
            build::build_ebpf(&ws)?;
            run_tests_bin(&ws, "fabedge-demo", "the demo", false, &[])
        }
        Cmd::Bench { json, only } => {
            build::build_ebpf(&ws)?;
            if only
                .as_deref()
                .is_none_or(|only| only.split(',').any(|s| s.starts_with("scale")))
            {
                // The scale sections (scale, scale-kube) time a release agent.
                let status = Command::new("cargo")
                    .current_dir(&ws)
                    .args(["build", "--quiet", "--release", "-p", "fabedge-agent"])
                    .status()?;
                if !status.success() {
                    bail!("building the release fabedge-agent failed");
                }
            }
            let mut args = Vec::new();
            if let Some(json) = json {
                // The benchmark runs in the workspace; the path is the caller's.
                let path = std::env::current_dir()?.join(json);
                args.extend(["--json".to_owned(), path.display().to_string()]);
            }
            if let Some(only) = only {
                args.extend(["--only".to_owned(), only]);
            }
            run_tests_bin(&ws, "fabedge-bench", "the benchmark", true, &args)
        }
        Cmd::Image { out } => {
            let out = out.unwrap_or_else(|| image::default_out(&ws));
            let built = image::build(&ws, &out)?;
            println!("{} {}", built.reference, out.display());
            Ok(())
        }
        Cmd::GenCrd => crd::write(&ws),
        Cmd::VmSelfTest => vm::self_test(),
        Cmd::Vm {
            kernel,
            without_modules,
            env,
            program,
            args,
        } => {
            let without_modules: Vec<&str> = without_modules.iter().map(String::as_str).collect();
            let env = env
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("--env {pair}: expected KEY=VALUE"))
                })
                .collect::<Result<Vec<_>>>()?;
            let run = vm::VmRun {
                kernel,
                program: &program,
                args: &args,
                env: &env,
                timeout: std::time::Duration::from_secs(600),
                without_modules: &without_modules,
            };
            let code = vm::run(&run)?;
            std::process::exit(code);
        }
    }
}
