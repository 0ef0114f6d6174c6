//! The plaintext tunnel's encapsulation in the forwarding program
//! (`config_flags::TC_ENCAP`) under `BPF_PROG_TEST_RUN`: edge-1's namespace
//! as `bpf_fib_lookup` sees it, and the per-packet cost of both ways of
//! sending a packet into the tunnel for `cargo xtask bench`.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Result, bail};
use fabedge_agent::datapath::Program;
use fabedge_common::{Counter, DEFAULT_TUNNEL_PORT, config_flags, mark, tunnel_mode};

use crate::{
    datapath::{
        SkbIn, TC_ACT_OK, TC_ACT_REDIRECT, TestDatapath, counted, fixtures, time_classifier_once,
    },
    netns::Netns,
    packet::{Frame, Mac, format_mac},
};

/// edge-1's NIC toward the WAN, and edge-2's (its community peer's).
pub const EDGE1_WAN_MAC: Mac = [0x52, 0x54, 0, 0, 2, 0x11];
pub const EDGE2_NIC_MAC: Mac = [0x52, 0x54, 0, 0, 2, 0x12];
pub const EDGE1_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// edge-2's tunnel endpoint in [`fixtures::edge`].
pub const EDGE2_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);

/// edge-1's namespace as the FIB sees it: `wan0` on 198.18.0.0/24 with a
/// permanent neighbour for edge-2 and none yet for the connector
/// (198.18.0.1), forwarding on. Nothing routes 203.0.113.0/24.
pub struct EdgeLab {
    pub netns: Netns,
}

impl EdgeLab {
    pub fn new(name: &str) -> Result<Self> {
        let netns = Netns::new(name)?;
        netns.ip(&[
            "link", "add", "wan0", "type", "veth", "peer", "name", "wan1",
        ])?;
        netns.set_mac("wan0", EDGE1_WAN_MAC)?;
        netns.add_addr("wan0", "198.18.0.11/24")?;
        netns.set_up("wan0")?;
        netns.set_up("wan1")?;
        netns.ip(&[
            "neigh",
            "replace",
            &EDGE2_WAN.to_string(),
            "lladdr",
            &format_mac(&EDGE2_NIC_MAC),
            "nud",
            "permanent",
            "dev",
            "wan0",
        ])?;
        netns.set_sysctl("net.ipv4.ip_forward", "1")?;
        Ok(EdgeLab { netns })
    }
}

/// edge-1's datapath ([`fixtures::edge`], VXLAN) with `flags` and its tunnel port.
pub fn edge_with_flags(name: &str, flags: u8) -> Result<TestDatapath> {
    let mut dp = fixtures::edge(name, tunnel_mode::VXLAN)?;
    let mut config = dp.maps.config()?;
    config.flags = flags;
    config.tunnel_port = DEFAULT_TUNNEL_PORT;
    dp.maps.set_config(config)?;
    Ok(dp)
}

/// edge-1's datapath with the encapsulation on, as the agent writes it.
pub fn edge_with_encap(name: &str) -> Result<TestDatapath> {
    edge_with_flags(name, config_flags::TC_ENCAP)
}

/// The per-packet cost of sending one pod packet into the tunnel, both ways,
/// against `fe_tc_empty` on the same frame.
#[derive(Debug, Clone)]
pub struct EncapCosts {
    pub empty_ns: f64,
    /// `fe_from_pod` redirecting into `fe-tunnel` plus `fe_tunnel_egress`
    /// setting the key (the sum of both runs, per sample).
    pub tunnel_key_ns: f64,
    /// `fe_tunnel_egress` alone (marked frame: no route lookup).
    pub tunnel_key_egress_ns: f64,
    /// `fe_from_pod` encapsulating and redirecting to the uplink.
    pub adjust_room_ns: f64,
}

/// Medians of `samples` single runs on fresh frames (a rewriting program
/// never sees its own output), the empty program sampled alongside so both
/// see the same load. Runs in an [`EdgeLab`]; every case is checked first
/// to take the path it names.
pub fn encap_costs(samples: usize) -> Result<EncapCosts> {
    let lab = EdgeLab::new("fe-encap-bench")?;
    lab.netns.enter(|| {
        let mut key = edge_with_flags("encap-bench-key", 0)?;
        let encap = edge_with_encap("encap-bench-room")?;
        let frame = Frame::eth(fixtures::POD_MAC, fixtures::BRIDGE_MAC)
            .ipv4(fixtures::LOCAL_POD, fixtures::PEER_POD)
            .udp(40000, 53)
            .payload(&[0u8; 64])
            .build();

        let (out, delta) = counted(&encap, || encap.run(Program::FromPod, &frame))?;
        if out.action != TC_ACT_REDIRECT || !delta.contains_key(Counter::TunnelEncap.name()) {
            bail!("bench: fe_from_pod with TC_ENCAP did not encapsulate ({delta:?})");
        }
        let (to_tunnel, delta) = counted(&key, || key.run(Program::FromPod, &frame))?;
        if to_tunnel.action != TC_ACT_REDIRECT || delta.len() != 1 {
            bail!("bench: fe_from_pod without TC_ENCAP did not redirect ({delta:?})");
        }
        let marked = SkbIn {
            mark: mark::to_tunnel(0, fixtures::EDGE2_PEER),
            ..SkbIn::default()
        };
        let (egress, delta) = counted(&key, || {
            key.run_with(Program::TunnelEgress, &to_tunnel.data, marked)
        })?;
        if egress.action != TC_ACT_OK || !delta.contains_key(Counter::ToTunnel.name()) {
            bail!("bench: fe_tunnel_egress did not set the key ({delta:?})");
        }

        let mut empty = Vec::with_capacity(samples);
        let mut key_total = Vec::with_capacity(samples);
        let mut key_egress = Vec::with_capacity(samples);
        let mut room = Vec::with_capacity(samples);
        let plain = SkbIn::default();
        for _ in 0..samples {
            let redirect = key.time_once_with(Program::FromPod, &frame, plain)?;
            let set_key = key.time_once_with(Program::TunnelEgress, &to_tunnel.data, marked)?;
            key_total.push(redirect + set_key);
            key_egress.push(set_key);
            room.push(encap.time_once_with(Program::FromPod, &frame, plain)?);
            let prog = key.datapath.tc_empty()?;
            empty.push(time_classifier_once(prog, "fe_tc_empty", &frame, plain)?);
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2].as_nanos() as f64
        };
        Ok(EncapCosts {
            empty_ns: median(&mut empty).max(1.0),
            tunnel_key_ns: median(&mut key_total),
            tunnel_key_egress_ns: median(&mut key_egress),
            adjust_room_ns: median(&mut room),
        })
    })
}
