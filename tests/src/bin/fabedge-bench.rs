//! `cargo xtask bench`: per-packet cost of each datapath verdict, measured by
//! the kernel with BPF_PROG_TEST_RUN and reported as a ratio to a baseline
//! measured in the same process: the same program returning at its first
//! check (datapath not configured). Each sample is one run on a fresh copy of
//! the frame: with `repeat` > 1 the kernel runs the program again on the
//! packet it already rewrote (TTL decremented, VXLAN header removed or
//! added, addresses translated), which measures another path. Ratios, not absolute numbers, are
//! what compare across machines. Then a throughput comparison in the mini
//! cluster: the eBPF fast path against the kernel's forwarding path, and the
//! connector's packet rate per datapath variant (`fabedge_tests::bench::connector`).
//! The `verdicts` section also times each `fe_xdp_uplink` verdict against an
//! empty XDP program (`xdp.verdict_ns_ratio_vs_empty.<case>`).
//!
//! Options: `--json FILE` writes every figure under a stable key
//! (`fabedge_tests::bench::report`); `--only SECTION[,SECTION]` runs some of
//! `verdicts`, `edge-tunnel`, `connector`, `edge-rx` (edge receive with XDP
//! delivering to pods: `fabedge_tests::bench::edge_rx`), `ha` (connector
//! failover gaps and probe cost with two connectors:
//! `fabedge_tests::bench::ha`), `scale` (a release agent's endpoint change
//! latency, full sync, memory and idle CPU at 10 k Services:
//! `fabedge_tests::bench::scale`), `scale-kube` (the same in kube mode, the
//! Services created in the in-test API server: `fabedge_tests::bench::scale_kube`),
//! `edge-watch` (the watch traffic an edge
//! receives per Node change outside its community in a 5 k-node cluster,
//! before and after narrowing its Node watches: `fabedge_tests::bench::edge_watch`).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use fabedge_agent::datapath::Program;
use fabedge_common::{
    TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, config_flags, route_kind,
    services::{Backend, BackendKey, ServiceEntry, ServiceKey},
    tunnel_mode,
};
use fabedge_tests::{
    bench::{
        Options, connector, edge_rx, edge_watch, ha,
        report::{Report, key_part},
        scale, scale_kube,
    },
    datapath::{TestDatapath, fixtures::*},
    packet::{Frame, vxlan_encap},
};

fn main() -> Result<()> {
    let options = Options::from_args(std::env::args().skip(1))?;
    let mut report = Report::new();
    if options.runs("verdicts") {
        verdicts(&mut report)?;
    }
    if options.runs("edge-tunnel") {
        fast_path_vs_kernel(&mut report)?;
    }
    if options.runs("connector") {
        connector::run(&mut report)?;
    }
    if options.runs("edge-rx") {
        edge_rx::run(&mut report)?;
    }
    if options.runs("ha") {
        ha::run(&mut report)?;
    }
    if options.runs("scale") {
        scale::run(&mut report)?;
    }
    if options.runs("scale-kube") {
        scale_kube::run(&mut report)?;
    }
    if options.runs("edge-watch") {
        edge_watch::run(&mut report)?;
    }
    if let Some(path) = &options.json {
        report.write_json(path)?;
        println!("\nfigures written to {}", path.display());
    }
    Ok(())
}

const SAMPLES: usize = 20_001;

struct Case {
    name: &'static str,
    datapath: usize,
    program: Program,
    frame: Vec<u8>,
}

fn median(dp: &TestDatapath, program: Program, frame: &[u8]) -> Result<Duration> {
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        samples.push(dp.time_per_packet(program, frame, 1)?);
    }
    samples.sort();
    Ok(samples[SAMPLES / 2])
}

/// An edge datapath whose cloud routes go through a connector group (HA).
fn edge_through_connector_group() -> Result<TestDatapath> {
    let mut dp = edge("bench-edge-group", tunnel_mode::VXLAN)?;
    let mut group = fabedge_common::GroupEntry {
        active: CONNECTOR_PEER,
        ..Default::default()
    };
    group.members[0] = CONNECTOR_PEER;
    dp.maps.set_groups(&std::collections::BTreeMap::from([(
        fabedge_common::CONNECTOR_GROUP,
        group,
    )]))?;
    dp.maps.set_route(
        net("10.244.0.0/16"),
        fabedge_common::RouteEntry {
            kind: route_kind::TUNNEL,
            flags: fabedge_common::route_flags::VIA_GROUP,
            peer_id: fabedge_common::CONNECTOR_GROUP,
        },
    )?;
    Ok(dp)
}

