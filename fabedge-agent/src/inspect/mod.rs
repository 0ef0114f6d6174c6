//! `fabedge-agent inspect ...`: what the datapath holds, read from the pinned
//! maps (the agent need not run). A table for people, `--json` for machines.

pub mod table;

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::maps::MapInfo;
use fabedge_common::{Counter, peer_kind, role, route_flags, route_kind, tunnel_mode};
use serde::Serialize;

use self::table::{Row, print_table, table};
use crate::{
    datapath::{PinLayout, map_type_name},
    maps::Maps,
    model::format_mac,
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum What {
    /// Every pinned map: type, key/value size, capacity.
    Maps,
    /// The route LPM trie with each route's next hop.
    Routes,
    /// Tunnel peers and Flannel VTEPs with per-peer traffic.
    Peers,
    /// Datapath counters and drop reasons (summed over CPUs).
    Counters,
    /// The node-wide datapath configuration.
    Config,
    /// Service frontends (ClusterIP:port/proto) and their backends.
    Services,
    /// The backend table, slot by slot.
    Backends,
    /// Service conntrack: one line per direction of each translated flow.
    Ct,
    /// ESP mode: our SAs per peer (SPI, key generation, xfrm counters, the
    /// peer's observed address and port). Never keys.
    Tunnels,
    /// Objects the running agent left out of its plan, and why (invalid,
    /// duplicate, or the newer side of a conflict).
    Problems,
}

/// Where `inspect tunnels` finds peer names and `inspect problems` the
/// agent's list (the agent's `--state-dir`).
pub static STATE_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn state_dir() -> &'static std::path::Path {
    STATE_DIR
        .get()
        .map_or(std::path::Path::new("/var/lib/fabedge"), |p| p.as_path())
}

#[derive(Serialize)]
pub struct ProblemRow {
    object: String,
    problem: String,
}

impl From<crate::model::checks::Problem> for ProblemRow {
    fn from(problem: crate::model::checks::Problem) -> Self {
        ProblemRow {
            object: problem.object,
            problem: problem.message,
        }
    }
}

impl Row for ProblemRow {
    const HEADERS: &'static [&'static str] = &["OBJECT", "PROBLEM"];
    fn cells(&self) -> Vec<String> {
        vec![self.object.clone(), self.problem.clone()]
    }
}

pub fn run(layout: &PinLayout, what: What, json: bool) -> Result<()> {
    let (headers, rows, value) = match what {
        What::Maps => table(maps(layout)?),
        What::Routes => table(routes(&Maps::open(layout)?)?),
        What::Peers => table(peers(&Maps::open(layout)?)?),
        What::Counters => table(counters(&Maps::open(layout)?, false)?),
        What::Services => table(crate::services::inspect::services(&Maps::open(layout)?)?),
        What::Backends => table(crate::services::inspect::backends(&Maps::open(layout)?)?),
        What::Ct => table(crate::services::inspect::ct(&Maps::open(layout)?)?),
        What::Tunnels => table(crate::esp::inspect::tunnels(state_dir())?),
        What::Problems => table(
            crate::run::problems::load(state_dir())?
                .into_iter()
                .map(ProblemRow::from)
                .collect(),
        ),
        What::Config => {
            let value = serde_json::to_value(config(&Maps::open(layout)?)?)?;
            let rows = value
                .as_object()
                .map(|fields| {
                    fields
                        .iter()
                        .map(|(k, v)| vec![k.clone(), v.to_string().trim_matches('"').to_string()])
                        .collect()
                })
                .unwrap_or_default();
            (vec!["FIELD".into(), "VALUE".into()], rows, value)
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_table(&headers, &rows);
    }
    Ok(())
}

#[derive(Serialize)]
pub struct MapRow {
    pub name: String,
    pub id: u32,
    pub map_type: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub pin: String,
}

impl Row for MapRow {
    const HEADERS: &'static [&'static str] = &["MAP", "ID", "TYPE", "KEY", "VALUE", "MAX", "PIN"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.id.to_string(),
            self.map_type.clone(),
            self.key_size.to_string(),
            self.value_size.to_string(),
            self.max_entries.to_string(),
            self.pin.clone(),
        ]
    }
}

