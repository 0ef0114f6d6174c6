//! The connector's packet rate and TCP throughput per datapath variant
//! (issue 11's benchmark), in the mini cluster.
//!
//! iperf3 cannot see the connector's per-packet cost on two cores: the
//! sender and every namespace hop share the CPUs. So packets come from the
//! kernel's live-frame generator ([`crate::livegen`]) running in the
//! connector's namespace with `ingress_ifindex` = the NIC they would arrive
//! on, and are counted in the datapath where the connector sends them (a
//! TC counter on the switch port its NIC is wired to):
//!
//! - cloud → edge: Flannel VXLAN as cloud-2's `flannel.1` sends it (cloud-2
//!   pod → edge-1 pod) enters `eth-lan`; the connector's tunnel frame toward
//!   edge-1 is counted on the switch's `cloud-1-wan`.
//! - edge → cloud: our tunnel's VXLAN as edge-1 sends it (edge-1 pod →
//!   cloud-2 pod) enters `eth-wan`; the Flannel frame toward cloud-2 is
//!   counted on `cloud-1-lan`.
//!
//! What runs where, per variant: (b) and (c) inject with a generator that
//! returns `XDP_PASS`, so each frame is an skb received on the NIC: TC
//! ingress, then the fast path (b) or the kernel's VXLAN devices and
//! forwarding (c). (a) chains the program the agent attached to that NIC
//! (natively) behind the generator: its `XDP_TX`/`XDP_REDIRECT` transmit for
//! real, its `XDP_PASS` continues as in (b). A native XDP program attached
//! to the NIC never runs on injected frames by itself (they bypass the
//! driver), so (b) is TC-only even if the agent left one attached; one
//! attached in generic (skb) mode does run, and is reported.
//!
//! One cluster, rounds alternating the variants (the connector's agent is
//! restarted with the variant's arguments), median of the rounds.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fabedge_common::{
    DEFAULT_FLANNEL_PORT, DEFAULT_FLANNEL_VNI, DEFAULT_TUNNEL_PORT, DEFAULT_TUNNEL_VNI,
    TUNNEL_DEV_MAC, TUNNEL_SRC_MAC,
};

use crate::{
    agent::agent_bin,
    bench::report::Report,
    cluster::{Cluster, ClusterOptions},
    livegen::{CountAt, FrameCounter, FrameMatch, Generator, XdpMode, XdpProgram, XdpVerdict},
    netns::Netns,
    packet::{Frame, Mac, vxlan_encap},
};

/// A datapath variant of the connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// The key segment in `xdp.connector_mpps.<dir>.<size>.<variant>`.
    pub key: &'static str,
    pub label: &'static str,
    /// Appended to the connector agent's `run` arguments.
    pub connector_args: &'static [&'static str],
    /// Injected frames go through the XDP program the agent attached to the NIC.
    pub xdp: bool,
}

/// The variants and the connector agent's arguments for each: the one place
/// to adjust when the agent's flags change.
pub const VARIANTS: [Variant; 4] = [
    Variant {
        key: "xdp",
        label: "(a) XDP",
        connector_args: &[],
        xdp: true,
    },
    Variant {
        key: "tc",
        label: "(b) TC only",
        connector_args: &["--xdp", "off"],
        xdp: false,
    },
    Variant {
        key: "kernel",
        label: "(c) kernel path",
        connector_args: &["--no-fast-path", "--xdp", "off"],
        xdp: false,
    },
    // (b) before the fast path encapsulated in the program: into
    // `fe-tunnel`, whose egress program sets a tunnel key per packet.
    Variant {
        key: "tc_tunnel_key",
        label: "(b') TC, tunnel key",
        connector_args: &["--tunnel-key-egress", "--xdp", "off"],
        xdp: false,
    },
];