/// An edge datapath with ClusterIP 10.96.0.20:53/UDP → a pod on the community peer.
fn edge_with_service() -> Result<TestDatapath> {
    let mut dp = edge("bench-edge-svc", tunnel_mode::VXLAN)?;
    let id = 1;
    let backend = Backend {
        addr: PEER_POD.octets(),
        port: 5353,
        flags: 0,
        _pad: 0,
    };
    dp.maps.backends.insert(
        BackendKey {
            service_id: id,
            slot: 0,
        },
        backend,
        0,
    )?;
    let entry = ServiceEntry {
        id,
        count: 1,
        flags: 0,
        _pad: 0,
        affinity_timeout: 0,
    };
    dp.maps.services.insert(
        ServiceKey {
            addr: CLUSTER_IP.octets(),
            port: 53,
            proto: 17,
            _pad: 0,
        },
        entry,
        0,
    )?;
    Ok(dp)
}

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// A pod of the connector's own pod CIDR.
const CONNECTOR_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);

/// The connector with its own pod CIDR routed locally.
fn connector_with_pods() -> Result<TestDatapath> {
    let mut dp = connector("bench-connector")?;
    dp.maps
        .set_route(net("10.244.0.0/24"), route(route_kind::LOCAL_POD, 0))?;
    Ok(dp)
}

/// The XDP verdicts against the empty XDP program, printed and keyed for `--json`.
fn xdp_verdicts(report: &mut Report) -> Result<()> {
    let costs = fabedge_tests::xdp::verdict_costs(SAMPLES)?;
    println!();
    println!(
        "fe_xdp_uplink per packet (BPF_PROG_TEST_RUN, median of {SAMPLES} single runs on fresh frames, empty program sampled alongside)"
    );
    println!("{:<48} {:>10} {:>8}", "case", "ns/pkt", "× empty");
    for cost in costs {
        println!(
            "{:<48} {:>10.0} {:>8.2}",
            cost.what, cost.ns, cost.ratio_vs_empty
        );
        report.record(
            format!("xdp.verdict_ns_ratio_vs_empty.{}", cost.key),
            cost.ratio_vs_empty,
        );
        report.record(format!("xdp.verdict_ns.{}", cost.key), cost.ns);
    }
    Ok(())
}

