//! Flannel emulation on the cloud nodes: `flannel.1`, its FDB, neighbours and routes from the
//! leases, and kube-proxy DNAT.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

use super::fixture::{FlannelLease, Manifest, NodeRole, NodeSpec};
use super::{
    Cluster, FLANNEL_DEV, FLANNEL_MTU, FLANNEL_PORT, FLANNEL_TIMEOUT, FLANNEL_VNI, LAN_NIC, POLL,
};

impl Cluster {
    /// Plays Flannel on every cloud node until the connector has written a
    /// lease onto every edge Node and those leases are programmed.
    pub(super) fn wait_for_flannel(&mut self) -> Result<()> {
        let deadline = Instant::now() + FLANNEL_TIMEOUT * self.timeout_factor;
        loop {
            let manifest = Manifest::read(&self.manifests)?;
            let missing: Vec<&str> = manifest
                .nodes
                .iter()
                .filter(|n| n.role == NodeRole::Edge && !manifest.leases.contains_key(&n.name))
                .map(|n| n.name.as_str())
                .collect();
            if missing.is_empty() {
                self.program_flannel(&manifest.leases)?;
                self.leases = manifest.leases;
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the connector did not write Flannel annotations onto edge node(s) {} within {FLANNEL_TIMEOUT:?}\n{}",
                    missing.join(", "),
                    self.agent_logs(&self.connector_names())
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Plays Flannel once more, as after a watch event: programs the leases
    /// the manifest file holds now (e.g. after a test edited it).
    pub fn sync_flannel(&self) -> Result<()> {
        self.program_flannel(&Manifest::read(&self.manifests)?.leases)
    }

    /// Programs `flannel.1` on every cloud node from `leases` ([`program_leases`]).
    fn program_flannel(&self, leases: &BTreeMap<String, FlannelLease>) -> Result<()> {
        program_leases(&self.flannel_nodes(), leases)
    }

    /// Every node with its namespace, as the Flannel emulation needs them.
    pub(super) fn flannel_nodes(&self) -> Vec<(NodeSpec, Arc<Netns>)> {
        self.nodes
            .values()
            .map(|n| (n.spec.clone(), Arc::clone(&n.netns)))
            .collect()
    }

    /// Starts playing Flannel's lease watch ([`FlannelFollower`]); the
    /// cluster stops it before its namespaces go.
    pub(super) fn follow_flannel(&mut self) {
        self.flannel_follower = Some(FlannelFollower::start(
            self.manifests.clone(),
            self.flannel_nodes(),
        ));
    }

    /// What kube-proxy (iptables mode) writes on a cloud node for a
    /// ClusterIP: a DNAT in PREROUTING (pods) and OUTPUT (the node itself)
    /// to one of `backends`, each picked with equal probability.
    pub fn kube_proxy_dnat(
        &self,
        node: &str,
        vip: Ipv4Addr,
        port: u16,
        protocol: &str,
        backends: &[SocketAddrV4],
    ) -> Result<()> {
        let netns = self.node_netns(node)?;
        for chain in ["PREROUTING", "OUTPUT"] {
            for (i, backend) in backends.iter().enumerate() {
                let probability = format!("{:.5}", 1.0 / (backends.len() - i) as f64);
                let (vip, port, backend) = (vip.to_string(), port.to_string(), backend.to_string());
                let mut args = vec![
                    "-w", "-t", "nat", "-A", chain, "-d", &vip, "-p", protocol, "--dport", &port,
                ];
                if i + 1 < backends.len() {
                    args.extend([
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &probability,
                    ]);
                }
                args.extend(["-j", "DNAT", "--to-destination", &backend]);
                netns
                    .run_ok("iptables", &args)
                    .with_context(|| format!("{node}: kube-proxy-like DNAT for {vip}:{port}"))?;
            }
        }
        Ok(())
    }
}

pub(super) fn create_flannel_device(
    netns: &Netns,
    spec: &NodeSpec,
    lease: &FlannelLease,
) -> Result<()> {
    let local = spec.internal_ip.to_string();
    netns
        .ip(&[
            "link",
            "add",
            FLANNEL_DEV,
            "type",
            "vxlan",
            "id",
            FLANNEL_VNI,
            "local",
            &local,
            "dev",
            LAN_NIC,
            "dstport",
            FLANNEL_PORT,
            "nolearning",
        ])
        .context("creating flannel.1")?;
    netns.ip(&[
        "link",
        "set",
        FLANNEL_DEV,
        "address",
        &lease.vtep_mac,
        "mtu",
        &FLANNEL_MTU.to_string(),
    ])?;
    netns.add_addr(FLANNEL_DEV, &format!("{}/32", spec.pod_cidr.network()))?;
    netns.set_up(FLANNEL_DEV)
}

/// Programs `flannel.1` on every cloud node the way Flannel's VXLAN backend
/// does for each lease it learns: a route via the remote pod CIDR's network
/// address (onlink), a permanent neighbour entry binding that address to
/// the remote `VtepMAC` on `flannel.1`, and an FDB entry sending that MAC to
/// the remote public IP. The public IP itself is resolved on the LAN by
/// ordinary kernel ARP, never pinned: a shared VTEP address that moves to
/// another connector (gratuitous ARP) is followed as on a real cloud node.
/// Leases at the node's own addresses are skipped, as Flannel skips its own
/// lease (on the connector, the edge leases it wrote name the connector
/// itself; with shared VTEP addresses, the connector's own one).
fn program_leases(
    nodes: &[(NodeSpec, Arc<Netns>)],
    leases: &BTreeMap<String, FlannelLease>,
) -> Result<()> {
    for (spec, netns) in nodes.iter().filter(|(n, _)| n.is_cloud()) {
        let own_addresses: Vec<Ipv4Addr> = [
            Some(spec.internal_ip),
            spec.vtep_address,
            leases.get(&spec.name).map(|l| l.public_ip),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (remote, _) in nodes.iter().filter(|(r, _)| r.name != spec.name) {
            let Some(lease) = leases.get(&remote.name) else {
                continue;
            };
            if own_addresses.contains(&lease.public_ip) {
                continue;
            }
            let gateway = remote.pod_cidr.network().to_string();
            let context = || {
                format!(
                    "programming Flannel on {} for {}'s lease {lease:?}",
                    spec.name, remote.name
                )
            };
            netns
                .ip(&[
                    "route",
                    "replace",
                    &remote.pod_cidr.to_string(),
                    "via",
                    &gateway,
                    "dev",
                    FLANNEL_DEV,
                    "onlink",
                ])
                .with_context(context)?;
            netns
                .ip(&[
                    "neigh",
                    "replace",
                    &gateway,
                    "lladdr",
                    &lease.vtep_mac,
                    "dev",
                    FLANNEL_DEV,
                    "nud",
                    "permanent",
                ])
                .with_context(context)?;
            netns
                .run_ok(
                    "bridge",
                    &[
                        "fdb",
                        "replace",
                        &lease.vtep_mac,
                        "dev",
                        FLANNEL_DEV,
                        "dst",
                        &lease.public_ip.to_string(),
                        "self",
                        "permanent",
                    ],
                )
                .with_context(context)?;
        }
    }
    Ok(())
}

/// Flannel's lease watch on every cloud node: a thread that re-reads the
/// manifest file whenever it changes and programs the leases that changed
/// ([`program_leases`]), as flanneld does on a Node update. With it, the
/// leading connector's annotation changes reach `flannel.1` with no test
/// calling [`Cluster::sync_flannel`]. Stopped on drop.
pub(super) struct FlannelFollower {
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl FlannelFollower {
    fn start(manifests: PathBuf, nodes: Vec<(NodeSpec, Arc<Netns>)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let worker = thread::spawn(move || {
            let mut programmed: BTreeMap<String, FlannelLease> = BTreeMap::new();
            while !stopping.load(Ordering::Relaxed) {
                // A file caught mid-write parses badly or misses leases; the
                // next round reads it whole.
                if let Ok(manifest) = Manifest::read(&manifests) {
                    let changed: BTreeMap<String, FlannelLease> = manifest
                        .leases
                        .iter()
                        .filter(|(name, lease)| programmed.get(*name) != Some(*lease))
                        .map(|(name, lease)| (name.clone(), lease.clone()))
                        .collect();
                    if !changed.is_empty() {
                        match program_leases(&nodes, &changed) {
                            Ok(()) => programmed.extend(changed),
                            Err(e) => eprintln!("warning: Flannel emulation: {e:#}"),
                        }
                    }
                }
                thread::sleep(POLL);
            }
        });
        FlannelFollower {
            stop,
            worker: Some(worker),
        }
    }
}

impl Drop for FlannelFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