const CONNECTOR: &str = "cloud-1";
const CLOUD: &str = "cloud-2";
const EDGE: &str = "edge-1";
const LAN_NIC: &str = "eth-lan";
const WAN_NIC: &str = "eth-wan";
const FLANNEL_DEV: &str = "flannel.1";
/// The inner UDP destination of every generated packet (discard): the
/// counters match it, so no other traffic is counted.
const BENCH_PORT: u16 = 9;
/// Inner IPv4 packet sizes (header included).
pub const INNER_SIZES: [usize; 2] = [64, 1400];
const ROUNDS: usize = 5;
const FRAMES_PER_RUN: u32 = 200_000;
const WARMUP_FRAMES: u32 = 2_000;
const SETTLE: Duration = Duration::from_secs(1);
const IPERF_SECONDS: &str = "2";
const IPERF_PORT: u16 = 5201;
const IPERF_READY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    CloudToEdge,
    EdgeToCloud,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::CloudToEdge, Direction::EdgeToCloud];

    pub fn key(self) -> &'static str {
        match self {
            Direction::CloudToEdge => "cloud_to_edge",
            Direction::EdgeToCloud => "edge_to_cloud",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Direction::CloudToEdge => "cloud → edge",
            Direction::EdgeToCloud => "edge → cloud",
        }
    }

    /// The connector NIC the frames arrive on.
    fn ingress_nic(self) -> &'static str {
        match self {
            Direction::CloudToEdge => LAN_NIC,
            Direction::EdgeToCloud => WAN_NIC,
        }
    }

    /// The switch port the connector sends them to.
    fn counted_at(self) -> String {
        match self {
            Direction::CloudToEdge => format!("{CONNECTOR}-wan"),
            Direction::EdgeToCloud => format!("{CONNECTOR}-lan"),
        }
    }
}

/// Addresses and MACs of the frames, read from the running cluster.
struct Wire {
    connector_lan_mac: Mac,
    connector_wan_mac: Mac,
    connector_lan_ip: Ipv4Addr,
    connector_wan_ip: Ipv4Addr,
    cloud_lan_mac: Mac,
    cloud_lan_ip: Ipv4Addr,
    cloud_vtep_mac: Mac,
    /// The VtepMAC cloud-2's Flannel uses for edge-1's pod CIDR.
    edge_vtep_mac_at_cloud: Mac,
    edge_wan_mac: Mac,
    edge_wan_ip: Ipv4Addr,
    cloud_pod: Ipv4Addr,
    edge_pod: Ipv4Addr,
}

impl Wire {
    fn read(cluster: &Cluster) -> Result<Wire> {
        let connector = cluster.node_netns(CONNECTOR)?;
        let cloud = cluster.node_netns(CLOUD)?;
        let edge = cluster.node_netns(EDGE)?;
        let edge_spec = cluster.spec(EDGE)?;
        let connector_spec = cluster.spec(CONNECTOR)?;
        let gateway = edge_spec.pod_cidr.network();
        Ok(Wire {
            connector_lan_mac: connector.mac(LAN_NIC)?,
            connector_wan_mac: connector.mac(WAN_NIC)?,
            connector_lan_ip: connector_spec.internal_ip,
            connector_wan_ip: connector_spec
                .external_ip
                .context("the connector has no ExternalIP (its WAN address)")?,
            cloud_lan_mac: cloud.mac(LAN_NIC)?,
            cloud_lan_ip: cluster.spec(CLOUD)?.internal_ip,
            cloud_vtep_mac: cloud.mac(FLANNEL_DEV)?,
            edge_vtep_mac_at_cloud: neighbour_mac(cloud, FLANNEL_DEV, gateway)
                .with_context(|| format!("{CLOUD}'s Flannel entry for {EDGE}'s pod CIDR"))?,
            edge_wan_mac: edge.mac(WAN_NIC)?,
            edge_wan_ip: edge_spec.external_ip.context("edge-1 has no ExternalIP")?,
            cloud_pod: cluster.pod(CLOUD)?.ip(),
            edge_pod: cluster.pod(EDGE)?.ip(),
        })
    }

    /// The frame as it arrives at the connector, inner IPv4 packet of `size` bytes.
    fn frame(&self, direction: Direction, size: usize) -> Vec<u8> {
        let payload = vec![0x5a; size.saturating_sub(20 + 8)];
        match direction {
            Direction::CloudToEdge => {
                let inner = Frame::eth(self.cloud_vtep_mac, self.edge_vtep_mac_at_cloud)
                    .ipv4(self.cloud_pod, self.edge_pod)
                    .udp(40000, BENCH_PORT)
                    .payload(&payload)
                    .build();
                vxlan_encap(
                    Frame::eth(self.cloud_lan_mac, self.connector_lan_mac),
                    self.cloud_lan_ip,
                    self.connector_lan_ip,
                    40001,
                    DEFAULT_FLANNEL_PORT,
                    DEFAULT_FLANNEL_VNI,
                    &inner,
                )
            }
            Direction::EdgeToCloud => {
                let inner = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
                    .ipv4(self.edge_pod, self.cloud_pod)
                    .udp(40000, BENCH_PORT)
                    .payload(&payload)
                    .build();
                vxlan_encap(
                    Frame::eth(self.edge_wan_mac, self.connector_wan_mac),
                    self.edge_wan_ip,
                    self.connector_wan_ip,
                    40001,
                    DEFAULT_TUNNEL_PORT,
                    DEFAULT_TUNNEL_VNI,
                    &inner,
                )
            }
        }
    }
}

