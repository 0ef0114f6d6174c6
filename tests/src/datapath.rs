//! Datapath harness: the real object loaded into a private bpffs root, its
//! programs run with `BPF_PROG_TEST_RUN`, its maps read and written directly.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use fabedge_agent::{
    datapath::{self, AttachMode, Datapath, PinLayout, Program},
    maps::Maps,
};
use fabedge_common::Counter;

/// `TC_ACT_*` verdicts, as programs return them.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// The ifindex a program sees under `BPF_PROG_TEST_RUN` (the skb's device is
/// the loopback unless the context names another): the "port" of
/// `fe_pod_port` runs.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// Size of `struct __sk_buff` and the offsets of the fields tests set or read.
const SKB_CTX_SIZE: usize = 192;
const SKB_MARK_OFF: usize = 8;
const SKB_GSO_SEGS_OFF: usize = 164;
const SKB_GSO_SIZE_OFF: usize = 176;

/// A private, loaded copy of the datapath. Removed (pins and all) on drop.
pub struct TestDatapath {
    pub datapath: Datapath,
    pub maps: Maps,
    root: PathBuf,
}

/// What a program did with one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The TC verdict.
    pub action: i32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// The skb mark as the program left it.
    pub mark: u32,
}

/// Extra skb context for a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct SkbIn {
    pub mark: u32,
    /// Pretend the packet is a GSO super-packet of this many segments of `gso_size` bytes.
    pub gso_segs: u32,
    pub gso_size: u32,
}

impl TestDatapath {
    /// `name` keeps concurrently running tests apart in bpffs.
    pub fn new(name: &str) -> Result<Self> {
        let root = PathBuf::from(format!(
            "/sys/fs/bpf/fabedge-test-{}-{name}",
            std::process::id()
        ));
        if root.exists() {
            datapath::uninstall(&root)?;
        }
        let layout = PinLayout::new(&root);
        let datapath = Datapath::load(layout.clone(), AttachMode::Auto)
            .context("loading the datapath (run as root, after `cargo xtask build-ebpf`)")?;
        let maps = Maps::open(&layout)?;
        Ok(TestDatapath {
            datapath,
            maps,
            root,
        })
    }

    pub fn run(&self, program: Program, frame: &[u8]) -> Result<Outcome> {
        self.run_with(program, frame, SkbIn::default())
    }

    pub fn run_with(&self, program: Program, frame: &[u8], skb: SkbIn) -> Result<Outcome> {
        let mut ctx_in = [0u8; SKB_CTX_SIZE];
        ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&skb.mark.to_ne_bytes());
        ctx_in[SKB_GSO_SEGS_OFF..SKB_GSO_SEGS_OFF + 4].copy_from_slice(&skb.gso_segs.to_ne_bytes());
        ctx_in[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&skb.gso_size.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_SIZE];
        let mut data_out = vec![0u8; frame.len() + 256];
        let result = self
            .datapath
            .program(program)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data_out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::new()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", program.symbol()))?;
        if result.data_size_out as usize > data_out.len() {
            bail!(
                "program output of {} bytes did not fit the buffer",
                result.data_size_out
            );
        }
        data_out.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes(
            ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4]
                .try_into()
                .expect("4 bytes"),
        );
        Ok(Outcome {
            action: result.return_value as i32,
            data: data_out,
            mark,
        })
    }

    /// Average kernel time per run of `program` on `frame`, over `repeat` runs
    /// (BPF_PROG_TEST_RUN's own measurement, no syscall overhead per packet).
    pub fn time_per_packet(
        &self,
        program: Program,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration> {
        let mut data_out = vec![0u8; frame.len() + 256];
        let result = self
            .datapath
            .program(program)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data_out),
                repeat,
                ..TestRunOptions::new()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {} x{repeat}", program.symbol()))?;
        Ok(result.duration)
    }

    /// Kernel time of one run of `program` on a fresh copy of `frame` with
    /// the skb context `skb` (a mark, GSO sizes).
    pub fn time_once_with(
        &self,
        program: Program,
        frame: &[u8],
        skb: SkbIn,
    ) -> Result<std::time::Duration> {
        time_classifier_once(self.datapath.program(program), program.symbol(), frame, skb)
    }

    /// A counter's value summed over CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.maps
            .counter(counter)
            .unwrap_or_else(|e| panic!("reading counter {}: {e:#}", counter.name()))
    }

    /// Every counter, to diff before/after a run.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL.iter().map(|&c| (c, self.counter(c))).collect()
    }
}

