//! What an edge's Node watches carry when Nodes outside its community
//! change: the watches the agent opens (`fabedge_agent::source::kube::NodeView`)
//! held as raw HTTP streams against the real API server
//! ([`crate::apiserver`]), their events and bytes counted.
//!
//! Counting ends at a fence, not a timer: after the changes, one Node each
//! watch selects gets annotation [`FENCE`]; a watch delivers events in
//! resourceVersion order, so when its fence arrives every earlier change it
//! was going to send has arrived. The fence itself is not counted.
//!
//! `cargo xtask bench --only edge-watch` runs [`run`]: a simulated cluster
//! of [`BENCH_NODES`] Nodes, before (every Node watched, as all agents did)
//! and after (the edge's own Node, the connectors, its community peers).

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fabedge_agent::{
    model::label,
    source::kube::{NodeView, NodeWatch},
};
use futures::AsyncBufReadExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::report::Report;
use crate::apiserver::{ApiServer, create_all};

/// The annotation whose value marks a fence (see the module docs).
pub const FENCE: &str = "fabedge.test/fence";
/// Nodes of the benchmark's simulated cluster.
pub const BENCH_NODES: usize = 5_000;
/// Node changes outside the edge's community the benchmark counts.
pub const BENCH_CHANGES: usize = 200;
/// Concurrent requests while creating objects.
pub const CREATE_CONCURRENCY: usize = 48;
/// How long a fence may take to come through.
const FENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// A simulated cluster: `connectors` connectors, `edges` edge nodes, the
/// first `community` of which form community `site-0`.
pub struct SimulatedCluster {
    pub connectors: Vec<String>,
    pub edges: Vec<String>,
    pub community: Vec<String>,
}

impl SimulatedCluster {
    pub fn new(connectors: usize, edges: usize, community: usize) -> Self {
        let edges: Vec<String> = (0..edges).map(|i| format!("edge-{i}")).collect();
        SimulatedCluster {
            connectors: (0..connectors).map(|i| format!("connector-{i}")).collect(),
            community: edges[..community].to_vec(),
            edges,
        }
    }

    /// The edge whose watches are measured: a member of the community.
    pub fn me(&self) -> &str {
        &self.community[0]
    }

    /// Every Node as a kubelet would register it (addresses, conditions,
    /// capacity, node info, a few images: about the size of a real Node).
    pub fn nodes(&self) -> Vec<Value> {
        let connectors = self.connectors.iter().enumerate().map(|(i, name)| {
            node(
                name,
                label::CONNECTOR,
                [10, 1, 0, i as u8 + 1],
                format!("10.244.{i}.0/24"),
            )
        });
        let edges = self.edges.iter().enumerate().map(|(i, name)| {
            let [hi, lo] = (i as u16).to_be_bytes();
            node(
                name,
                label::EDGE,
                [10, 2, hi, lo],
                format!("10.{}.{}.0/24", 128 + hi, lo),
            )
        });
        connectors.chain(edges).collect()
    }

    /// The Community object of `site-0`.
    pub fn community_object(&self) -> Value {
        json!({
            "apiVersion": "fabedge.io/v1alpha1",
            "kind": "Community",
            "metadata": {"name": "site-0"},
            "spec": {"members": self.community},
        })
    }

    /// Nodes that, annotated together, reach every watch of the measured
    /// edge and of every-Node: the community and a connector.
    pub fn fence_nodes(&self) -> Vec<&str> {
        let mut fences: Vec<&str> = self.community.iter().map(String::as_str).collect();
        fences.push(&self.connectors[0]);
        fences
    }

    /// Edge nodes outside the community.
    pub fn outsiders(&self) -> impl Iterator<Item = &String> {
        self.edges.iter().filter(|e| !self.community.contains(e))
    }
}

fn node(name: &str, role: &str, ip: [u8; 4], pod_cidr: String) -> Value {
    let [a, b, c, d] = ip;
    let condition = |kind: &str, status: &str, reason: &str| {
        json!({
            "type": kind, "status": status, "reason": reason,
            "message": format!("kubelet reports {reason}"),
            "lastHeartbeatTime": "2026-01-01T00:00:00Z",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        })
    };
    let images: Vec<Value> = (0..6)
        .map(|i| {
            json!({
                "names": [
                    format!("registry.example.com/site/app-{i}@sha256:{:064x}", i + 1),
                    format!("registry.example.com/site/app-{i}:v1.{i}.0"),
                ],
                "sizeBytes": 10_000_000 + i * 1_000_000,
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                role: "",
            },
        },
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": format!("{a}.{b}.{c}.{d}")},
                {"type": "ExternalIP", "address": format!("198.{}.{c}.{d}", 18 + b)},
                {"type": "Hostname", "address": name},
            ],
            "capacity": {"cpu": "4", "memory": "8049936Ki", "pods": "110", "ephemeral-storage": "61202244Ki"},
            "allocatable": {"cpu": "4", "memory": "7947536Ki", "pods": "110", "ephemeral-storage": "56403987978"},
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                condition("Ready", "True", "KubeletReady"),
            ],
            "nodeInfo": {
                "machineID": format!("{:032x}", u32::from_be_bytes(ip)),
                "systemUUID": format!("{:08x}-0000-0000-0000-000000000000", u32::from_be_bytes(ip)),
                "bootID": format!("{:08x}-1111-1111-1111-111111111111", u32::from_be_bytes(ip)),
                "kernelVersion": "6.12.0-amd64",
                "osImage": "Debian GNU/Linux 13 (trixie)",
                "containerRuntimeVersion": "containerd://2.1.0",
                "kubeletVersion": "v1.37.2",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": images,
        },
    })
}