fn neighbour_mac(netns: &Netns, dev: &str, address: Ipv4Addr) -> Result<Mac> {
    let json = netns.ip(&[
        "-j",
        "neigh",
        "show",
        "dev",
        dev,
        "to",
        &address.to_string(),
    ])?;
    let entries: serde_json::Value = serde_json::from_str(&json)?;
    let text = entries
        .get(0)
        .and_then(|e| e.get("lladdr"))
        .and_then(|m| m.as_str())
        .with_context(|| format!("no neighbour entry for {address} on {dev}: {json}"))?;
    parse_mac(text)
}

fn parse_mac(text: &str) -> Result<Mac> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {text:?}"))
}

/// Whether the agent binary knows a flag (the XDP work adds `--xdp`).
pub(super) fn agent_knows(flag: &str) -> Result<bool> {
    let out = std::process::Command::new(agent_bin()?)
        .args(["run", "--help"])
        .output()
        .context("running fabedge-agent run --help")?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(flag))
}

/// The variant's arguments for this agent: without `--xdp` support the
/// agent has no XDP program, and `--xdp <mode>` is dropped.
fn args_for(variant: &Variant, has_xdp_flag: bool) -> Vec<String> {
    let mut args = Vec::new();
    let mut it = variant.connector_args.iter();
    while let Some(arg) = it.next() {
        if *arg == "--xdp" && !has_xdp_flag {
            it.next();
            continue;
        }
        args.push((*arg).to_owned());
    }
    args
}

/// One measurement: delivered frames per second.
#[derive(Debug, Clone, Copy)]
struct Sample {
    mpps: f64,
    delivered: f64,
}

pub(super) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    Some(values[values.len() / 2])
}

