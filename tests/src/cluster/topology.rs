//! Building the cluster: switch, nodes and their links, the accessors that name them, and tearing
//! everything down.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
};

use anyhow::{Context, Result, ensure};
use ipnet::Ipv4Net;

use crate::netns::{Netns, NextHop, veth_pair};

use super::agents::AgentProcess;
use super::cgroup::{cgroup2_root, node_cgroup};
use super::container::{ContainerAgent, remove_stale_containers};
use super::fixture::{Manifest, NodeRole, NodeSpec};
use super::flannel::create_flannel_device;
use super::nat::{create_nat_sites, forward_port_to_esp, move_edges_to_the_site_lans};
use super::proofs::At;
use super::traffic::Endpoint;
use super::{
    AGENT_POLL_INTERVAL, BPFFS, Cluster, ClusterNode, ClusterOptions, LAN, LAN_BRIDGE, LAN_NIC,
    LEFTOVER_PREFIX, NEXT_CLUSTER, NodeFiles, WAN, WAN_BRIDGE, WAN_NIC,
};

impl Cluster {
    /// Builds the whole cluster and waits until every path can carry traffic:
    /// agents have applied their plans, the connector has written the edge
    /// leases and Flannel has been programmed from them, pods are attached.
    pub fn start(options: ClusterOptions) -> Result<Cluster> {
        let sequence = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
        let cluster_id = format!("{LEFTOVER_PREFIX}{}-{sequence}", std::process::id());
        let work_dir = std::env::temp_dir().join(&cluster_id);
        fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        let manifests = work_dir.join("cluster.yaml");
        fs::copy(&options.manifests, &manifests).with_context(|| {
            format!(
                "copying {} to {}",
                options.manifests.display(),
                manifests.display()
            )
        })?;
        ensure!(
            options.edges_behind_nat || options.second_site.is_none(),
            "ClusterOptions::second_site needs edges_behind_nat: true (it splits the edges' NAT site in two)"
        );
        if options.edges_behind_nat {
            move_edges_to_the_site_lans(&manifests, options.second_site.is_some())?;
        }
        let manifest = Manifest::read(&manifests)?;

        // From here on, a failure drops `cluster`, which tears down what exists.
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            switch: None,
            nat: None,
            second_nat: None,
            edges_behind_nat: options.edges_behind_nat,
            second_site: options.second_site,
            connector_args: options.connector_args.clone(),
            work_dir,
            manifests,
            leases: manifest.leases.clone(),
            extra_agent_args: options.extra_agent_args.clone(),
            timeout_factor: options.timeout_factor.max(1),
            agent_image: options.agent_image.clone(),
            flannel_follower: None,
        };
        let switch = Netns::new("switch")?;
        // The first namespace of this process has removed stale namespaces
        // (and the agents in them); now their bpffs roots and files can go.
        remove_stale_leftovers();
        if cluster.agent_image.is_some() {
            remove_stale_containers();
        }
        switch.bridge(WAN_BRIDGE)?;
        switch.bridge(LAN_BRIDGE)?;
        if options.edges_behind_nat {
            let (first, second) = create_nat_sites(&switch, options.second_site)?;
            cluster.nat = Some(first);
            cluster.second_nat = second;
        }
        cluster.switch = Some(switch);