/// Creates `nodes` with many requests in flight.
pub async fn create_nodes(client: &Client, nodes: Vec<Value>) -> Result<()> {
    let nodes = nodes
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<Vec<Node>, _>>()?;
    create_all(&Api::all(client.clone()), nodes, CREATE_CONCURRENCY).await
}

/// Sets annotation `key` to `value` on Node `name` (as the client's user).
pub async fn annotate(client: &Client, name: &str, key: &str, value: &str) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let patch = json!({"metadata": {"annotations": {key: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("annotating Node {name}"))?;
    Ok(())
}

/// What a set of watches carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub events: u64,
    pub bytes: u64,
}

/// The Node watches an edge opens once it knows its own Node and the
/// Communities: exactly what the agent's source computes.
pub fn edge_watches(cluster: &SimulatedCluster) -> Result<BTreeSet<NodeWatch>> {
    let view = NodeView::OwnCommunity {
        me: cluster.me().to_owned(),
        role_override: None,
    };
    let me = cluster
        .nodes()
        .into_iter()
        .find(|n| n["metadata"]["name"] == cluster.me())
        .context("the edge is a Node of the cluster")?;
    let own: Node = serde_json::from_value(me)?;
    let community = serde_json::from_value(cluster.community_object())?;
    Ok(view.watches(Some(&own), [&community]))
}

/// One watch stream, counting what arrives before its fence.
struct Counted {
    traffic: Arc<(AtomicU64, AtomicU64)>,
    fenced: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens `watch` from the current resourceVersion (no initial events) as
/// `client`, raw: every line of the response is one event.
async fn open(client: &Client, watch: &NodeWatch, fence: &str) -> Result<Counted> {
    let (labels, fields) = watch.selectors();
    let mut list = ListParams::default().limit(1);
    if let Some(labels) = &labels {
        list = list.labels(labels);
    }
    if let Some(fields) = &fields {
        list = list.fields(fields);
    }
    let api: Api<Node> = Api::all(client.clone());
    let version = api
        .list_metadata(&list)
        .await?
        .metadata
        .resource_version
        .context("a list without resourceVersion")?;
    let query = nodes_path(watch, &format!("watch=true&resourceVersion={version}"));
    let request = http::Request::get(query).body(Vec::new())?;
    let stream = client.request_stream(request).await?;
    let traffic = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let (fenced_tx, fenced) = watch::channel(false);
    let counts = traffic.clone();
    let fence = fence.to_owned();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match stream.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.windows(fence.len()).any(|w| w == fence.as_bytes()) {
                let _ = fenced_tx.send(true);
                return;
            }
            counts.0.fetch_add(1, Ordering::Relaxed);
            counts.1.fetch_add(line.len() as u64, Ordering::Relaxed);
        }
    });
    Ok(Counted {
        traffic,
        fenced,
        task,
    })
}

/// The path that lists (or, with `query`, watches) `watch`'s Nodes.
fn nodes_path(watch: &NodeWatch, query: &str) -> String {
    let (labels, fields) = watch.selectors();
    let mut path = format!("/api/v1/nodes?{query}");
    for (name, value) in [("labelSelector", labels), ("fieldSelector", fields)] {
        if let Some(value) = value {
            path.push_str(&format!("&{name}={}", encode(&value)));
        }
    }
    path
}

/// Bytes one list of each of `watches` downloads: what an edge fetches when
/// it starts and again on every relist (an expired resourceVersion, a
/// reconnect after the API server was away).
pub async fn list_bytes(client: &Client, watches: &BTreeSet<NodeWatch>) -> Result<u64> {
    let mut bytes = 0;
    for watch in watches {
        let request = http::Request::get(nodes_path(watch, "")).body(Vec::new())?;
        bytes += client.request_text(request).await?.len() as u64;
    }
    Ok(bytes)
}

