use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use fabedge_agent::{
    datapath::{self, AttachMode, Attachment, Datapath, PinLayout},
    inspect,
};
use log::info;

#[derive(Parser)]
#[command(name = "fabedge-agent", version, about = "fabedge node agent: eBPF forwarding plane for edge Kubernetes")]
struct Cli {
    /// Root of our bpffs state; pins go under <ROOT>/v<layout version>/.
    #[arg(long, global = true, default_value = datapath::DEFAULT_BPFFS_ROOT, env = "FABEDGE_BPFFS_ROOT")]
    bpffs_root: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the datapath, adopt its pinned maps and attach programs, then exit
    /// (the programs stay attached through pinned links / tc filters).
    Attach {
        /// PROGRAM=IFACE, e.g. from-pod=br-fabedge (repeatable).
        #[arg(long = "attach", required = true)]
        attachments: Vec<Attachment>,
        #[arg(long, value_enum, default_value = "auto")]
        attach_mode: AttachMode,
    },
    /// Remove every program, link, filter and map pin fabedge created.
    Uninstall,
    /// Show what the datapath holds (reads pinned maps; the agent need not run).
    Inspect {
        #[arg(value_enum)]
        what: inspect::What,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    // Printing into a closed pipe (`inspect | head`) should end quietly.
    // SAFETY: restoring the default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let layout = PinLayout::new(&cli.bpffs_root);
    match cli.command {
        Cmd::Attach { attachments, attach_mode } => {
            let mut dp = Datapath::load(layout, attach_mode)?;
            for attachment in &attachments {
                dp.attach(attachment)?;
            }
            info!("attached {} program(s) in {:?} mode", attachments.len(), dp.attach_mode());
            Ok(())
        }
        Cmd::Uninstall => {
            let report = datapath::uninstall(&cli.bpffs_root)?;
            info!(
                "removed {} link(s), {} netlink filter(s), {} map pin(s)",
                report.links.len(),
                report.netlink_filters.len(),
                report.maps.len()
            );
            Ok(())
        }
        Cmd::Inspect { what, json } => inspect::run(&layout, what, json),
    }
}
