//! Edge receive with XDP delivering to pods (`--xdp-pod-rx`) against TC
//! only (`--xdp off`), in the mini cluster: the packet rate at which edge-1
//! takes our tunnel's frames for its pod, and TCP edge-2 pod → edge-1 pod.
//!
//! Packets come from the kernel's live-frame generator running in edge-1's
//! namespace with `ingress_ifindex` = its WAN NIC: the connector's tunnel
//! frames for edge-1's pod, as they arrive. (a) chains the program the
//! agent attached natively to the NIC behind the generator (its redirect
//! delivers into the pod's veth for real); (b) injects with a generator
//! returning `XDP_PASS`, so each frame is an skb received on the NIC:
//! `fe-tunnel`, `fe_tunnel_ingress`, the kernel's routing, `br-fabedge`.
//! Frames are counted where both end: TC ingress of the pod's interface.
//! Rounds alternate the variants (edge-1's agent restarted with the
//! variant's arguments); medians of the rounds.

use anyhow::{Context, Result};
use fabedge_common::{DEFAULT_TUNNEL_PORT, DEFAULT_TUNNEL_VNI, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC};

use super::connector::{geometric_mean, iperf_gbps, median, wait_listening};
use crate::{
    bench::report::Report,
    cluster::{Cluster, ClusterOptions},
    livegen::{CountAt, FrameCounter, FrameMatch, Generator, XdpMode, XdpProgram, XdpVerdict},
    packet::{Frame, vxlan_encap},
};

const EDGE: &str = "edge-1";
const PEER_EDGE: &str = "edge-2";
const CONNECTOR: &str = "cloud-1";
const CLOUD: &str = "cloud-2";
const WAN_NIC: &str = "eth-wan";
const POD_NIC: &str = "eth0";
/// The inner UDP destination of every generated packet (discard).
const BENCH_PORT: u16 = 9;
const INNER_SIZES: [usize; 2] = [64, 1400];
const ROUNDS: usize = 3;
const FRAMES_PER_RUN: u32 = 200_000;
const WARMUP_FRAMES: u32 = 2_000;
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);
const IPERF_PORT: u16 = 5201;

/// (key, label, edge-1's extra agent arguments, through the attached XDP program).
const VARIANTS: [(&str, &str, &[&str], bool); 2] = [
    (
        "xdp",
        "(a) XDP to the pod",
        &["--xdp", "native", "--xdp-pod-rx"],
        true,
    ),
    ("tc", "(b) TC only", &["--xdp", "off"], false),
];