pub fn maps(layout: &PinLayout) -> Result<Vec<MapRow>> {
    let dir = layout.maps_dir();
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .with_context(|| format!("listing {} (is the datapath installed?)", dir.display()))?
    {
        let path = entry?.path();
        let info =
            MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
        rows.push(MapRow {
            name: path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            id: info.id(),
            map_type: map_type_name(info.map_type().map(|t| t as u32).unwrap_or(u32::MAX)),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            pin: path.display().to_string(),
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

#[derive(Serialize)]
pub struct RouteRow {
    pub prefix: String,
    pub kind: &'static str,
    /// The peer traffic goes to now (for a group route: its active member).
    pub peer_id: u16,
    /// A route through a connector group: the group's id.
    pub group: Option<u16>,
    pub next_hop: String,
    pub node_address: bool,
    /// A community peer behind another NAT (hole punching): `direct`, or
    /// `relayed` through the connector group (then `group` is set and
    /// `peer_id` is the connector relaying).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub punched: Option<&'static str>,
}

impl Row for RouteRow {
    const HEADERS: &'static [&'static str] = &["PREFIX", "KIND", "PEER", "NEXT HOP", "NODE ADDR"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.prefix.clone(),
            self.kind.into(),
            match (self.group, self.peer_id) {
                (Some(group), 0) => format!("group {group}: none alive"),
                (Some(group), peer) => format!("{peer} (group {group})"),
                (None, 0) => "-".into(),
                (None, peer) => peer.to_string(),
            } + &self
                .punched
                .map_or(String::new(), |path| format!(" punched, {path}")),
            self.next_hop.clone(),
            if self.node_address {
                "yes".into()
            } else {
                "".into()
            },
        ]
    }
}

pub fn route_kind_name(kind: u8) -> &'static str {
    match kind {
        route_kind::LOCAL_POD => "local-pod",
        route_kind::LOCAL_HOST => "local-host",
        route_kind::TUNNEL => "tunnel",
        route_kind::CLOUD_VTEP => "cloud-vtep",
        route_kind::KERNEL => "kernel",
        _ => "invalid",
    }
}

pub fn routes(maps: &Maps) -> Result<Vec<RouteRow>> {
    let mut rows = Vec::new();
    for (net, entry) in maps.route_entries()? {
        let tunnel = entry.kind == route_kind::TUNNEL;
        let punched = tunnel && entry.flags & route_flags::PUNCHED != 0;
        let relayed = punched && entry.flags & route_flags::RELAYED != 0;
        let group = if tunnel && entry.flags & route_flags::VIA_GROUP != 0 {
            Some(entry.peer_id)
        } else {
            relayed.then_some(fabedge_common::CONNECTOR_GROUP)
        };
        let peer_id = match group {
            Some(group) => maps.group(group)?.active,
            None => entry.peer_id,
        };
        let next_hop = match entry.kind {
            _ if group.is_some() && peer_id == 0 => "-".into(),
            route_kind::TUNNEL | route_kind::CLOUD_VTEP => {
                let peer = maps.peer(peer_id)?;
                if peer.kind == 0 {
                    "MISSING PEER".into()
                } else {
                    Ipv4Addr::from(peer.underlay_ip).to_string()
                }
            }
            _ => "kernel".into(),
        };
        rows.push(RouteRow {
            prefix: net.to_string(),
            kind: route_kind_name(entry.kind),
            peer_id,
            group,
            next_hop,
            node_address: entry.flags & route_flags::NODE_ADDR != 0,
            punched: punched.then_some(if relayed { "relayed" } else { "direct" }),
        });
    }
    Ok(rows)
}

#[derive(Serialize)]
pub struct PeerRow {
    pub id: u16,
    /// The node behind the id (from the agent's state dir), if known.
    pub name: String,
    pub kind: &'static str,
    pub endpoint: String,
    pub vtep_mac: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// A probed connector: `active`/`standby` (edges), `up`/`down`, the
    /// last RTT, consecutive misses and how long ago it last answered.
    pub connector: Option<ConnectorHealth>,
}

#[derive(Serialize)]
pub struct ConnectorHealth {
    /// Edge: whether its traffic goes there now.
    pub used: Option<bool>,
    pub up: bool,
    /// Up for the hold-down (may take traffic back).
    pub stable: bool,
    pub rtt_us: Option<u64>,
    pub misses: u32,
    pub last_answer_ms: Option<u64>,
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub probes_missed: u64,
}

impl ConnectorHealth {
    fn cell(&self) -> String {
        let state = match (self.up, self.stable) {
            (false, _) => "down",
            (true, true) => "up",
            (true, false) => "up (hold-down)",
        };
        let used = match self.used {
            Some(true) => "active, ",
            Some(false) => "standby, ",
            None => "",
        };
        let rtt = self
            .rtt_us
            .map_or("-".to_owned(), |us| format!("{:.2}ms", us as f64 / 1000.0));
        let last = self
            .last_answer_ms
            .map_or("never".to_owned(), |ms| format!("{ms}ms ago"));
        format!(
            "{used}{state}, rtt {rtt}, {} missed, last answer {last}",
            self.misses
        )
    }
}

impl Row for PeerRow {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "NAME",
        "KIND",
        "ENDPOINT",
        "VTEP MAC",
        "TX PKTS",
        "TX BYTES",
        "RX PKTS",
        "RX BYTES",
        "CONNECTOR",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.kind.into(),
            self.endpoint.clone(),
            self.vtep_mac.clone(),
            self.tx_packets.to_string(),
            self.tx_bytes.to_string(),
            self.rx_packets.to_string(),
            self.rx_bytes.to_string(),
            self.connector
                .as_ref()
                .map_or("-".into(), ConnectorHealth::cell),
        ]
    }
}