fn verdicts(report: &mut Report) -> Result<()> {
    // A fresh datapath is not configured: every program returns at its first check.
    let baseline = TestDatapath::new("bench-baseline")?;
    let datapaths = [
        edge("bench-edge", tunnel_mode::VXLAN)?,
        connector_with_pods()?,
        edge_with_service()?,
        edge_through_connector_group()?,
    ];

    let udp = |dst: Ipv4Addr| {
        Frame::eth([2; 6], [4; 6])
            .ipv4(LOCAL_POD, dst)
            .udp(40000, 53)
            .payload(&[0u8; 64])
            .build()
    };
    let inner = Frame::eth(CLOUD2_VTEP_MAC, FLANNEL_MAC)
        .ipv4(CLOUD_POD, LOCAL_POD)
        .udp(5353, 53)
        .payload(&[0u8; 64])
        .build();
    let flannel = vxlan_encap(
        Frame::eth([2; 6], [4; 6]),
        Ipv4Addr::from(CLOUD2_LAN),
        Ipv4Addr::from(CONNECTOR_LAN),
        40000,
        8472,
        1,
        &inner,
    );
    let reply = Frame::eth([4; 6], [2; 6])
        .ipv4(PEER_POD, LOCAL_POD)
        .udp(5353, 40000)
        .payload(&[0u8; 64])
        .build();
    let from_peer = Frame::eth([4; 6], [2; 6])
        .ipv4(PEER_POD, LOCAL_POD)
        .udp(7, 40000)
        .payload(&[0u8; 64])
        .build();
    // fe_from_pod drives the shared encapsulation, from a connector pod
    // (it drops any other source).
    let from_tunnel = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(CONNECTOR_POD, CLOUD_POD)
        .udp(1, 2)
        .payload(&[0u8; 64])
        .build();
    let cases = [
        Case {
            name: "edge: pod → local pod (pass)",
            datapath: 0,
            program: Program::FromPod,
            frame: udp(LOCAL_POD_2),
        },
        Case {
            name: "edge: pod → peer pod (TTL, redirect)",
            datapath: 0,
            program: Program::FromPod,
            frame: udp(PEER_POD),
        },
        Case {
            name: "edge: pod → unknown (drop)",
            datapath: 0,
            program: Program::FromPod,
            frame: udp(UNKNOWN),
        },
        // Unmarked: the route lookup the node's own traffic takes.
        Case {
            name: "edge: tunnel egress (lookup, set key)",
            datapath: 0,
            program: Program::TunnelEgress,
            frame: udp(PEER_POD),
        },
        Case {
            name: "edge: uplink egress, not for a tunnel (pass)",
            datapath: 0,
            program: Program::UplinkEgress,
            frame: udp(UNKNOWN),
        },
        Case {
            name: "edge: uplink egress, tunnel bypass (drop)",
            datapath: 0,
            program: Program::UplinkEgress,
            frame: udp(PEER_POD),
        },
        Case {
            name: "connector: Flannel decap → tunnel",
            datapath: 1,
            program: Program::UplinkIngress,
            frame: flannel,
        },
        Case {
            name: "connector: tunnel → Flannel encap",
            datapath: 1,
            program: Program::FromPod,
            frame: from_tunnel,
        },
        // The first sample opens the flow; the median is an established flow's packet.
        Case {
            name: "edge: pod → ClusterIP (CT hit, DNAT, redirect)",
            datapath: 2,
            program: Program::FromPod,
            frame: udp(CLUSTER_IP),
        },
        Case {
            name: "edge: backend reply → pod (reverse NAT)",
            datapath: 2,
            program: Program::ToPod,
            frame: reply,
        },
        Case {
            name: "edge: to-pod, not a Service reply (CT miss)",
            datapath: 2,
            program: Program::ToPod,
            frame: from_peer,
        },
        // What a connector group costs over a route to one connector.
        Case {
            name: "edge: pod → cloud pod, one connector (redirect)",
            datapath: 0,
            program: Program::FromPod,
            frame: udp(CLOUD_POD),
        },
        Case {
            name: "edge: pod → cloud pod, connector group (redirect)",
            datapath: 3,
            program: Program::FromPod,
            frame: udp(CLOUD_POD),
        },
    ];

    let base = median(&baseline, Program::FromPod, &udp(PEER_POD))?;
    println!(
        "fabedge datapath cost per packet (BPF_PROG_TEST_RUN, median of {SAMPLES} single runs on fresh frames)"
    );
    println!("{:<40} {:>10} {:>8}", "case", "ns/pkt", "× base");
    println!(
        "{:<40} {:>10} {:>8}",
        "baseline: program entry, not configured",
        base.as_nanos(),
        "1.00"
    );
    report.record("datapath.baseline_ns", base.as_nanos() as f64);
    for case in &cases {
        let dp = &datapaths[case.datapath];
        let t = median(dp, case.program, &case.frame)?;
        println!(
            "{:<40} {:>10} {:>8.2}",
            case.name,
            t.as_nanos(),
            t.as_secs_f64() / base.as_secs_f64().max(1e-12)
        );
        let key = key_part(case.name);
        report.record(format!("datapath.verdict_ns.{key}"), t.as_nanos() as f64);
        report.record(
            format!("datapath.verdict_ratio_vs_baseline.{key}"),
            t.as_secs_f64() / base.as_secs_f64().max(1e-12),
        );
    }
    xdp_verdicts(report)?;
    encap_costs(report)?;
    Ok(())
}

