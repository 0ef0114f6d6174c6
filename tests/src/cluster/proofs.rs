//! Proofs that a path went where it should: the datapath counters and peer statistics of every
//! node, and path checks.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, thread, time::Instant};

use anyhow::{Context, Result};
use fabedge_agent::{datapath::PinLayout, inspect, maps::Maps};
use fabedge_common::{Counter, PeerStats};

use super::traffic::Exchange;
use super::{Cluster, PING_COUNT, POLL, SETTLE_TIMEOUT};

impl Cluster {
    /// The node's datapath counters by name, summed over CPUs. Read in this
    /// process with the agent's own `inspect` code (the rows `inspect counters
    /// --json` prints): a CLI run costs ~130 ms with the debug binary, and
    /// every path takes several snapshots of every node.
    pub fn counters(&self, node: &str) -> Result<BTreeMap<String, u64>> {
        let maps = self.maps(node)?;
        let rows = inspect::counters(&maps, false)
            .with_context(|| format!("node {node}: reading counters"))?;
        Ok(rows
            .into_iter()
            .map(|row| (row.name.to_owned(), row.packets))
            .collect())
    }

    /// The node's per-peer traffic by peer node name (tunnel peers by tunnel
    /// endpoint, Flannel VTEPs by lease address), read like [`Cluster::counters`].
    pub fn peer_stats(&self, node: &str) -> Result<BTreeMap<String, PeerStats>> {
        let maps = self.maps(node)?;
        let rows = inspect::peers(&maps).with_context(|| format!("node {node}: reading peers"))?;
        let mut stats = BTreeMap::new();
        for row in rows {
            let endpoint: Ipv4Addr = row
                .endpoint
                .parse()
                .with_context(|| format!("peer endpoint {:?}", row.endpoint))?;
            let peer = self
                .node_at(row.kind, endpoint)
                .unwrap_or_else(|| format!("{} {endpoint}", row.kind));
            let traffic = PeerStats {
                tx_packets: row.tx_packets,
                tx_bytes: row.tx_bytes,
                rx_packets: row.rx_packets,
                rx_bytes: row.rx_bytes,
            };
            stats.insert(peer, traffic);
        }
        Ok(stats)
    }

    /// The node a peer row points at.
    fn node_at(&self, kind: &str, endpoint: Ipv4Addr) -> Option<String> {
        self.nodes
            .values()
            .find(|n| match kind {
                "flannel-vtep" => self
                    .leases
                    .get(&n.spec.name)
                    .is_some_and(|l| l.public_ip == endpoint),
                _ => n.spec.tunnel_endpoint == endpoint,
            })
            .map(|n| n.spec.name.clone())
    }

    /// The node's pinned maps (the agent need not run).
    pub fn maps(&self, node: &str) -> Result<Maps> {
        let root = &self.cluster_node(node)?.files.bpffs_root;
        Maps::open(&PinLayout::new(root)).with_context(|| {
            format!(
                "node {node}: opening the pinned maps under {}",
                root.display()
            )
        })
    }

    /// Counters and per-peer traffic of every node.
    pub fn stats(&self) -> Result<ClusterStats> {
        let mut nodes = BTreeMap::new();
        for name in self.nodes.keys() {
            nodes.insert(
                name.clone(),
                NodeStats {
                    counters: self.counters(name)?,
                    peers: self.peer_stats(name)?,
                },
            );
        }
        Ok(ClusterStats { nodes })
    }

    /// [`Cluster::stats`] once they have stopped moving (the last ACK of the
    /// previous exchange may still be on its way), or after a second anyway.
    pub fn settled_stats(&self) -> Result<ClusterStats> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut last = self.stats()?;
        loop {
            thread::sleep(POLL);
            let now = self.stats()?;
            if now == last || Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// Sends ping, TCP and UDP along `path` (both ways if it says so) and
    /// checks its proofs against the growth of the datapath statistics.
    pub fn check_path(&self, path: &PathSpec) -> Result<PathOutcome> {
        let from = self.endpoint(path.from)?;
        let to = self.endpoint(path.to)?;
        let before = self.settled_stats()?;
        let mut exchanges = vec![from.exchange(to)];
        if path.both_ways {
            exchanges.push(to.exchange(from));
        }
        let growth = self.stats()?.since(&before);
        let mut evidence = Vec::new();
        let mut proof_failures = Vec::new();
        for proof in &path.proofs {
            match proof.check(&growth, u64::from(PING_COUNT)) {
                Ok(seen) => evidence.push(seen),
                Err(missing) => proof_failures.push(missing),
            }
        }
        proof_failures.extend(growth.drops());
        // Retransmissions within the allowance pass, but say so: they are
        // what a stall or a loss looks like from the ends.
        for exchange in &exchanges {
            if let Ok(echo) = &exchange.tcp
                && echo.retransmitted > 0
            {
                evidence.push(format!(
                    "TCP {} → {}: {} segments retransmitted, {} reported as duplicates",
                    exchange.from, exchange.to, echo.retransmitted, echo.duplicates_reported
                ));
            }
        }
        Ok(PathOutcome {
            title: path.title.clone(),
            exchanges,
            evidence,
            proof_failures,
        })
    }

    /// The nodes whose state explains `path`: its ends, the nodes its proofs
    /// name, and the connector.
    pub fn nodes_of(&self, path: &PathSpec) -> Vec<String> {
        let mut nodes: Vec<String> = [path.from.node(), path.to.node()]
            .into_iter()
            .chain(path.proofs.iter().flat_map(Proof::nodes))
            .map(str::to_owned)
            .chain(self.connector_names())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

// ---------------------------------------------------------------------------
// Statistics and proofs
// ---------------------------------------------------------------------------

/// One node's datapath statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Counter name → packets.
    pub counters: BTreeMap<String, u64>,
    /// Peer node name → traffic with it.
    pub peers: BTreeMap<String, PeerStats>,
}

/// Every node's statistics, or (from [`ClusterStats::since`]) their growth.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterStats {
    pub nodes: BTreeMap<String, NodeStats>,
}

impl ClusterStats {
    pub fn counter(&self, node: &str, counter: Counter) -> u64 {
        self.nodes
            .get(node)
            .and_then(|n| n.counters.get(counter.name()))
            .copied()
            .unwrap_or(0)
    }

