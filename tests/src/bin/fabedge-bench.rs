//! `cargo xtask bench`: per-packet cost of each datapath verdict, measured by
//! the kernel with BPF_PROG_TEST_RUN (repeat N) and reported as a ratio to a
//! baseline measured in the same process: the same program returning at its
//! first check (datapath not configured). Ratios, not absolute numbers, are
//! what compare across machines.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use fabedge_agent::datapath::Program;
use fabedge_common::{TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, tunnel_mode};
use fabedge_tests::{
    datapath::{TestDatapath, fixtures::*},
    packet::{Frame, vxlan_encap},
};

const REPEAT: u32 = 200_000;
const ROUNDS: usize = 7;

struct Case {
    name: &'static str,
    datapath: usize,
    program: Program,
    frame: Vec<u8>,
}

fn median(dp: &TestDatapath, program: Program, frame: &[u8]) -> Result<Duration> {
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        samples.push(dp.time_per_packet(program, frame, REPEAT)?);
    }
    samples.sort();
    Ok(samples[ROUNDS / 2])
}

fn main() -> Result<()> {
    // A fresh datapath is not configured: every program returns at its first check.
    let baseline = TestDatapath::new("bench-baseline")?;
    let datapaths = [edge("bench-edge", tunnel_mode::VXLAN)?, connector("bench-connector")?];

    let udp = |dst: Ipv4Addr| Frame::eth([2; 6], [4; 6]).ipv4(LOCAL_POD, dst).udp(40000, 53).payload(&[0u8; 64]).build();
    let inner = Frame::eth(CLOUD2_VTEP_MAC, FLANNEL_MAC).ipv4(CLOUD_POD, LOCAL_POD).udp(5353, 53).payload(&[0u8; 64]).build();
    let flannel = vxlan_encap(Frame::eth([2; 6], [4; 6]), Ipv4Addr::from(CLOUD2_LAN), Ipv4Addr::from(CONNECTOR_LAN), 40000, 8472, 1, &inner);
    let from_tunnel = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC).ipv4(LOCAL_POD, CLOUD_POD).udp(1, 2).payload(&[0u8; 64]).build();
    let cases = [
        Case { name: "edge: pod → local pod (pass)", datapath: 0, program: Program::FromPod, frame: udp(LOCAL_POD_2) },
        Case { name: "edge: pod → peer pod (TTL, redirect)", datapath: 0, program: Program::FromPod, frame: udp(PEER_POD) },
        Case { name: "edge: pod → unknown (drop)", datapath: 0, program: Program::FromPod, frame: udp(UNKNOWN) },
        // Unmarked: the route lookup the node's own traffic takes.
        Case { name: "edge: tunnel egress (lookup, set key)", datapath: 0, program: Program::TunnelEgress, frame: udp(PEER_POD) },
        Case { name: "connector: Flannel decap → tunnel", datapath: 1, program: Program::UplinkIngress, frame: flannel },
        Case { name: "connector: tunnel → Flannel encap", datapath: 1, program: Program::FromPod, frame: from_tunnel },
    ];

    let base = median(&baseline, Program::FromPod, &udp(PEER_POD))?;
    println!("fabedge datapath cost per packet (BPF_PROG_TEST_RUN, {REPEAT} repeats, median of {ROUNDS})");
    println!("{:<40} {:>10} {:>8}", "case", "ns/pkt", "× base");
    println!("{:<40} {:>10} {:>8}", "baseline: program entry, not configured", base.as_nanos(), "1.00");
    for case in &cases {
        let dp = &datapaths[case.datapath];
        let t = median(dp, case.program, &case.frame)?;
        println!("{:<40} {:>10} {:>8.2}", case.name, t.as_nanos(), t.as_secs_f64() / base.as_secs_f64().max(1e-12));
    }
    Ok(())
}