/// Sending a pod packet into the plaintext tunnel, both ways, against the
/// empty TC program: `fe-tunnel` with a tunnel key set per packet, or the
/// forwarding program's own encapsulation (`config_flags::TC_ENCAP`).
fn encap_costs(report: &mut Report) -> Result<()> {
    let costs = fabedge_tests::encap::encap_costs(SAMPLES)?;
    println!();
    println!(
        "edge pod → tunnel, TC per packet (BPF_PROG_TEST_RUN, median of {SAMPLES} single runs on fresh frames, fe_tc_empty sampled alongside)"
    );
    println!("{:<60} {:>10} {:>8}", "way", "ns/pkt", "× empty");
    let rows = [
        (
            "tunnel_key",
            "fe_from_pod redirect + fe_tunnel_egress set_tunnel_key",
            costs.tunnel_key_ns,
        ),
        (
            "tunnel_key_egress_only",
            "fe_tunnel_egress set_tunnel_key alone",
            costs.tunnel_key_egress_ns,
        ),
        (
            "adjust_room",
            "fe_from_pod adjust_room encap + redirect to the uplink",
            costs.adjust_room_ns,
        ),
    ];
    println!(
        "{:<60} {:>10.0} {:>8.2}",
        "fe_tc_empty", costs.empty_ns, 1.0
    );
    report.record("tc.encap_ns.empty", costs.empty_ns);
    for (key, what, ns) in rows {
        let ratio = ns / costs.empty_ns;
        println!("{what:<60} {ns:>10.0} {ratio:>8.2}");
        report.record(format!("tc.encap_ns.{key}"), ns);
        report.record(format!("tc.encap_ns_ratio_vs_empty.{key}"), ratio);
    }
    println!(
        "(BPF_PROG_TEST_RUN does not run what follows a redirect: the tunnel_key way also pays fe-tunnel's VXLAN transmit and an outer route lookup per packet, the adjust_room way neither)"
    );
    Ok(())
}