/// Runs the whole connector benchmark, prints its tables and records its figures.
pub fn run(report: &mut Report) -> Result<()> {
    let has_xdp_flag = agent_knows("--xdp")?;
    // Without the default `--xdp off`: each variant sets the connector's
    // `--xdp` itself, and the agent takes the flag once.
    let cluster = Cluster::start(ClusterOptions {
        extra_agent_args: vec!["--tunnel".into(), "vxlan".into()],
        ..ClusterOptions::default()
    })?;
    let wire = Wire::read(&cluster)?;
    let switch = cluster.switch()?;
    let connector = cluster.node_netns(CONNECTOR)?;
    let matching = FrameMatch::vxlan_inner_udp_dst_port(BENCH_PORT);
    // What a physical wire gives, for every variant alike: NAPI on the
    // switch's ports, and nodes whose NICs finish checksums before sending.
    // Without the latter, Flannel's VXLAN left its outer UDP checksum to
    // "the NIC" and the XDP rewrite carried a partial sum on: every segment
    // of (a)'s TCP died at the edge. Counting in TC, not XDP.
    crate::xdp::make_the_wire_real(&cluster).context("making the bench cluster's wire real")?;
    let mut counters = Vec::new();
    for direction in Direction::ALL {
        let port = direction.counted_at();
        counters.push(FrameCounter::attach_at(
            switch,
            &port,
            &matching,
            CountAt::TcIngress,
        )?);
    }
    let counter = |d: Direction| &counters[d as usize];

    let server_pod = cluster.pod(EDGE)?;
    let client_pod = cluster.pod(CLOUD)?;
    // A TCP segment a pod sends with checksum offload leaves its checksum
    // to "the NIC" (CHECKSUM_PARTIAL). Between veths it is never filled in:
    // each receiving stack trusts the skb's flag. A frame XDP forwards has
    // no skb, so the edge verifies the checksum and drops every segment
    // (ping, checksummed in software, still works). A real NIC fills it in
    // on the sender. So the pods checksum in software (which also turns TSO
    // off), in every variant alike.
    for pod in [server_pod, client_pod] {
        pod.netns()
            .run_ok("ethtool", &["-K", "eth0", "tx", "off"])
            .with_context(|| format!("turning TX checksum offload off in {}", pod.label()))?;
    }
    let server_ip = server_pod.ip().to_string();
    let _iperf = server_pod
        .netns()
        .spawn("iperf3", &["-s", "-B", &server_ip])?;
    wait_listening(server_pod.netns(), IPERF_PORT)?;

    // [variant][direction][size] → samples; [variant] → TCP Gbit/s.
    let mut pps: Vec<Vec<Vec<Vec<Sample>>>> =
        vec![vec![vec![Vec::new(); INNER_SIZES.len()]; Direction::ALL.len()]; VARIANTS.len()];
    let mut tcp: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut notes: Vec<String> = Vec::new();
    if !has_xdp_flag {
        notes.push(
            "the agent has no --xdp flag (XDP work not merged): (a) is unavailable, \
             (b) and (c) run without --xdp off"
                .into(),
        );
    }

    // The generator alone (restore, then drop): the floor under every figure.
    let mut generator_alone: Vec<Vec<f64>> = vec![Vec::new(); INNER_SIZES.len()];
    for round in 0..ROUNDS {
        for (s, size) in INNER_SIZES.iter().enumerate() {
            let frame = wire.frame(Direction::CloudToEdge, *size);
            let injection = Generator::new(&frame, XdpVerdict::Drop)?.inject(
                connector,
                LAN_NIC,
                FRAMES_PER_RUN,
            )?;
            generator_alone[s].push(injection.pps() / 1e6);
        }
        for (v, variant) in VARIANTS.iter().enumerate() {
            if variant.xdp && !has_xdp_flag {
                continue;
            }
            cluster
                .restart_agent_with_args(CONNECTOR, &args_for(variant, has_xdp_flag))
                .with_context(|| format!("switching the connector to {}", variant.label))?;
            for (d, direction) in Direction::ALL.iter().enumerate() {
                let nic = direction.ingress_nic();
                let attached = XdpProgram::attached(connector, nic)?;
                let chained = match (&attached, variant.xdp) {
                    (Some((_, XdpMode::Native)), true) => true,
                    (Some((prog, mode)), false) | (Some((prog, mode @ XdpMode::Generic)), true) => {
                        let note = format!(
                            "{}: {CONNECTOR}'s {nic} has XDP program {} attached in {mode:?} mode",
                            variant.label,
                            prog.name()
                        );
                        if round == 0 && !notes.contains(&note) {
                            notes.push(note);
                        }
                        false
                    }
                    (None, true) => {
                        let note = format!(
                            "{}: no XDP program on {CONNECTOR}'s {nic}: {} unavailable",
                            variant.label,
                            direction.label()
                        );
                        if !notes.contains(&note) {
                            notes.push(note);
                        }
                        continue;
                    }
                    _ => false,
                };
                for (s, size) in INNER_SIZES.iter().enumerate() {
                    let frame = wire.frame(*direction, *size);
                    let generator = match (&attached, chained) {
                        (Some((prog, _)), true) => {
                            // A fresh fd per generator: each owns what it chains to.
                            Generator::then(&frame, prog.try_clone()?)?
                        }
                        _ => Generator::new(&frame, XdpVerdict::Pass)?,
                    };
                    // Neighbour, route and conntrack caches warm, as in steady state.
                    generator.inject(connector, nic, WARMUP_FRAMES)?;
                    counter(*direction).settled_count(SETTLE)?;
                    let before = counter(*direction).count()?;
                    let injection = generator.inject(connector, nic, FRAMES_PER_RUN)?;
                    let after = counter(*direction).settled_count(SETTLE)?;
                    let delivered = after.saturating_sub(before) as f64;
                    let fraction = delivered / f64::from(injection.frames);
                    // Delivered frames per second of the kernel's time on one CPU.
                    let sample = Sample {
                        mpps: injection.pps() * fraction / 1e6,
                        delivered: fraction,
                    };
                    eprintln!(
                        "round {round} {} {} {size} B: {:.3} Mpps ({} ns/frame; wall clock {:.3} Mpps), {:.1}% delivered{}",
                        variant.label,
                        direction.label(),
                        sample.mpps,
                        injection.kernel_ns_per_frame,
                        delivered / injection.elapsed.as_secs_f64().max(1e-9) / 1e6,
                        sample.delivered * 100.0,
                        if chained {
                            " (through the attached XDP program)"
                        } else {
                            ""
                        }
                    );
                    pps[v][d][s].push(sample);
                }
            }
            match iperf_gbps(client_pod.netns(), &server_ip) {
                Ok(gbps) => tcp[v].push(gbps),
                Err(e) => {
                    let ping = client_pod
                        .ping(server_pod.ip(), 3)
                        .map(|p| format!("{}/{} pings answered", p.received, p.sent))
                        .unwrap_or_else(|e| format!("ping failed: {e:#}"));
                    notes.push(format!(
                        "{} round {round}: TCP failed ({ping}): {e:#}",
                        variant.label
                    ));
                }
            }
        }
    }
    // Leave the connector as the cluster started it.
    cluster.restart_agent_with_args(CONNECTOR, &[])?;

    println!();
    println!(
        "connector packet rate: kernel live-frame generator at {CONNECTOR}'s NIC, counted in TC at the \
         switch port it sends to; delivered Mpps per core by the kernel's clock (generator included), \
         median of {ROUNDS} alternating rounds × {FRAMES_PER_RUN} frames"
    );
    for (s, size) in INNER_SIZES.iter().enumerate() {
        let key = format!("xdp.generator_mpps.{size}");
        match median(&mut generator_alone[s]) {
            Some(m) => {
                report.record(key, m);
                println!("generator alone (restore, XDP_DROP), {size} B: {m:.3} Mpps");
            }
            None => report.unavailable(key),
        }
    }
    println!(
        "{:<14} {:>7} {:>9} {:>11} {:>14} {:>11} {:>6} {:>6} {:>6} {:>6} {:>10}",
        "direction",
        "inner",
        "(a) XDP",
        "(b) TC",
        "(c) kernel",
        "(b') TC key",
        "a/c",
        "a/b",
        "b/c",
        "b/b'",
        "delivered"
    );
    let mut ratios: [Vec<f64>; 4] = Default::default();
    for (d, direction) in Direction::ALL.iter().enumerate() {
        for (s, size) in INNER_SIZES.iter().enumerate() {
            let mut figures = [None; VARIANTS.len()];
            let mut delivered_min: Option<f64> = None;
            for (v, variant) in VARIANTS.iter().enumerate() {
                let samples = &pps[v][d][s];
                let key = format!(
                    "xdp.connector_mpps.{}.{size}.{}",
                    direction.key(),
                    variant.key
                );
                let mut values: Vec<f64> = samples.iter().map(|x| x.mpps).collect();
                figures[v] = median(&mut values);
                match figures[v] {
                    Some(m) => report.record(key, m),
                    None => report.unavailable(key),
                }
                for sample in samples {
                    delivered_min =
                        Some(delivered_min.map_or(sample.delivered, |m| m.min(sample.delivered)));
                }
            }
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let case_ratios = [
                ("vs_kernel", ratio(figures[0], figures[2])),
                ("vs_tc", ratio(figures[0], figures[1])),
                ("tc_vs_kernel", ratio(figures[1], figures[2])),
                ("tc_vs_tc_tunnel_key", ratio(figures[1], figures[3])),
            ];
            for (i, (name, value)) in case_ratios.iter().enumerate() {
                let key = format!("xdp.connector_pps_ratio_{name}.{}.{size}", direction.key());
                match value {
                    Some(r) => {
                        report.record(key, *r);
                        ratios[i].push(*r);
                    }
                    None => report.unavailable(key),
                }
            }
            let show = |x: Option<f64>, digits: usize| {
                x.map_or("n/a".to_owned(), |x| format!("{x:.digits$}"))
            };
            println!(
                "{:<14} {:>5} B {:>9} {:>11} {:>14} {:>11} {:>6} {:>6} {:>6} {:>6} {:>9}%",
                direction.label(),
                size,
                show(figures[0], 3),
                show(figures[1], 3),
                show(figures[2], 3),
                show(figures[3], 3),
                show(case_ratios[0].1, 2),
                show(case_ratios[1].1, 2),
                show(case_ratios[2].1, 2),
                show(case_ratios[3].1, 2),
                show(delivered_min.map(|d| d * 100.0), 1),
            );
        }
    }
    // The headline ratios: geometric mean over the measured cases.
    for (i, name) in ["vs_kernel", "vs_tc", "tc_vs_kernel", "tc_vs_tc_tunnel_key"]
        .iter()
        .enumerate()
    {
        let key = format!("xdp.connector_pps_ratio_{name}");
        match geometric_mean(&ratios[i]) {
            Some(r) => report.record(key, r),
            None => report.unavailable(key),
        }
    }

    let mut gbps = [None; VARIANTS.len()];
    for (v, variant) in VARIANTS.iter().enumerate() {
        gbps[v] = median(&mut tcp[v]);
        let key = format!("xdp.tcp_gbps.{}", variant.key);
        match gbps[v] {
            Some(g) => report.record(key, g),
            None => report.unavailable(key),
        }
    }
    for (name, a, b) in [
        ("vs_kernel", gbps[0], gbps[2]),
        ("vs_tc", gbps[0], gbps[1]),
        ("tc_vs_kernel", gbps[1], gbps[2]),
        ("tc_vs_tc_tunnel_key", gbps[1], gbps[3]),
    ] {
        let key = format!("xdp.tcp_ratio_{name}");
        match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => report.record(key, a / b),
            _ => report.unavailable(key),
        }
    }
    println!();
    println!(
        "TCP {CLOUD} pod → {CONNECTOR} → {EDGE} pod (iperf3 {IPERF_SECONDS} s, median of {ROUNDS} alternating rounds)"
    );
    for (v, variant) in VARIANTS.iter().enumerate() {
        println!(
            "{:<18} {:>8} Gbit/s",
            variant.label,
            gbps[v].map_or("n/a".to_owned(), |g| format!("{g:.2}"))
        );
    }
    let show_ratio = |key: &str| {
        report
            .get(key)
            .map_or("n/a".to_owned(), |r| format!("{r:.2}"))
    };
    println!(
        "ratios: pps a/c {}, a/b {}, b/c {}, b/b' {} (geometric mean over the cases above); TCP a/c {}, a/b {}, b/c {}, b/b' {}",
        show_ratio("xdp.connector_pps_ratio_vs_kernel"),
        show_ratio("xdp.connector_pps_ratio_vs_tc"),
        show_ratio("xdp.connector_pps_ratio_tc_vs_kernel"),
        show_ratio("xdp.connector_pps_ratio_tc_vs_tc_tunnel_key"),
        show_ratio("xdp.tcp_ratio_vs_kernel"),
        show_ratio("xdp.tcp_ratio_vs_tc"),
        show_ratio("xdp.tcp_ratio_tc_vs_kernel"),
        show_ratio("xdp.tcp_ratio_tc_vs_tc_tunnel_key"),
    );
    for variant in &VARIANTS {
        println!(
            "{:<18} connector args: {}",
            variant.label,
            if variant.connector_args.is_empty() {
                "(defaults)".to_owned()
            } else {
                variant.connector_args.join(" ")
            }
        );
    }
    for note in &notes {
        println!("note: {note}");
    }
    Ok(())
}

