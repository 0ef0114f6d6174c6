//! `cargo xtask demo`: brings up the mini cluster in network namespaces, sends
//! ping, TCP and UDP along every path of the seed's matrix, prints a matrix
//! path → ✓/✗ with round-trip times and the evidence each path left in the
//! datapath statistics, then what `fabedge-agent inspect` shows on an edge
//! node and the connector and a few lines of an edge agent's Prometheus
//! metrics, and tears everything down. Exits non-zero if any
//! path failed. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fabedge_agent::observe::DEFAULT_METRICS_PORT;
use fabedge_tests::{
    cluster::{Cluster, ClusterOptions, Exchange, FIXTURE, PathOutcome, PathSpec, seed_matrix},
    metrics::http_get,
};

/// Nodes whose `inspect` output the demo shows: an edge node and the connector.
const INSPECTED: [&str; 2] = ["edge-1", "cloud-1"];
/// Every agent serves metrics on its node's loopback (each node is a namespace).
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, DEFAULT_METRICS_PORT);
/// Families of the metrics excerpt the demo prints.
const METRICS_SHOWN: [&str; 6] = [
    "fabedge_build_info",
    "fabedge_drops_total",
    "fabedge_peer_packets_total",
    "fabedge_map_entries",
    "fabedge_apply_last_duration_seconds",
    "fabedge_ready",
];

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(false)` when a path failed.
fn run() -> Result<bool> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    build_agent()?;

    println!("Bringing up the mini cluster of {FIXTURE}");
    println!(
        "  tunnels: --tunnel vxlan (plaintext). ESP, the default mode, needs a kernel with ESP and \
         AES-GCM, which this demo does not assume; `cargo xtask test` proves it in Debian-kernel VMs."
    );
    let started = Instant::now();
    let mut options = ClusterOptions::default();
    options
        .extra_agent_args
        .extend(["--metrics-addr".to_owned(), METRICS.to_string()]);
    let cluster = Cluster::start(options).context("bringing up the mini cluster")?;
    println!("  up in {:.1?}\n", started.elapsed());
    print_endpoints(&cluster)?;

    println!("Paths (ping: average of 3; TCP: 64 KiB echo; UDP: 1200-byte echo)\n");
    let paths = seed_matrix();
    let width = paths
        .iter()
        .map(|p| p.title.chars().count())
        .max()
        .unwrap_or(0);
    let mut failed: Vec<(PathSpec, PathOutcome)> = Vec::new();
    for path in paths {
        let outcome = cluster.check_path(&path)?;
        print_outcome(&outcome, width);
        if !outcome.passed() {
            failed.push((path, outcome));
        }
    }

    for node in INSPECTED {
        for what in ["routes", "peers", "counters"] {
            println!("\n$ fabedge-agent inspect {what}    # on {node}");
            print!("{}", cluster.agent_inspect_table(node, what)?);
        }
    }
    print_metrics(&cluster, INSPECTED[0])?;

    for (path, outcome) in &failed {
        println!(
            "\n✗ {} failed:\n  {}",
            outcome.title,
            outcome.failures().join("\n  ")
        );
        print!("{}", cluster.diagnostics(&cluster.nodes_of(path)));
    }
    println!("\nTearing down…");
    drop(cluster);
    if failed.is_empty() {
        println!("All paths work.");
    } else {
        println!("{} path(s) failed.", failed.len());
    }
    Ok(failed.is_empty())
}

/// A few families of `node`'s `/metrics`, as the paths above left them.
fn print_metrics(cluster: &Cluster, node: &str) -> Result<()> {
    let page = http_get(cluster.node_netns(node)?, METRICS, "/metrics")?;
    println!("\n$ curl http://{METRICS}/metrics    # on {node}, excerpt");
    for line in page.body.lines().filter(|l| !l.starts_with('#')) {
        let family = line.split(['{', ' ']).next().unwrap_or_default();
        // Zeros left out, but for the drop a misrouted packet would count.
        let zero = line.ends_with(" 0") && !line.contains("reason=\"drop_no_route\"");
        let boring = zero && (family == "fabedge_drops_total" || family == "fabedge_map_entries");
        if METRICS_SHOWN.contains(&family) && !boring {
            println!("{line}");
        }
    }
    Ok(())
}

/// The demo runs the agent binary from `target/`: rebuild it when the demo
/// is run by cargo (as `cargo xtask demo` does), so it is never stale or missing.
fn build_agent() -> Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "fabedge-agent",
            "--bin",
            "fabedge-agent",
        ])
        .status()
        .context("running cargo build for fabedge-agent")?;
    if !status.success() {
        bail!("building fabedge-agent failed");
    }
    Ok(())
}

fn print_endpoints(cluster: &Cluster) -> Result<()> {
    let row = |cells: [&str; 5]| {
        let [node, role, ip, cidr, pod] = cells;
        println!("  {node:<8} {role:<10} {ip:<11} {cidr:<14} {pod}");
    };
    row(["NODE", "ROLE", "NODE IP", "POD CIDR", "POD IP"]);
    for node in cluster.node_names() {
        let spec = cluster.spec(&node)?;
        row([
            &node,
            &spec.role.to_string(),
            &spec.internal_ip.to_string(),
            &spec.pod_cidr.to_string(),
            &cluster.pod(&node)?.ip().to_string(),
        ]);
    }
    println!();
    Ok(())
}

fn print_outcome(outcome: &PathOutcome, width: usize) {
    let mark = if outcome.passed() { "✓" } else { "✗" };
    let times: Vec<String> = outcome.exchanges.iter().map(timings).collect();
    let padding = width.saturating_sub(outcome.title.chars().count());
    println!(
        "  {mark} {}{}  {}",
        outcome.title,
        " ".repeat(padding),
        times.join("  |  ")
    );
    if !outcome.evidence.is_empty() {
        println!("      {}", outcome.evidence.join("; "));
    }
}

/// `ping 0.21 ms  tcp 3.4 ms  udp 0.30 ms`, with ✗ for what failed.
fn timings(exchange: &Exchange) -> String {
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    let ping = exchange.ping_rtt().map_or("✗".to_owned(), ms);
    let tcp = match &exchange.tcp {
        Ok(echo) if echo.retransmitted > 0 => {
            let why = if echo.path_mtu_discovered {
                ", path-MTU discovery"
            } else {
                ""
            };
            format!(
                "{} ({} retransmitted{why})",
                ms(echo.elapsed),
                echo.retransmitted
            )
        }
        Ok(echo) => ms(echo.elapsed),
        Err(_) => "✗".to_owned(),
    };
    let udp = exchange.udp.as_ref().map_or("✗".to_owned(), |d| ms(*d));
    format!("ping {ping:>9}  tcp {tcp:>9}  udp {udp:>9}")
}
