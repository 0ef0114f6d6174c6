//! Connector high availability (issue #12) in the mini cluster: a node that dies (uplinks down,
//! agent SIGKILLed) and comes back, and which connector an edge uses now.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    sync::PoisonError,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Array, MapData};
use fabedge_agent::datapath::{PinLayout, open_pinned};
use fabedge_common::{CONNECTOR_GROUP, GroupEntry, map_names, route_flags, route_kind};

use crate::netns::NextHop;

use super::agents::AgentProcess;
use super::fixture::NodeRole;
use super::gaps::{BothWays, PingGaps};
use super::{Cluster, LAN_NIC, POLL, WAN, WAN_NIC};

/// The connector an edge sends cloud-bound traffic through, as its datapath says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connector {
    /// The connector's node name.
    pub name: String,
    /// Its `FE_PEERS` id on the edge.
    pub peer_id: u16,
    /// The route names the connector group (`route_flags::VIA_GROUP`) and the
    /// group's active member is this connector; false: the route names the
    /// connector itself (an agent without connector groups).
    pub via_group: bool,
}

/// Which connector `edge` uses now: its route toward a cloud pod CIDR, and
/// when that route names the connector group, the group's active member in
/// `FE_GROUPS`, translated to a node through `FE_PEERS`.
///
/// The one function to adapt if the agent's way of saying it changes (e.g.
/// to parse `fabedge-agent inspect peers --json` once it shows the connector
/// each edge uses). Read in this process from the pinned maps: it is polled
/// every few milliseconds during failovers.
pub fn connector_of(cluster: &Cluster, edge: &str) -> Result<Connector> {
    // A cloud node that is no connector: its pod CIDR is reached only
    // through "the connector".
    let cloud = cluster
        .nodes
        .values()
        .find(|n| n.spec.role == NodeRole::Cloud)
        .context("the mini cluster has no cloud node without the connector label")?;
    let target = cloud.spec.pod_cidr.network();
    let maps = cluster.maps(edge)?;
    let (net, route) = maps
        .route_entries()?
        .into_iter()
        .filter(|(net, _)| net.contains(&target))
        .max_by_key(|(net, _)| net.prefix_len())
        .with_context(|| format!("{edge}: no route toward {} ({target})", cloud.spec.name))?;
    ensure!(
        route.kind == route_kind::TUNNEL,
        "{edge}: the route {net} toward {}'s pods is of kind {}, not a tunnel",
        cloud.spec.name,
        route.kind
    );
    let via_group = route.flags & route_flags::VIA_GROUP != 0;
    let peer_id = if via_group {
        let layout = PinLayout::new(&cluster.cluster_node(edge)?.files.bpffs_root);
        let groups: Array<MapData, GroupEntry> = open_pinned(&layout, map_names::GROUPS)?
            .try_into()
            .with_context(|| format!("{edge}: {} is not an array", map_names::GROUPS))?;
        ensure!(
            route.peer_id == CONNECTOR_GROUP,
            "{edge}: the route {net} names group {}, not the connector group {CONNECTOR_GROUP}",
            route.peer_id
        );
        let group = groups
            .get(&u32::from(route.peer_id), 0)
            .with_context(|| format!("{edge}: reading {} {}", map_names::GROUPS, route.peer_id))?;
        if group.active == 0 {
            bail!("{edge}: no member of the connector group is alive ({group:?})");
        }
        group.active
    } else {
        route.peer_id
    };
    let peer = maps.peer(peer_id)?;
    let endpoint = Ipv4Addr::from(peer.underlay_ip);
    let name = cluster
        .nodes
        .values()
        .find(|n| n.spec.role == NodeRole::Connector && n.spec.tunnel_endpoint == endpoint)
        .map(|n| n.spec.name.clone())
        .with_context(|| format!("{edge}: peer {peer_id} at {endpoint} is no connector"))?;
    Ok(Connector {
        name,
        peer_id,
        via_group,
    })
}

impl Cluster {
    /// The connectors' names, sorted.
    pub fn connectors(&self) -> Vec<String> {
        self.connector_names()
    }