/// Kernel time of one run of the classifier `prog` (`symbol`, for errors)
/// on a fresh copy of `frame` with the skb context `skb`.
pub fn time_classifier_once(
    prog: &aya::programs::SchedClassifier,
    symbol: &str,
    frame: &[u8],
    skb: SkbIn,
) -> Result<std::time::Duration> {
    let mut ctx_in = [0u8; SKB_CTX_SIZE];
    ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&skb.mark.to_ne_bytes());
    ctx_in[SKB_GSO_SEGS_OFF..SKB_GSO_SEGS_OFF + 4].copy_from_slice(&skb.gso_segs.to_ne_bytes());
    ctx_in[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&skb.gso_size.to_ne_bytes());
    let mut data_out = vec![0u8; frame.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut data_out),
            ctx_in: Some(&ctx_in),
            ..TestRunOptions::new()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {symbol}"))?;
    Ok(result.duration)
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        if let Err(e) = datapath::uninstall(&self.root) {
            eprintln!("cleaning up {}: {e:#}", self.root.display());
        }
    }
}

/// The datapath of an edge node and of the connector, programmed the way
/// the agent would, for tests and benchmarks.
pub mod fixtures {
    use std::net::Ipv4Addr;

    use anyhow::Result;
    use fabedge_common::{
        DatapathConfig, PeerEntry, RouteEntry, peer_kind, role, route_flags, route_kind,
        tunnel_mode,
    };
    use ipnet::Ipv4Net;

    use super::TestDatapath;
    use crate::packet::Mac;

    pub const POD_MAC: Mac = [0x0a, 0, 0, 0, 0, 0x02];
    pub const BRIDGE_MAC: Mac = [0x0a, 0, 0, 0, 0, 0x01];
    pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 234, 1, 2);
    pub const LOCAL_POD_2: Ipv4Addr = Ipv4Addr::new(10, 234, 1, 3);
    pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 11);
    pub const PEER_POD: Ipv4Addr = Ipv4Addr::new(10, 234, 2, 5);
    pub const CLOUD_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
    pub const UNKNOWN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
    pub const ORPHAN: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

    pub const CONNECTOR_PEER: u16 = 1;
    pub const EDGE2_PEER: u16 = 2;
    pub const ORPHAN_PEER: u16 = 3;
    pub const EDGE1_PEER: u16 = 4;
    pub const VTEP_PEER: u16 = 5;

    pub const CONNECTOR_LAN: [u8; 4] = [10, 1, 0, 1];
    pub const CLOUD2_LAN: [u8; 4] = [10, 1, 0, 2];
    pub const FLANNEL_MAC: Mac = [0x66, 0x66, 0, 0, 0, 0x01];
    pub const CLOUD2_VTEP_MAC: Mac = [0x66, 0x66, 0, 0, 0, 0x02];
    pub const UPLINK_MAC: Mac = [0x52, 0x54, 0, 0, 0, 0x01];
    pub const CLOUD2_NIC_MAC: Mac = [0x52, 0x54, 0, 0, 0, 0x02];

    pub fn net(text: &str) -> Ipv4Net {
        text.parse().expect("valid CIDR")
    }

    pub fn route(kind: u8, peer_id: u16) -> RouteEntry {
        RouteEntry {
            kind,
            flags: 0,
            peer_id,
        }
    }

    pub fn tunnel_peer(ip: [u8; 4]) -> PeerEntry {
        PeerEntry {
            kind: peer_kind::TUNNEL,
            port: fabedge_common::DEFAULT_TUNNEL_PORT,
            underlay_ip: ip,
            ..PeerEntry::default()
        }
    }

    /// An edge node (edge-1): its pods, a community peer (edge-2) and the connector.
    pub fn edge(name: &str, mode: u8) -> Result<TestDatapath> {
        let mut dp = TestDatapath::new(name)?;
        let maps = &mut dp.maps;
        maps.set_peer(CONNECTOR_PEER, tunnel_peer([198, 18, 0, 1]))?;
        maps.set_peer(EDGE2_PEER, tunnel_peer([198, 18, 0, 12]))?;
        maps.set_route(net("10.234.1.0/24"), route(route_kind::LOCAL_POD, 0))?;
        maps.set_route(
            net("10.2.0.11/32"),
            RouteEntry {
                kind: route_kind::LOCAL_HOST,
                flags: route_flags::NODE_ADDR,
                peer_id: 0,
            },
        )?;
        maps.set_route(net("10.234.2.0/24"), route(route_kind::TUNNEL, EDGE2_PEER))?;
        maps.set_route(
            net("10.244.0.0/16"),
            route(route_kind::TUNNEL, CONNECTOR_PEER),
        )?;
        maps.set_route(net("10.99.0.0/16"), route(route_kind::TUNNEL, ORPHAN_PEER))?;
        maps.set_config(DatapathConfig {
            ready: 1,
            role: role::EDGE,
            tunnel_mode: mode,
            node_ip: NODE_IP.octets(),
            tunnel_ifindex: 1,
            tunnel_vni: fabedge_common::DEFAULT_TUNNEL_VNI,
            tunnel_mtu: 1450,
            ..DatapathConfig::default()
        })?;
        sync_peer_addrs(&mut dp)?;
        Ok(dp)
    }

    /// The connector (cloud-1): edge-1 behind a tunnel, cloud-2's pods behind its Flannel VTEP.
    pub fn connector(name: &str) -> Result<TestDatapath> {
        let mut dp = TestDatapath::new(name)?;
        let maps = &mut dp.maps;
        maps.set_peer(EDGE1_PEER, tunnel_peer([198, 18, 0, 11]))?;
        maps.set_peer(
            VTEP_PEER,
            PeerEntry {
                kind: peer_kind::FLANNEL_VTEP,
                underlay_ip: CLOUD2_LAN,
                vtep_mac: CLOUD2_VTEP_MAC,
                ..PeerEntry::default()
            },
        )?;
        maps.set_route(net("10.234.1.0/24"), route(route_kind::TUNNEL, EDGE1_PEER))?;
        maps.set_route(
            net("10.2.0.11/32"),
            RouteEntry {
                kind: route_kind::TUNNEL,
                flags: route_flags::NODE_ADDR,
                peer_id: EDGE1_PEER,
            },
        )?;
        maps.set_route(
            net("10.244.1.0/24"),
            route(route_kind::CLOUD_VTEP, VTEP_PEER),
        )?;
        maps.set_route(net("10.1.0.2/32"), route(route_kind::KERNEL, 0))?;
        maps.set_config(DatapathConfig {
            ready: 1,
            role: role::CONNECTOR,
            tunnel_mode: tunnel_mode::VXLAN,
            node_ip: CONNECTOR_LAN,
            underlay_ip: CONNECTOR_LAN,
            tunnel_ifindex: 1,
            uplink_ifindex: 1,
            tunnel_vni: fabedge_common::DEFAULT_TUNNEL_VNI,
            tunnel_mtu: 1450,
            flannel_vni: 1,
            flannel_port: 8472,
            flannel_mac: FLANNEL_MAC,
            flannel_mtu: 1450,
            ..DatapathConfig::default()
        })?;
        sync_peer_addrs(&mut dp)?;
        Ok(dp)
    }

    /// Flannel VXLAN from `outer_src` (cloud-2's NIC) to the connector's
    /// VTEP, carrying the Ethernet frame `inner`.
    pub fn flannel_to_connector(outer_src: [u8; 4], inner: &[u8]) -> Vec<u8> {
        crate::packet::vxlan_encap(
            crate::packet::Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC),
            Ipv4Addr::from(outer_src),
            Ipv4Addr::from(CONNECTOR_LAN),
            41234,
            fabedge_common::DEFAULT_FLANNEL_PORT,
            fabedge_common::DEFAULT_FLANNEL_VNI,
            inner,
        )
    }

    /// Index every in-use peer slot by its underlay address, as apply does.
    pub fn sync_peer_addrs(dp: &mut TestDatapath) -> Result<()> {
        sync_peer_addrs_and_esp_senders(dp, &std::collections::BTreeMap::new())
    }

    /// [`sync_peer_addrs`], with the ESP mode's other sender addresses
    /// (NAT-observed, port forwards) as apply indexes `Plan::esp_senders`.
    pub fn sync_peer_addrs_and_esp_senders(
        dp: &mut TestDatapath,
        esp_senders: &std::collections::BTreeMap<Ipv4Addr, u16>,
    ) -> Result<()> {
        let mut peers = std::collections::BTreeMap::new();
        for id in 1..64u16 {
            let peer = dp.maps.peer(id)?;
            if peer.kind != 0 {
                peers.insert(id, peer);
            }
        }
        dp.maps.sync_peer_addrs(&peers, esp_senders)?;
        Ok(())
    }
}