        for spec in &manifest.nodes {
            let node = cluster.create_node(spec, &cluster_id)?;
            cluster.nodes.insert(spec.name.clone(), node);
        }
        if let Some(port) = options.connector_port_forward {
            for name in cluster.connector_names() {
                forward_port_to_esp(cluster.node_netns(&name)?, port)
                    .with_context(|| format!("port forward in front of {name}"))?;
            }
        }
        for node in cluster.nodes.values_mut() {
            let agent = AgentProcess::start(
                &node.netns,
                &node.spec.name,
                &node.agent_args,
                &node.files.agent_log,
                node.container.as_ref(),
            )?;
            *node.agent.get_mut().unwrap_or_else(PoisonError::into_inner) = Some(agent);
            node.agent_started = true;
        }
        for name in cluster.node_names() {
            cluster.wait_for_agent(&name, 0)?;
        }
        cluster.wait_for_flannel()?;
        if options.follow_flannel {
            cluster.follow_flannel();
        }
        for name in cluster.node_names() {
            cluster.attach_pod(&name)?;
        }
        Ok(cluster)
    }

    /// Every node's name, sorted.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// A node's namespace, its wiring to the switch, its addresses and (on
    /// cloud nodes) Flannel's device; its agent's files and arguments.
    fn create_node(&self, spec: &NodeSpec, cluster_id: &str) -> Result<ClusterNode> {
        let switch = self
            .switch
            .as_ref()
            .context("the switch namespace exists before nodes")?;
        let context = || format!("creating node {} ({})", spec.name, spec.role);
        let netns = Netns::new(&spec.name).with_context(context)?;
        // The switch's port for a node's NIC is `<node>-wan` / `<node>-lan`.
        let wire = |nic: &str,
                    network: &str,
                    bridge: &str,
                    address: Ipv4Addr,
                    net: Ipv4Net|
         -> Result<()> {
            ensure!(
                net.contains(&address),
                "node {}: {address} (on {nic}) is outside {net}",
                spec.name
            );
            let port = format!("{}-{network}", spec.name);
            veth_pair(&netns, nic, switch, &port)?;
            switch.attach_to_bridge(&port, bridge)?;
            netns.add_addr(nic, &format!("{address}/{}", net.prefix_len()))
        };
        match spec.role {
            NodeRole::Edge => {
                let public = spec.external_ip.with_context(|| {
                    format!(
                        "edge node {} needs an ExternalIP (its address on the WAN)",
                        spec.name
                    )
                })?;
                if let Some(site) = self.nat_site_of(spec) {
                    wire(WAN_NIC, "wan", site.bridge, public, site.lan).with_context(context)?;
                    netns
                        .add_route(&WAN.to_string(), NextHop::Gateway(site.gateway))
                        .with_context(context)?;
                } else {
                    wire(WAN_NIC, "wan", WAN_BRIDGE, public, WAN).with_context(context)?;
                }
                // Behind "NAT": the InternalIP is nobody's route but the tunnel's.
                netns
                    .add_addr("lo", &format!("{}/32", spec.internal_ip))
                    .with_context(context)?;
            }
            NodeRole::Connector | NodeRole::Cloud => {
                wire(LAN_NIC, "lan", LAN_BRIDGE, spec.internal_ip, LAN).with_context(context)?;
                if let Some(public) = spec.external_ip {
                    wire(WAN_NIC, "wan", WAN_BRIDGE, public, WAN).with_context(context)?;
                }
                netns
                    .set_sysctl("net.ipv4.ip_forward", "1")
                    .with_context(context)?;
                let lease = self.leases.get(&spec.name).with_context(|| {
                    format!(
                        "cloud node {} has no Flannel lease annotations in the manifest",
                        spec.name
                    )
                })?;
                create_flannel_device(&netns, spec, lease).with_context(context)?;
            }
        }

        let dir = self.work_dir.join(&spec.name);
        let files = NodeFiles {
            bpffs_root: Path::new(BPFFS).join(format!("{cluster_id}-{}", spec.name)),
            state_dir: dir.join("state"),
            cni_conf_dir: dir.join("cni"),
            ipam_dir: dir.join("ipam"),
            agent_log: dir.join("agent.log"),
        };
        for d in [&files.state_dir, &files.cni_conf_dir, &files.ipam_dir] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut agent_args: Vec<String> = vec![
            "--bpffs-root".into(),
            files.bpffs_root.display().to_string(),
            "run".into(),
            "--node".into(),
            spec.name.clone(),
            "--manifests".into(),
            self.manifests.display().to_string(),
            "--state-dir".into(),
            files.state_dir.display().to_string(),
            "--cni-conf-dir".into(),
            files.cni_conf_dir.display().to_string(),
            "--poll-interval".into(),
            AGENT_POLL_INTERVAL.into(),
        ];
        if let Some(uplink) = spec.uplink() {
            agent_args.extend(["--uplink".into(), uplink.into()]);
        }
        // cgroup programs see sockets of every network namespace: each node
        // gets its own cgroup, never the host's root.
        let cgroup = node_cgroup(cluster_id, &spec.name);
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        agent_args.extend(["--cgroup".into(), cgroup.display().to_string()]);
        agent_args.extend(self.extra_agent_args.iter().cloned());
        if spec.role == NodeRole::Connector {
            agent_args.extend(self.connector_args.iter().cloned());
        }
        let container = self
            .agent_image
            .as_ref()
            .filter(|image| image.nodes.contains(&spec.name))
            .map(|image| ContainerAgent {
                name: format!("{cluster_id}-{}", spec.name),
                image: image.reference.clone(),
                host_dirs: vec![
                    files.state_dir.clone(),
                    files.cni_conf_dir.clone(),
                    self.work_dir.clone(),
                ],
            });
        Ok(ClusterNode {
            spec: spec.clone(),
            files,
            agent_args,
            container,
            agent: Mutex::new(None),
            agent_started: false,
            pod: None,
            host: None,
            netns: Arc::new(netns),
        })
    }

    pub(super) fn cluster_node(&self, name: &str) -> Result<&ClusterNode> {
        self.nodes.get(name).with_context(|| {
            format!(
                "no node {name} in the mini cluster (nodes: {})",
                self.node_names().join(", ")
            )
        })
    }

    // -- what tests use ------------------------------------------------------

    /// The node's pod.
    pub fn pod(&self, node: &str) -> Result<&Endpoint> {
        self.cluster_node(node)?
            .pod
            .as_ref()
            .with_context(|| format!("node {node} has no pod"))
    }

    /// The node's hostNetwork endpoint (its namespace, at its InternalIP).
    pub fn node(&self, node: &str) -> Result<&Endpoint> {
        self.cluster_node(node)?
            .host
            .as_ref()
            .with_context(|| format!("node {node} has no hostNetwork endpoint"))
    }

    pub fn endpoint(&self, at: At) -> Result<&Endpoint> {
        match at {
            At::Pod(node) => self.pod(node),
            At::Node(node) => self.node(node),
        }
    }

    pub fn node_netns(&self, node: &str) -> Result<&Netns> {
        Ok(&self.cluster_node(node)?.netns)
    }

    /// The switch namespace; its bridge port for `node`'s `nic` is `<node>-<wan|lan>`.
    pub fn switch(&self) -> Result<&Netns> {
        self.switch.as_ref().context("the switch namespace is gone")
    }

    /// The switch's port facing `node`'s WAN NIC: every frame the node sends
    /// to the internet arrives there.
    pub fn wan_port(&self, node: &str) -> Result<String> {
        self.cluster_node(node)?;
        Ok(format!("{node}-wan"))
    }

    pub fn spec(&self, node: &str) -> Result<&NodeSpec> {
        Ok(&self.cluster_node(node)?.spec)
    }

    /// The cluster's manifest file (agents read it; the connector writes it).
    /// Node `node`'s agent state directory (keys, generations).
    pub fn state_dir(&self, node: &str) -> Result<&Path> {
        Ok(&self.cluster_node(node)?.files.state_dir)
    }

    pub fn manifests(&self) -> &Path {
        &self.manifests
    }

    pub(super) fn connector_names(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.spec.role == NodeRole::Connector)
            .map(|n| n.spec.name.clone())
            .collect()
    }
}

/// Removes bpffs roots and work directories of clusters whose process is gone.
/// Their namespaces, with the agents inside, were removed by
/// `netns::cleanup_stale`, so nothing uses the pins any more.
fn remove_stale_leftovers() {
    if let Ok(entries) = fs::read_dir(cgroup2_root()) {
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let owner = name
                .strip_prefix(LEFTOVER_PREFIX)
                .and_then(|rest| rest.split('-').next());
            if let Some(Ok(pid)) = owner.map(str::parse::<u32>)
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir(&path);
            }
        }
    }
    for dir in [Path::new(BPFFS).to_path_buf(), std::env::temp_dir()] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.filter_map(|entry| entry.ok().map(|e| e.path())) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let owner = name
                .strip_prefix(LEFTOVER_PREFIX)
                .and_then(|rest| rest.split('-').next());
            let Some(Ok(pid)) = owner.map(str::parse::<u32>) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Err(e) = fs::remove_dir_all(&path) {
                eprintln!(
                    "warning: removing {} left by an earlier run: {e}",
                    path.display()
                );
            }
        }
    }
}