/// Runs the edge receive benchmark, prints its table and records its figures.
pub fn run(report: &mut Report) -> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        extra_agent_args: vec!["--tunnel".into(), "vxlan".into()],
        ..ClusterOptions::default()
    })?;
    let edge = cluster.node_netns(EDGE)?;
    let connector = cluster.node_netns(CONNECTOR)?;
    let edge_spec = cluster.spec(EDGE)?;
    let connector_wan = cluster
        .spec(CONNECTOR)?
        .external_ip
        .context("the connector has no ExternalIP (its WAN address)")?;
    let edge_wan = edge_spec.external_ip.context("edge-1 has no ExternalIP")?;
    let pod = cluster.pod(EDGE)?;
    let cloud_pod = cluster.pod(CLOUD)?.ip();
    let frame = |size: usize| -> Result<Vec<u8>> {
        let inner = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
            .ipv4(cloud_pod, pod.ip())
            .udp(40000, BENCH_PORT)
            .payload(&vec![0x5a; size.saturating_sub(20 + 8)])
            .build();
        Ok(vxlan_encap(
            Frame::eth(connector.mac(WAN_NIC)?, edge.mac(WAN_NIC)?),
            connector_wan,
            edge_wan,
            40001,
            DEFAULT_TUNNEL_PORT,
            DEFAULT_TUNNEL_VNI,
            &inner,
        ))
    };
    let counter = FrameCounter::attach_at(
        pod.netns(),
        POD_NIC,
        &FrameMatch::udp_dst_port(BENCH_PORT),
        CountAt::TcIngress,
    )?;
    // Segments a pod checksums with offload arrive unfinished between
    // veths; a frame XDP redirects has no skb to say so. Software
    // checksums in both pods, both variants alike (see `connector.rs`).
    let client = cluster.pod(PEER_EDGE)?;
    for p in [pod, client] {
        p.netns()
            .run_ok("ethtool", &["-K", POD_NIC, "tx", "off"])
            .with_context(|| format!("turning TX checksum offload off in {}", p.label()))?;
    }
    let server_ip = pod.ip().to_string();
    let _iperf = pod.netns().spawn("iperf3", &["-s", "-B", &server_ip])?;
    wait_listening(pod.netns(), IPERF_PORT)?;

    let mut pps = vec![vec![Vec::new(); INNER_SIZES.len()]; VARIANTS.len()];
    let mut tcp = vec![Vec::new(); VARIANTS.len()];
    let mut notes = Vec::new();
    for round in 0..ROUNDS {
        for (v, (_, label, args, through_xdp)) in VARIANTS.iter().enumerate() {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            cluster
                .restart_agent_with_args(EDGE, &args)
                .with_context(|| format!("switching {EDGE} to {label}"))?;
            let attached = XdpProgram::attached(edge, WAN_NIC)?;
            let chain = match attached {
                Some((prog, XdpMode::Native)) if *through_xdp => Some(prog),
                Some((prog, mode)) => {
                    let note = format!("{label}: {WAN_NIC} has {} in {mode:?} mode", prog.name());
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                    None
                }
                None => None,
            };
            for (s, size) in INNER_SIZES.iter().enumerate() {
                let frame = frame(*size)?;
                let generator = match &chain {
                    Some(prog) => Generator::then(&frame, prog.try_clone()?)?,
                    None => Generator::new(&frame, XdpVerdict::Pass)?,
                };
                // The agent learns the pod within a poll interval of its
                // restart: warm up until frames arrive (or give up, noted).
                generator.inject(edge, WAN_NIC, WARMUP_FRAMES)?;
                counter.settled_count(SETTLE)?;
                let before = counter.count()?;
                let redirected_before = redirected_to_pod(&cluster)?;
                let injection = generator.inject(edge, WAN_NIC, FRAMES_PER_RUN)?;
                let after = counter.settled_count(SETTLE)?;
                let by_xdp = redirected_to_pod(&cluster)? - redirected_before;
                let fraction = after.saturating_sub(before) as f64 / f64::from(injection.frames);
                let mpps = injection.pps() * fraction / 1e6;
                eprintln!(
                    "round {round} {label} {size} B: {mpps:.3} Mpps ({} ns/frame), {:.1}% delivered, \
                     {:.1}% by XDP",
                    injection.kernel_ns_per_frame,
                    fraction * 100.0,
                    by_xdp as f64 / f64::from(injection.frames) * 100.0
                );
                pps[v][s].push(mpps);
            }
            match iperf_gbps(client.netns(), &server_ip) {
                Ok(gbps) => tcp[v].push(gbps),
                Err(e) => notes.push(format!("{label} round {round}: TCP failed: {e:#}")),
            }
        }
    }
    cluster.restart_agent_with_args(EDGE, &[])?;

    println!();
    println!(
        "edge receive: live frames at {EDGE}'s {WAN_NIC} (the connector's tunnel frames for its pod), \
         counted at the pod's {POD_NIC}; delivered Mpps per core by the kernel's clock, median of \
         {ROUNDS} alternating rounds × {FRAMES_PER_RUN} frames; TCP {PEER_EDGE} pod → {EDGE} pod"
    );
    println!(
        "{:<22} {:>10} {:>10} {:>12}",
        "variant", "64 B Mpps", "1400 B Mpps", "TCP Gbit/s"
    );
    let mut figures = vec![[None; INNER_SIZES.len()]; VARIANTS.len()];
    let mut gbps = vec![None; VARIANTS.len()];
    for (v, (key, label, _, _)) in VARIANTS.iter().enumerate() {
        for (s, size) in INNER_SIZES.iter().enumerate() {
            figures[v][s] = median(&mut pps[v][s]);
            let k = format!("xdp.edge_rx_mpps.{size}.{key}");
            match figures[v][s] {
                Some(m) => report.record(k, m),
                None => report.unavailable(k),
            }
        }
        gbps[v] = median(&mut tcp[v]);
        let k = format!("xdp.edge_rx_tcp_gbps.{key}");
        match gbps[v] {
            Some(g) => report.record(k, g),
            None => report.unavailable(k),
        }
        let show = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{x:.3}"));
        println!(
            "{label:<22} {:>10} {:>10} {:>12}",
            show(figures[v][0]),
            show(figures[v][1]),
            show(gbps[v])
        );
    }
    let mut ratios = Vec::new();
    for (s, size) in INNER_SIZES.iter().enumerate() {
        let k = format!("xdp.edge_rx_pps_ratio_vs_tc.{size}");
        match (figures[0][s], figures[1][s]) {
            (Some(a), Some(b)) if b > 0.0 => {
                report.record(k, a / b);
                ratios.push(a / b);
            }
            _ => report.unavailable(k),
        }
    }
    match geometric_mean(&ratios) {
        Some(r) => report.record("xdp.edge_rx_pps_ratio_vs_tc", r),
        None => report.unavailable("xdp.edge_rx_pps_ratio_vs_tc"),
    }
    match (gbps[0], gbps[1]) {
        (Some(a), Some(b)) if b > 0.0 => report.record("xdp.edge_rx_tcp_ratio_vs_tc", a / b),
        _ => report.unavailable("xdp.edge_rx_tcp_ratio_vs_tc"),
    }
    let show_ratio = |key: &str| {
        report
            .get(key)
            .map_or("n/a".to_owned(), |r| format!("{r:.2}"))
    };
    println!(
        "ratios XDP/TC: pps {} (geometric mean of the sizes), TCP {}",
        show_ratio("xdp.edge_rx_pps_ratio_vs_tc"),
        show_ratio("xdp.edge_rx_tcp_ratio_vs_tc")
    );
    for note in &notes {
        println!("note: {note}");
    }
    Ok(())
}

/// edge-1's `xdp_redirect_to_pod` counter: which variant really delivered.
fn redirected_to_pod(cluster: &Cluster) -> Result<u64> {
    Ok(cluster
        .counters(EDGE)?
        .get(fabedge_common::Counter::XdpRedirectToPod.name())
        .copied()
        .unwrap_or(0))
}