/// Counters that changed during `run`, by name (the datapath and XDP tests'
/// proof of which verdict a frame met).
pub fn counted<T>(
    dp: &TestDatapath,
    run: impl FnOnce() -> Result<T>,
) -> Result<(T, BTreeMap<&'static str, u64>)> {
    let before = dp.counters();
    let outcome = run()?;
    let after = dp.counters();
    let delta = before
        .iter()
        .zip(&after)
        .filter(|((_, b), (_, a))| a != b)
        .map(|((c, b), (_, a))| (c.name(), a - b))
        .collect();
    Ok((outcome, delta))
}

/// The counter delta of a frame that moved `counter` once and nothing else.
pub fn only(counter: Counter) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([(counter.name(), 1)])
}

/// `frame` through `program`: dropped, counted once under `counter`, nothing else moved.
pub fn assert_dropped(
    dp: &TestDatapath,
    program: Program,
    frame: &[u8],
    counter: Counter,
    what: &str,
) {
    let (out, delta) = counted(dp, || dp.run(program, frame)).expect("test run");
    assert_eq!((out.action, delta), (TC_ACT_SHOT, only(counter)), "{what}");
}

/// `frame` through `program`: passed byte-identical, no counter moved.
pub fn assert_untouched(dp: &TestDatapath, program: Program, frame: &[u8], what: &str) {
    let (out, delta) = counted(dp, || dp.run(program, frame)).expect("test run");
    assert_eq!(
        (out.action, &out.data, delta.len()),
        (TC_ACT_OK, &frame.to_vec(), 0),
        "{what}"
    );
}