    /// `node`'s traffic with `peer` (zero if `peer` is not its peer).
    pub fn peer(&self, node: &str, peer: &str) -> PeerStats {
        self.nodes
            .get(node)
            .and_then(|n| n.peers.get(peer))
            .copied()
            .unwrap_or_default()
    }

    /// How much every value grew since `before`.
    pub fn since(&self, before: &ClusterStats) -> ClusterStats {
        let nodes = self
            .nodes
            .iter()
            .map(|(name, now)| {
                let then = before.nodes.get(name).cloned().unwrap_or_default();
                let counters = now
                    .counters
                    .iter()
                    .map(|(c, v)| {
                        (
                            c.clone(),
                            v.saturating_sub(then.counters.get(c).copied().unwrap_or(0)),
                        )
                    })
                    .collect();
                let peers = now
                    .peers
                    .iter()
                    .map(|(p, s)| {
                        let t = then.peers.get(p).copied().unwrap_or_default();
                        let grown = PeerStats {
                            tx_packets: s.tx_packets.saturating_sub(t.tx_packets),
                            tx_bytes: s.tx_bytes.saturating_sub(t.tx_bytes),
                            rx_packets: s.rx_packets.saturating_sub(t.rx_packets),
                            rx_bytes: s.rx_bytes.saturating_sub(t.rx_bytes),
                        };
                        (p.clone(), grown)
                    })
                    .collect();
                (name.clone(), NodeStats { counters, peers })
            })
            .collect();
        ClusterStats { nodes }
    }

    /// Every drop counter that is non-zero, as `node: counter +n`.
    pub fn drops(&self) -> Vec<String> {
        let mut drops = Vec::new();
        for (name, node) in &self.nodes {
            for counter in Counter::ALL.iter().filter(|c| c.is_drop()) {
                let grown = node.counters.get(counter.name()).copied().unwrap_or(0);
                if grown > 0 {
                    drops.push(format!(
                        "{name}: {} +{grown} (nothing on a working path may be dropped)",
                        counter.name()
                    ));
                }
            }
        }
        drops
    }
}

/// Which endpoint of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Pod(&'static str),
    /// The hostNetwork endpoint.
    Node(&'static str),
}

impl At {
    pub fn node(&self) -> &'static str {
        match self {
            At::Pod(node) | At::Node(node) => node,
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Pod(node) => write!(f, "{node} pod"),
            At::Node(node) => write!(f, "{node} node"),
        }
    }
}

/// Counters that move only when fabedge's tunnel or the connector's Flannel
/// masquerade carries a packet.
const TUNNEL_COUNTERS: [Counter; 4] = [
    Counter::ToTunnel,
    Counter::FromTunnel,
    Counter::FlannelEncap,
    Counter::FlannelDecap,
];

/// Evidence a path must leave in the datapath statistics, beyond the traffic
/// getting through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// `from` sent packets into its tunnel to `to`, and `to` received them from `from`.
    Tunnel {
        from: &'static str,
        to: &'static str,
    },
    /// A counter on `node` grew.
    Counted {
        node: &'static str,
        counter: Counter,
    },
    /// Nothing crossed `node`'s tunnels or Flannel masquerade.
    Bypassed { node: &'static str },
    /// The connector `node` took Flannel traffic over from the VTEP of cloud
    /// node `vtep` (its per-VTEP receive statistics grew).
    FromVtep {
        node: &'static str,
        vtep: &'static str,
    },
}