/// Throughput and latency between two edge pods in the mini cluster (the
/// direct community tunnel), and the small-packet rate from an edge pod to
/// a pod on the connector, for each way of sending into the tunnel: the
/// forwarding program encapsulates (`adjust_room`, the agent's default,
/// also recorded as `fast_path`), redirects into `fe-tunnel` whose egress
/// program sets a tunnel key (`tunnel_key`, `--tunnel-key-egress`), or
/// hands the packet to the kernel's forwarding (`kernel`, `--no-fast-path`).
/// Rounds alternate so every variant sees the same machine load.
fn fast_path_vs_kernel(report: &mut Report) -> Result<()> {
    use fabedge_tests::{
        cluster::{Cluster, ClusterOptions},
        netns::{Netns, ping},
    };

    const ROUNDS: usize = 3;
    const VARIANTS: [(&str, &str, u8); 3] = [
        (
            "adjust_room",
            "fast path, encap in program",
            config_flags::TC_ENCAP,
        ),
        ("tunnel_key", "fast path, fe-tunnel key", 0),
        ("kernel", "kernel forwarding", config_flags::NO_FAST_PATH),
    ];
    let cluster = Cluster::start(ClusterOptions::default())?;
    let client = cluster.pod("edge-1")?;
    let server = cluster.pod("edge-2")?;
    let connector_pod = cluster.pod("cloud-1")?;
    let server_ip = server.ip().to_string();
    let connector_ip = connector_pod.ip().to_string();
    let _iperf_server = server.netns().spawn("iperf3", &["-s", "-B", &server_ip])?;
    let _iperf_connector = connector_pod
        .netns()
        .spawn("iperf3", &["-s", "-B", &connector_ip])?;
    std::thread::sleep(Duration::from_millis(300));

    // The agents run with the default; each round flips the three nodes'
    // datapath flags to the variant, and back at the end.
    let set_flags = |flags: u8| -> Result<()> {
        for node in ["edge-1", "edge-2", "cloud-1"] {
            let mut maps = cluster.maps(node)?;
            let mut config = maps.config()?;
            config.flags = flags;
            maps.set_config(config)?;
        }
        Ok(())
    };
    let udp64_pps = |netns: &Netns, target: &str| -> Result<f64> {
        let out = netns.run_ok(
            "iperf3",
            &["-c", target, "-u", "-l", "64", "-b", "0", "-t", "2", "-J"],
        )?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        let sum = &json["end"]["sum"];
        let received =
            sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
        Ok(received / sum["seconds"].as_f64().unwrap_or(1.0).max(1e-9))
    };
    let mut gbps: [Vec<f64>; 3] = Default::default();
    let mut rtts: [Vec<Duration>; 3] = Default::default();
    let mut edge_pps: [Vec<f64>; 3] = Default::default();
    let mut connector_pps: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (slot, (_, _, flags)) in VARIANTS.iter().enumerate() {
            set_flags(*flags)?;
            let out = client
                .netns()
                .run_ok("iperf3", &["-c", &server_ip, "-t", "2", "-J"])?;
            let json: serde_json::Value = serde_json::from_str(&out)?;
            let bps = json["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0);
            gbps[slot].push(bps / 1e9);
            // Small packets: per-packet cost, not bytes, decides.
            edge_pps[slot].push(udp64_pps(client.netns(), &server_ip)?);
            connector_pps[slot].push(udp64_pps(client.netns(), &connector_ip)?);
            let pings = ping(client.netns(), server.ip(), 50, Duration::from_millis(10))?;
            let mut sorted = pings.rtts.clone();
            sorted.sort();
            if let Some(median) = sorted.get(sorted.len() / 2) {
                rtts[slot].push(*median);
            }
        }
    }
    set_flags(config_flags::TC_ENCAP)?;
    let median_f = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let median_d = |v: &mut Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    println!();
    println!(
        "edge-1 pod → edge-2 pod over the tunnel (iperf3 TCP 2 s, UDP 64 B unlimited 2 s received, ping ×50), and edge-1 pod → connector pod (UDP 64 B); median of {ROUNDS} alternating rounds"
    );
    println!(
        "{:<30} {:>10} {:>18} {:>20} {:>12}",
        "path", "TCP Gbit/s", "UDP 64 B kpps e→e", "UDP 64 B kpps e→conn", "ping median"
    );
    let mut figures = Vec::new();
    for (slot, (key, label, _)) in VARIANTS.iter().enumerate() {
        let g = median_f(&mut gbps[slot]);
        let e = median_f(&mut edge_pps[slot]) / 1e3;
        let c = median_f(&mut connector_pps[slot]) / 1e3;
        let r = median_d(&mut rtts[slot]);
        println!(
            "{label:<30} {g:>10.2} {e:>18.1} {c:>20.1} {:>9} µs",
            r.as_micros()
        );
        report.record(format!("edge_tunnel.tcp_gbps.{key}"), g);
        report.record(format!("edge_tunnel.udp64_kpps.{key}"), e);
        report.record(format!("edge_tunnel.to_connector_udp64_kpps.{key}"), c);
        report.record(format!("edge_tunnel.ping_us.{key}"), r.as_secs_f64() * 1e6);
        figures.push((g, e, c, r));
    }
    // `fast_path`: the agent's default way, under the key earlier runs used.
    let (g, e, _, r) = figures[0];
    report.record("edge_tunnel.tcp_gbps.fast_path", g);
    report.record("edge_tunnel.udp64_kpps.fast_path", e);
    report.record("edge_tunnel.ping_us.fast_path", r.as_secs_f64() * 1e6);
    let (room, key, kernel) = (figures[0], figures[1], figures[2]);
    for (what, a, b) in [
        ("adjust_room_vs_tunnel_key", room, key),
        ("adjust_room_vs_kernel", room, kernel),
    ] {
        let ratio = |x: f64, y: f64| x / y.max(1e-9);
        println!(
            "{:<30} {:>10.2} {:>18.2} {:>20.2}",
            what.replace('_', " "),
            ratio(a.0, b.0),
            ratio(a.1, b.1),
            ratio(a.2, b.2)
        );
        report.record(format!("edge_tunnel.tcp_ratio.{what}"), ratio(a.0, b.0));
        report.record(
            format!("edge_tunnel.udp64_pps_ratio.{what}"),
            ratio(a.1, b.1),
        );
        report.record(
            format!("edge_tunnel.to_connector_udp64_pps_ratio.{what}"),
            ratio(a.2, b.2),
        );
    }
    Ok(())
}