/// Peers of the datapath, named and, for connectors, with the health the
/// running agent's probes see (its `ha-status.json`).
pub fn peers(maps: &Maps) -> Result<Vec<PeerRow>> {
    let names: crate::plan::PeerIds = std::fs::read(state_dir().join(crate::plan::PEER_IDS_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let ha = crate::run::ha::HaStatus::read(state_dir()).unwrap_or_default();
    let mut rows = Vec::new();
    for id in 1..maps.peers.len().min(u16::MAX as u32) {
        let id = id as u16;
        let peer = maps.peer(id)?;
        if peer.kind == 0 {
            continue;
        }
        let stats = maps.peer_stats(id)?;
        let name = names.node(id).unwrap_or("").to_owned();
        let connector = ha.targets.get(&name).map(|t| ConnectorHealth {
            used: (!ha.order.is_empty()).then(|| ha.active.as_deref() == Some(name.as_str())),
            up: t.up,
            stable: t.stable,
            rtt_us: t.rtt_us,
            misses: t.misses,
            last_answer_ms: t.last_answer_ms,
            probes_sent: t.sent,
            probes_answered: t.answered,
            probes_missed: t.missed,
        });
        rows.push(PeerRow {
            id,
            name,
            connector,
            kind: if peer.kind == peer_kind::FLANNEL_VTEP {
                "flannel-vtep"
            } else {
                "tunnel"
            },
            endpoint: Ipv4Addr::from(peer.underlay_ip).to_string(),
            vtep_mac: if peer.kind == peer_kind::FLANNEL_VTEP {
                format_mac(peer.vtep_mac)
            } else {
                "-".into()
            },
            tx_packets: stats.tx_packets,
            tx_bytes: stats.tx_bytes,
            rx_packets: stats.rx_packets,
            rx_bytes: stats.rx_bytes,
        });
    }
    Ok(rows)
}

#[derive(Serialize)]
pub struct CounterRow {
    pub name: &'static str,
    pub drop: bool,
    pub packets: u64,
}

impl Row for CounterRow {
    const HEADERS: &'static [&'static str] = &["COUNTER", "DROP", "PACKETS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.into(),
            if self.drop { "drop".into() } else { "".into() },
            self.packets.to_string(),
        ]
    }
}

/// Every counter, or only the non-zero ones.
pub fn counters(maps: &Maps, nonzero_only: bool) -> Result<Vec<CounterRow>> {
    let mut rows = Vec::new();
    for &counter in Counter::ALL {
        let packets = maps.counter(counter)?;
        if nonzero_only && packets == 0 {
            continue;
        }
        rows.push(CounterRow {
            name: counter.name(),
            drop: counter.is_drop(),
            packets,
        });
    }
    Ok(rows)
}

#[derive(Serialize)]
pub struct ConfigRow {
    pub ready: bool,
    pub role: &'static str,
    pub tunnel_mode: &'static str,
    pub node_ip: String,
    pub underlay_ip: String,
    pub tunnel_ifindex: u32,
    pub uplink_ifindex: u32,
    pub tunnel_vni: u32,
    pub tunnel_mtu: u16,
    pub flannel_vni: u32,
    pub flannel_port: u16,
    pub flannel_mtu: u16,
    pub flannel_mac: String,
}

pub fn config(maps: &Maps) -> Result<ConfigRow> {
    let c = maps.config()?;
    Ok(ConfigRow {
        ready: c.ready != 0,
        role: match c.role {
            role::EDGE => "edge",
            role::CONNECTOR => "connector",
            role::CLOUD => "cloud",
            _ => "unset",
        },
        tunnel_mode: match c.tunnel_mode {
            tunnel_mode::VXLAN => "vxlan",
            tunnel_mode::ESP => "esp",
            _ => "unset",
        },
        node_ip: Ipv4Addr::from(c.node_ip).to_string(),
        underlay_ip: Ipv4Addr::from(c.underlay_ip).to_string(),
        tunnel_ifindex: c.tunnel_ifindex,
        uplink_ifindex: c.uplink_ifindex,
        tunnel_vni: c.tunnel_vni,
        tunnel_mtu: c.tunnel_mtu,
        flannel_vni: c.flannel_vni,
        flannel_port: c.flannel_port,
        flannel_mtu: c.flannel_mtu,
        flannel_mac: format_mac(c.flannel_mac),
    })
}