impl Proof {
    pub(super) fn nodes(&self) -> Vec<&'static str> {
        match self {
            Proof::Tunnel { from, to } => vec![from, to],
            Proof::Counted { node, .. }
            | Proof::Bypassed { node }
            | Proof::FromVtep { node, .. } => vec![node],
        }
    }

    /// What the statistics show, or why they do not prove this; `least` is
    /// the smallest growth accepted.
    pub(super) fn check(&self, growth: &ClusterStats, least: u64) -> Result<String, String> {
        match *self {
            Proof::Tunnel { from, to } => {
                let sent = growth.peer(from, to).tx_packets;
                let received = growth.peer(to, from).rx_packets;
                let seen =
                    format!("tunnel {from}→{to}: {from} sent {sent}, {to} received {received}");
                if sent >= least && received >= least {
                    Ok(seen)
                } else {
                    Err(format!("{seen} (expected ≥ {least} each)"))
                }
            }
            Proof::Counted { node, counter } => {
                let grown = growth.counter(node, counter);
                let seen = format!("{node} {} +{grown}", counter.name());
                if grown >= least {
                    Ok(seen)
                } else {
                    Err(format!("{seen} (expected ≥ {least})"))
                }
            }
            Proof::FromVtep { node, vtep } => {
                let received = growth.peer(node, vtep).rx_packets;
                let seen = format!("{node} received {received} from {vtep}'s VTEP");
                if received >= least {
                    Ok(seen)
                } else {
                    Err(format!("{seen} (expected ≥ {least})"))
                }
            }
            Proof::Bypassed { node } => {
                let mut moved: Vec<String> = TUNNEL_COUNTERS
                    .iter()
                    .map(|c| (c.name(), growth.counter(node, *c)))
                    .filter(|(_, n)| *n > 0)
                    .map(|(name, n)| format!("{name} +{n}"))
                    .collect();
                if let Some(stats) = growth.nodes.get(node) {
                    moved.extend(
                        stats
                            .peers
                            .iter()
                            .filter(|(_, s)| s.tx_packets + s.rx_packets > 0)
                            .map(|(peer, s)| {
                                format!("peer {peer} tx +{} rx +{}", s.tx_packets, s.rx_packets)
                            }),
                    );
                }
                if moved.is_empty() {
                    Ok(format!("{node}: no tunnel or masquerade traffic"))
                } else {
                    Err(format!(
                        "{node} should not have carried this path, but: {}",
                        moved.join(", ")
                    ))
                }
            }
        }
    }
}

/// One path of the seed's matrix: traffic from one endpoint to another and
/// the evidence it must leave.
#[derive(Debug, Clone)]
pub struct PathSpec {
    /// The name of the test proving it.
    pub name: &'static str,
    /// What the demo prints: `c1  edge-1 pod → cloud-1 pod`.
    pub title: String,
    pub from: At,
    pub to: At,
    /// Also start traffic from `to` to `from`.
    pub both_ways: bool,
    pub proofs: Vec<Proof>,
}

impl PathSpec {
    /// `label` is the article's name for the path (`c1`), if it has one.
    pub fn new(name: &'static str, label: &str, from: At, to: At) -> Self {
        let title = format!("{label:<4}{from} → {to}");
        PathSpec {
            name,
            title,
            from,
            to,
            both_ways: false,
            proofs: Vec::new(),
        }
    }

    pub fn both_ways(mut self) -> Self {
        self.both_ways = true;
        self.title = self.title.replacen('→', "↔", 1);
        self
    }

    /// Packets crossed the tunnel from node `from` to node `to`.
    pub fn tunnel(mut self, from: &'static str, to: &'static str) -> Self {
        self.proofs.push(Proof::Tunnel { from, to });
        self
    }

    pub fn counted(mut self, node: &'static str, counter: Counter) -> Self {
        self.proofs.push(Proof::Counted { node, counter });
        self
    }

    /// Connector `node` took over Flannel traffic from node `vtep`'s VTEP.
    pub fn from_vtep(mut self, node: &'static str, vtep: &'static str) -> Self {
        self.proofs.push(Proof::FromVtep { node, vtep });
        self
    }

    pub fn bypassing(mut self, node: &'static str) -> Self {
        self.proofs.push(Proof::Bypassed { node });
        self
    }
}

/// What [`Cluster::check_path`] found.
#[derive(Debug)]
pub struct PathOutcome {
    pub title: String,
    /// The exchange from `from` to `to`, then (both ways) back.
    pub exchanges: Vec<Exchange>,
    /// What the statistics showed, one line per proof that held.
    pub evidence: Vec<String>,
    /// Proofs that did not hold, and drops seen anywhere.
    pub proof_failures: Vec<String>,
}

impl PathOutcome {
    pub fn passed(&self) -> bool {
        self.exchanges.iter().all(Exchange::succeeded) && self.proof_failures.is_empty()
    }

    /// Everything that went wrong, one line each.
    pub fn failures(&self) -> Vec<String> {
        let mut failures: Vec<String> = self
            .exchanges
            .iter()
            .flat_map(|e| {
                e.failures()
                    .into_iter()
                    .map(move |f| format!("{} → {}: {f}", e.from, e.to))
            })
            .collect();
        failures.extend(self.proof_failures.iter().cloned());
        failures
    }
}