pub(super) fn geometric_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| *v <= 0.0) {
        return None;
    }
    let log_sum: f64 = values.iter().map(|v| v.ln()).sum();
    Some((log_sum / values.len() as f64).exp())
}

pub(super) fn wait_listening(netns: &Netns, port: u16) -> Result<()> {
    let deadline = Instant::now() + IPERF_READY_TIMEOUT;
    let filter = format!("sport = :{port}");
    loop {
        let out = netns.run_ok("ss", &["-Hltn", &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "iperf3 server in {} is not listening on {port} after {IPERF_READY_TIMEOUT:?}",
                netns.name()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub(super) fn iperf_gbps(client: &Netns, server: &str) -> Result<f64> {
    let out = client.run_ok("iperf3", &["-c", server, "-t", IPERF_SECONDS, "-J"])?;
    let json: serde_json::Value = serde_json::from_str(&out).context("parsing iperf3 -J")?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| format!("iperf3 reported no received rate: {out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_args_drop_xdp_only_when_the_agent_lacks_it() {
        assert_eq!(
            args_for(&VARIANTS[2], true),
            ["--no-fast-path", "--xdp", "off"]
        );
        assert_eq!(args_for(&VARIANTS[2], false), ["--no-fast-path"]);
        assert!(args_for(&VARIANTS[1], false).is_empty());
    }
}