    /// The edge nodes' names, sorted.
    pub fn edges(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.spec.role == NodeRole::Edge)
            .map(|n| n.spec.name.clone())
            .collect()
    }

    /// [`connector_of`].
    pub fn connector_of(&self, edge: &str) -> Result<Connector> {
        connector_of(self, edge)
    }

    /// The NICs of `node` wired to the switch.
    fn uplinks(&self, node: &str) -> Result<Vec<&'static str>> {
        let spec = &self.cluster_node(node)?.spec;
        Ok(match spec.role {
            NodeRole::Edge => vec![WAN_NIC],
            NodeRole::Connector | NodeRole::Cloud if spec.external_ip.is_some() => {
                vec![LAN_NIC, WAN_NIC]
            }
            NodeRole::Connector | NodeRole::Cloud => vec![LAN_NIC],
        })
    }

    /// `node` dies as the proof says: every NIC it has toward the
    /// switch goes down (nothing of its datapath can forward any more) and
    /// its agent is killed with SIGKILL (no shutdown path runs). Its pinned
    /// state stays, as it would in a node's memory until the power is cut.
    pub fn kill_node(&self, node: &str) -> Result<()> {
        let n = self.cluster_node(node)?;
        // Every NIC in one `ip -batch`: a node dies at once. One `ip` run
        // per NIC left the second up for the time an `ip` takes to start
        // (most of a second under TCG), and the node half alive.
        let nics = self.uplinks(node)?;
        let batch =
            std::env::temp_dir().join(format!("fabedge-kill-{node}-{}.ip", std::process::id()));
        let commands: String = nics
            .iter()
            .map(|nic| format!("link set {nic} down\n"))
            .collect();
        std::fs::write(&batch, commands)?;
        let downed = n.netns.ip(&["-batch", &batch.display().to_string()]);
        let _ = std::fs::remove_file(&batch);
        downed.with_context(|| format!("killing node {node}: taking {nics:?} down"))?;
        if let Some(mut agent) = n
            .agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            agent.kill();
        }
        Ok(())
    }

    /// Brings a node killed by [`Cluster::kill_node`] back: the shared VTEP
    /// addresses its agent had claimed are gone (a node that comes back does
    /// not hold what it held when it died: its agent must claim them again),
    /// its NICs come up with the routes the harness gave them, and its agent
    /// starts; returns once the agent has applied its first plan.
    pub fn revive_node(&self, node: &str) -> Result<()> {
        let n = self.cluster_node(node)?;
        ensure!(
            n.agent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none(),
            "revive_node({node}): its agent still runs; kill the node first"
        );
        if n.spec.is_cloud() {
            self.drop_shared_vtep_addresses(node)
                .with_context(|| format!("reviving node {node}"))?;
        }
        for nic in self.uplinks(node)? {
            n.netns
                .set_up(nic)
                .with_context(|| format!("reviving node {node}: bringing {nic} up"))?;
        }
        // Taking a NIC down removed the routes through it.
        if let Some(site) = self.nat_site_of(&n.spec) {
            n.netns
                .add_route(&WAN.to_string(), NextHop::Gateway(site.gateway))
                .with_context(|| format!("reviving node {node}: its route to the WAN"))?;
        }
        let offset = fs::metadata(&n.files.agent_log)
            .map(|m| m.len())
            .unwrap_or(0);
        {
            let mut agent = n.agent.lock().unwrap_or_else(PoisonError::into_inner);
            *agent = Some(AgentProcess::start(
                &n.netns,
                node,
                &n.agent_args,
                &n.files.agent_log,
                n.container.as_ref(),
            )?);
        }
        self.wait_for_agent(node, offset)
            .with_context(|| format!("reviving node {node}"))
    }

    /// Removes from `node`'s LAN NIC every connector's shared VTEP address.
    fn drop_shared_vtep_addresses(&self, node: &str) -> Result<()> {
        let shared: Vec<Ipv4Addr> = self
            .nodes
            .values()
            .filter_map(|n| n.spec.vtep_address)
            .collect();
        let netns = self.node_netns(node)?;
        for address in self.addresses(node, LAN_NIC)? {
            if shared.contains(&address.addr()) {
                netns.ip(&["addr", "del", &address.to_string(), "dev", LAN_NIC])?;
            }
        }
        Ok(())
    }

    /// The IPv4 addresses on `nic` of `node`, with their prefix lengths.
    pub fn addresses(&self, node: &str, nic: &str) -> Result<Vec<ipnet::Ipv4Net>> {
        let out = self
            .node_netns(node)?
            .ip(&["-4", "-o", "addr", "show", "dev", nic])?;
        out.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next()
            })
            .map(|cidr| {
                cidr.parse()
                    .with_context(|| format!("{node} {nic}: address {cidr:?}"))
            })
            .collect()
    }

    /// Whether `node`'s agent runs (false after [`Cluster::kill_node`]).
    pub fn agent_running(&self, node: &str) -> Result<bool> {
        Ok(self
            .cluster_node(node)?
            .agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some())
    }

    /// The process id of `node`'s agent (its CPU time is in `/proc/<pid>/stat`).
    pub fn agent_pid(&self, node: &str) -> Result<u32> {
        self.cluster_node(node)?
            .agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(AgentProcess::pid)
            .with_context(|| format!("the agent of {node} is not running"))
    }
}