/// Selector values as a query string carries them.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Opens `watches`, runs `changes`, then fences every watch by annotating
/// each of `fence_nodes` (together they must be selected by every watch)
/// and returns what the watches carried before their fences.
pub async fn watch_traffic<F>(
    client: &Client,
    watches: &BTreeSet<NodeWatch>,
    fence_nodes: &[&str],
    changes: F,
) -> Result<Traffic>
where
    F: std::future::Future<Output = Result<()>>,
{
    static FENCES: AtomicU64 = AtomicU64::new(0);
    let fence = format!(
        "fence-{}-{}",
        std::process::id(),
        FENCES.fetch_add(1, Ordering::Relaxed)
    );
    let mut counted = Vec::new();
    for watch in watches {
        counted.push(open(client, watch, &fence).await?);
    }
    changes.await?;
    for node in fence_nodes {
        annotate(client, node, FENCE, &fence).await?;
    }
    let deadline = Instant::now() + FENCE_TIMEOUT;
    for (watch, counted) in watches.iter().zip(&mut counted) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, counted.fenced.wait_for(|f| *f)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => bail!("watch {watch:?} ended before its fence came through"),
            Err(_) => bail!(
                "watch {watch:?}: no fence within {FENCE_TIMEOUT:?} (is one of {fence_nodes:?} selected by it?)"
            ),
        }
    }
    Ok(counted.iter().fold(Traffic::default(), |sum, c| Traffic {
        events: sum.events + c.traffic.0.load(Ordering::Relaxed),
        bytes: sum.bytes + c.traffic.1.load(Ordering::Relaxed),
    }))
}

/// Annotates `nodes` one after the other, `rounds` changes in all.
pub async fn change_nodes(client: &Client, nodes: &[&str], rounds: usize) -> Result<()> {
    for i in 0..rounds {
        annotate(
            client,
            nodes[i % nodes.len()],
            "fabedge.test/changed",
            &i.to_string(),
        )
        .await?;
    }
    Ok(())
}

/// What one set of watches costs the edge.
#[derive(Debug, Clone, Copy)]
pub struct WatchCost {
    pub events_per_change: f64,
    pub bytes_per_change: f64,
    /// One list of every watch of the set.
    pub list_bytes: u64,
}

/// Before (every Node watched) and after (the edge's view).
pub struct Figures {
    pub before: WatchCost,
    pub after: WatchCost,
}

/// Counts the traffic of `changes` Node changes outside the community of
/// `cluster`'s measured edge, with every Node watched and with the edge's
/// view. The cluster must exist on the server.
pub async fn measure(
    client: &Client,
    cluster: &SimulatedCluster,
    changes: usize,
) -> Result<Figures> {
    let outsiders: Vec<&str> = cluster.outsiders().map(String::as_str).collect();
    let fences = cluster.fence_nodes();
    let cost = async |watches: &BTreeSet<NodeWatch>| -> Result<WatchCost> {
        let traffic = watch_traffic(
            client,
            watches,
            &fences,
            change_nodes(client, &outsiders, changes),
        )
        .await?;
        Ok(WatchCost {
            events_per_change: traffic.events as f64 / changes as f64,
            bytes_per_change: traffic.bytes as f64 / changes as f64,
            list_bytes: list_bytes(client, watches).await?,
        })
    };
    Ok(Figures {
        before: cost(&BTreeSet::from([NodeWatch::All])).await?,
        after: cost(&edge_watches(cluster)?).await?,
    })
}

/// The section's figures, each `.before` and `.after`.
const KEYS: [&str; 3] = [
    "scale.edge_watch_events_per_node_change",
    "scale.edge_watch_bytes_per_node_change",
    "scale.edge_watch_list_bytes",
];

/// The `edge-watch` section of `cargo xtask bench`.
pub fn run(report: &mut Report) -> Result<()> {
    let server = match ApiServer::start() {
        Ok(server) => server,
        Err(e) => {
            println!("edge watch traffic: skipped ({e:#})");
            for key in KEYS {
                report.unavailable(format!("{key}.before"));
                report.unavailable(format!("{key}.after"));
            }
            return Ok(());
        }
    };
    let cluster = SimulatedCluster::new(2, BENCH_NODES - 2, 8);
    let client = server.client();
    let started = Instant::now();
    server.block_on(create_nodes(&client, cluster.nodes()))?;
    println!(
        "\nedge watch traffic: {} Nodes created in {:.1} s; {BENCH_CHANGES} changes to Nodes outside {}'s community",
        BENCH_NODES,
        started.elapsed().as_secs_f64(),
        cluster.me()
    );
    install_crd(&server)?;
    server.apply(&cluster.community_object())?;
    let figures = server.block_on(measure(&client, &cluster, BENCH_CHANGES))?;
    for (when, cost) in [("before", figures.before), ("after", figures.after)] {
        println!(
            "  {when:>6}: {:.2} events, {:.0} bytes per Node change; a relist downloads {} bytes",
            cost.events_per_change, cost.bytes_per_change, cost.list_bytes
        );
        report.record(format!("{}.{when}", KEYS[0]), cost.events_per_change);
        report.record(format!("{}.{when}", KEYS[1]), cost.bytes_per_change);
        report.record(format!("{}.{when}", KEYS[2]), cost.list_bytes as f64);
    }
    Ok(())
}

/// Installs `deploy/crd.yaml` (the Community CRD) and waits until it is served.
pub fn install_crd(server: &ApiServer) -> Result<()> {
    let crd = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml");
    for args in [
        &["apply", "-f", crd][..],
        &[
            "wait",
            "--for=condition=Established",
            "crd/communities.fabedge.io",
            "--timeout=60s",
        ],
    ] {
        let out = server.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}