/// What one failover did: the connector killed, the gaps the pings saw in
/// each direction, and the connector the edge used afterwards.
#[derive(Debug)]
pub struct Failover {
    pub killed: String,
    /// Edge pod → cloud pod.
    pub edge_to_cloud: PingGaps,
    /// Cloud pod → edge pod.
    pub cloud_to_edge: PingGaps,
    /// `connector_of(edge)` once both directions answered again (an error
    /// text if it could not be read).
    pub now_using: Result<Connector, String>,
    /// Both directions answered again within the time allowed.
    pub recovered: bool,
}

/// A baseline of replies before the kill, so the gap has a start.
const BEFORE_KILL: Duration = Duration::from_millis(500);
/// Replies after both directions answered again: the gap has an end.
const AFTER_RECOVERY: Duration = Duration::from_millis(300);

impl Cluster {
    /// Every edge's connector ([`connector_of`]) once none has changed for
    /// `quiet` (e.g. longer than the hold-down), within `timeout`.
    pub fn settled_connectors(
        &self,
        quiet: Duration,
        timeout: Duration,
    ) -> Result<BTreeMap<String, String>> {
        let deadline = Instant::now() + timeout;
        let read = || -> Result<BTreeMap<String, String>> {
            self.edges()
                .into_iter()
                .map(|edge| Ok((edge.clone(), self.connector_of(&edge)?.name)))
                .collect()
        };
        let mut last = read()?;
        let mut since = Instant::now();
        loop {
            if since.elapsed() >= quiet {
                return Ok(last);
            }
            ensure!(
                Instant::now() < deadline,
                "the edges' connectors did not stay put for {quiet:?} within {timeout:?}: last {last:?}\n{}",
                self.diagnostics(&self.connectors())
            );
            thread::sleep(POLL);
            let now = read()?;
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
    }

    /// Polls [`connector_of`] for `edge` until `wanted` holds; returns the
    /// connector and when it was first seen.
    pub fn wait_for_connector(
        &self,
        edge: &str,
        timeout: Duration,
        wanted: impl Fn(&Connector) -> bool,
    ) -> Result<(Connector, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.connector_of(edge);
            let at = Instant::now();
            if let Ok(connector) = &now
                && wanted(connector)
            {
                return Ok((connector.clone(), at));
            }
            ensure!(
                at < deadline,
                "{edge} did not switch connectors as expected within {timeout:?} (last: {now:?})\n{}",
                self.diagnostics(&self.connectors())
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The failover: pings every 10 ms both ways between `edge`'s
    /// pod and `cloud`'s pod, then kills ([`Cluster::kill_node`]) the
    /// connector `edge` uses, and stops pinging once both directions have
    /// answered again (or after `timeout`). The connector stays dead: the
    /// caller revives it ([`Cluster::revive_node`]).
    pub fn fail_over(&self, edge: &str, cloud: &str, timeout: Duration) -> Result<Failover> {
        let primary = self.connector_of(edge)?.name;
        let meters = BothWays::start(self.pod(edge)?, self.pod(cloud)?)?;
        thread::sleep(BEFORE_KILL);
        let killed_at = Instant::now();
        self.kill_node(&primary)?;
        let deadline = killed_at + timeout;
        // Replies that were in flight at the kill do not count as recovery.
        // The node is dead once kill_node returns, not when it was called:
        // under qemu TCG taking two links down takes seconds, and replies
        // meanwhile would otherwise end the measurement mid-gap.
        let recovery_after = Instant::now() + Duration::from_millis(100);
        let mut recovered = false;
        while Instant::now() < deadline {
            if meters.both_replied_since(recovery_after) {
                recovered = true;
                break;
            }
            thread::sleep(POLL);
        }
        if recovered {
            thread::sleep(AFTER_RECOVERY);
        }
        let now_using = self.connector_of(edge).map_err(|e| format!("{e:#}"));
        let (edge_to_cloud, cloud_to_edge) = meters.stop()?;
        Ok(Failover {
            killed: primary,
            edge_to_cloud,
            cloud_to_edge,
            now_using,
            recovered,
        })
    }
}

/// The agents' connector-HA flags for `fabedge-agent run`: probes every
/// 100 ms, a connector dead after 3 misses, `hold_down` before an edge
/// returns to a connector that came back.
pub fn ha_agent_args(hold_down: Duration) -> Vec<String> {
    [
        "--probe-interval".to_owned(),
        "100ms".to_owned(),
        "--probe-misses".to_owned(),
        "3".to_owned(),
        "--hold-down".to_owned(),
        format!("{}ms", hold_down.as_millis()),
    ]
    .into()
}
