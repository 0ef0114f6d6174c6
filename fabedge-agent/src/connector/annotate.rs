//! The leading connector's cluster work in kube mode: the Flannel lease of
//! the active connector on every edge Node (taken off Nodes that stop being
//! edge), and `fabedge.io/pod-cidr` for edge Nodes without `spec.podCIDR`
//! (see `ipam`). Both go out as one JSON merge patch per Node that touches
//! only those annotation keys.
//!
//! [`API_CALLS`] lists every Kubernetes call the agent makes and which of
//! the two [`Account`]s makes it; the deploy test checks that the RBAC in
//! `deploy/` grants each ServiceAccount exactly its calls, and the kube
//! tests check that everything the API server saw is among them.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::api::{coordination::v1::Lease, core::v1 as core};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use log::{error, info, warn};
use tokio::sync::watch;

use super::{
    ipam::{self, Allocation, Pool},
    leader::{self, ElectionConfig},
};
use crate::{
    model::annotation,
    plan::{AnnotationPatch, flannel_annotation_patches},
    source::Objects,
};

/// One RBAC rule's worth of API use: API group, resource, verbs, where the
/// objects are, and which accounts make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiCall {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub scope: CallScope,
    pub accounts: &'static [Account],
}

/// The agents' identities in `deploy/`: one ServiceAccount per role, so a
/// rooted edge node holds no connector rights. What either may write on
/// Nodes is narrowed further by `deploy/node-policy.yaml` (its own Node's
/// `fabedge.io/` annotations; a connector also the Flannel lease and pod
/// CIDR of edge Nodes; no labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Account {
    /// The `fabedge-agent` DaemonSet: every node that is not a connector.
    Agent,
    /// The `fabedge-connector` DaemonSet: the Lease, and the leader's
    /// writes on edge Nodes.
    Connector,
}

impl Account {
    pub const ALL: [Account; 2] = [Account::Agent, Account::Connector];

    /// Its ServiceAccount's name (in the agent's namespace).
    pub fn service_account(self) -> &'static str {
        match self {
            Account::Agent => "fabedge-agent",
            Account::Connector => "fabedge-connector",
        }
    }

    /// The calls an agent on this account makes.
    pub fn calls(self) -> impl Iterator<Item = &'static ApiCall> {
        API_CALLS.iter().filter(move |c| c.accounts.contains(&self))
    }
}

const EVERY_AGENT: &[Account] = &Account::ALL;
const CONNECTORS: &[Account] = &[Account::Connector];

/// Where an [`ApiCall`]'s objects are (what kind of RBAC role grants it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallScope {
    /// Cluster-scoped objects, or namespaced ones in every namespace.
    Cluster,
    /// The agent's namespace (`--namespace`): the connector Lease.
    AgentNamespace,
    /// One fixed namespace.
    Namespace(&'static str),
}

/// Where the agent records Events. They are about Nodes, and the API server
/// accepts Events about cluster-scoped objects only in `default` (as the
/// kubelet's Node events), not in the agent's namespace.
pub const EVENT_NAMESPACE: &str = "default";

/// Every call the agent makes: the watchers (`source::kube`) and the patch
/// of its own Node's annotations on every agent; the election (`leader`),
/// this module's patches of edge Nodes and its Events on connectors.
pub const API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch", "patch"],
        scope: CallScope::Cluster,
        accounts: EVERY_AGENT,
    },
    ApiCall {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
        scope: CallScope::Cluster,
        accounts: EVERY_AGENT,
    },
    ApiCall {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
        scope: CallScope::Cluster,
        accounts: EVERY_AGENT,
    },
    ApiCall {
        group: "fabedge.io",
        resource: "communities",
        verbs: &["list", "watch"],
        scope: CallScope::Cluster,
        accounts: EVERY_AGENT,
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        scope: CallScope::AgentNamespace,
        accounts: CONNECTORS,
    },
    ApiCall {
        group: "",
        resource: "events",
        verbs: &["create"],
        scope: CallScope::Namespace(EVENT_NAMESPACE),
        accounts: CONNECTORS,
    },
];

/// What the leader wants written, computed purely from the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub patches: Vec<AnnotationPatch>,
    pub allocation: Allocation,
}

/// `own_flannel_mac`: this connector's flannel.1 MAC, used when it is the
/// active connector and Flannel has not yet written its own lease.
pub fn desired(
    objects: &Objects,
    me: &str,
    own_flannel_mac: Option<[u8; 6]>,
    pool: Option<&Pool>,
) -> Desired {
    let mut by_node: BTreeMap<String, AnnotationPatch> = BTreeMap::new();
    match objects.snapshot() {
        Ok(snapshot) => {
            // Each edge's first connector is the VTEP cloud nodes must send
            // its traffic to (the same patches every connector's plan computes).
            let connectors = crate::plan::Connectors::of(&snapshot);
            for patch in flannel_annotation_patches(&snapshot, &connectors, me, own_flannel_mac) {
                by_node.insert(patch.node.clone(), patch);
            }
            for connector in &connectors.nodes {
                if connector.flannel.is_none()
                    && !(connector.name == me && own_flannel_mac.is_some())
                {
                    warn!(
                        "connector {} has no Flannel lease yet; its edge Nodes get their annotations once it does",
                        connector.name
                    );
                }
            }
        }
        Err(e) => warn!("not writing Flannel annotations: {e}"),
    }
    let allocation = pool
        .map(|pool| ipam::allocate(&objects.nodes, pool))
        .unwrap_or_default();
    for (node, cidr) in &allocation.assigned {
        by_node
            .entry(node.clone())
            .or_insert_with(|| AnnotationPatch {
                node: node.clone(),
                set: BTreeMap::new(),
                remove: Vec::new(),
            })
            .set
            .insert(annotation::POD_CIDR.to_owned(), cidr.to_string());
    }
    Desired {
        patches: by_node.into_values().collect(),
        allocation,
    }
}

/// The merge patch for one Node: set keys, `null` removes. A CIDR from the
/// pool (given only to Nodes without `spec.podCIDR`) also becomes the Node's
/// `spec.podCIDR`: that is what Flannel on cloud nodes routes by, and the
/// API server accepts it once, on a Node that has none.
pub fn merge_patch(patch: &AnnotationPatch) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    for (key, value) in &patch.set {
        annotations.insert(key.clone(), serde_json::Value::String(value.clone()));
    }
    for key in &patch.remove {
        annotations.insert(key.clone(), serde_json::Value::Null);
    }
    match patch.set.get(annotation::POD_CIDR) {
        Some(cidr) => serde_json::json!({
            "metadata": { "annotations": annotations },
            "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        }),
        None => serde_json::json!({ "metadata": { "annotations": annotations } }),
    }
}

/// Writes what the leader decided; remembers what it reported so that an
/// exhausted pool is logged and recorded as an Event once, not every pass.
pub struct ClusterWork {
    nodes: Api<core::Node>,
    events: Api<core::Event>,
    me: String,
    pool: Option<Pool>,
    reported: BTreeSet<String>,
    /// Patches sent, by node, with the node's resourceVersion when sent.
    /// While the watch cache still shows that version it has not seen our
    /// write yet: the patch is treated as applied, so it is not sent twice
    /// and — above all — IPAM counts its CIDR as taken (a lagging cache
    /// must never make the allocator give the node a different block).
    in_flight: BTreeMap<String, (Option<String>, AnnotationPatch)>,
}

/// Adds `patch` (sent when the node had `version`) to what is in flight.
fn remember(
    in_flight: &mut BTreeMap<String, (Option<String>, AnnotationPatch)>,
    version: Option<String>,
    patch: &AnnotationPatch,
) {
    let entry = in_flight.entry(patch.node.clone()).or_insert_with(|| {
        (
            version,
            AnnotationPatch {
                node: patch.node.clone(),
                set: BTreeMap::new(),
                remove: Vec::new(),
            },
        )
    });
    for (key, value) in &patch.set {
        entry.1.remove.retain(|k| k != key);
        entry.1.set.insert(key.clone(), value.clone());
    }
    for key in &patch.remove {
        entry.1.set.remove(key);
        if !entry.1.remove.contains(key) {
            entry.1.remove.push(key.clone());
        }
    }
}

/// `objects` as the API server holds them once the in-flight patches land.
/// Entries whose node changed since (the cache caught up, or someone else
/// wrote) are dropped: the next pass decides from what is really there.
fn with_in_flight(
    objects: &Objects,
    in_flight: &mut BTreeMap<String, (Option<String>, AnnotationPatch)>,
) -> Objects {
    let mut overlaid = objects.clone();
    let mut still = BTreeMap::new();
    for node in &mut overlaid.nodes {
        let Some(name) = node.metadata.name.clone() else {
            continue;
        };
        let Some((version, patch)) = in_flight.remove(&name) else {
            continue;
        };
        if node.metadata.resource_version != version {
            continue;
        }
        let annotations = node.metadata.annotations.get_or_insert_with(BTreeMap::new);
        annotations.extend(patch.set.clone());
        for key in &patch.remove {
            annotations.remove(key);
        }
        still.insert(name, (version, patch));
    }
    *in_flight = still;
    overlaid
}

impl ClusterWork {
    pub fn new(client: Client, me: &str, pool: Option<Pool>) -> ClusterWork {
        ClusterWork {
            nodes: Api::all(client.clone()),
            events: Api::namespaced(client, EVENT_NAMESPACE),
            me: me.to_owned(),
            pool,
            reported: BTreeSet::new(),
            in_flight: BTreeMap::new(),
        }
    }

    /// One pass: patch every Node that differs from what it should carry.
    pub async fn run_once(
        &mut self,
        objects: &Objects,
        own_flannel_mac: Option<[u8; 6]>,
    ) -> Result<Desired> {
        let objects = with_in_flight(objects, &mut self.in_flight);
        let desired = desired(&objects, &self.me, own_flannel_mac, self.pool.as_ref());
        for problem in &desired.allocation.problems {
            if self.reported.insert(problem.clone()) {
                warn!("{problem}; allocating it a new pod CIDR");
            }
        }
        for node in &desired.allocation.exhausted {
            let pool = self.pool.as_ref().map(ipam::describe).unwrap_or_default();
            let message = format!(
                "edge pod CIDR pool {pool} is exhausted: node {node} gets no pod CIDR; \
                 enlarge --edge-pod-cidr-pool or set spec.podCIDR on the node"
            );
            if self.reported.insert(message.clone()) {
                error!("{message}");
                if let Err(e) = self.event(node, &message).await {
                    warn!("recording the event for node {node}: {e:#}");
                }
            }
        }
        for patch in &desired.patches {
            self.nodes
                .patch(
                    &patch.node,
                    &PatchParams::default(),
                    &Patch::Merge(merge_patch(patch)),
                )
                .await
                .with_context(|| format!("patching the annotations of node {}", patch.node))?;
            let version = objects
                .nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(patch.node.as_str()))
                .and_then(|n| n.metadata.resource_version.clone());
            remember(&mut self.in_flight, version, patch);
            info!(
                "node {}: set {:?}, removed {:?}",
                patch.node, patch.set, patch.remove
            );
        }
        Ok(desired)
    }

    async fn event(&self, node: &str, message: &str) -> Result<()> {
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let event = core::Event {
            metadata: kube::api::ObjectMeta {
                generate_name: Some("fabedge-pod-cidr-".into()),
                ..Default::default()
            },
            involved_object: core::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.to_owned()),
                ..Default::default()
            },
            reason: Some("PodCIDRPoolExhausted".into()),
            message: Some(message.to_owned()),
            type_: Some("Warning".into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            source: Some(core::EventSource {
                component: Some("fabedge-agent".into()),
                host: Some(self.me.clone()),
            }),
            ..Default::default()
        };
        self.events.create(&PostParams::default(), &event).await?;
        Ok(())
    }
}

/// A connector's share of the cluster work: it runs for the Lease from the
/// moment its Node is seen to be a connector, and does [`ClusterWork`] while
/// it leads. The agent's kube mode drives it after every reconcile; the
/// tests drive it the same way without a datapath. Dropping it stops the election.
pub struct ConnectorDuty {
    client: Client,
    election_config: ElectionConfig,
    election: Option<tokio::task::JoinHandle<()>>,
    leading_tx: Option<watch::Sender<bool>>,
    leading: watch::Receiver<bool>,
    work: ClusterWork,
}

impl Drop for ConnectorDuty {
    fn drop(&mut self) {
        if let Some(election) = &self.election {
            election.abort();
        }
    }
}

impl ConnectorDuty {
    pub fn new(
        client: Client,
        election_config: ElectionConfig,
        pool: Option<Pool>,
    ) -> ConnectorDuty {
        let (leading_tx, leading) = watch::channel(false);
        let work = ClusterWork::new(client.clone(), &election_config.identity, pool);
        ConnectorDuty {
            client,
            election_config,
            election: None,
            leading_tx: Some(leading_tx),
            leading,
            work,
        }
    }

    /// Resolves when leadership was gained or lost.
    pub async fn leading_changed(&mut self) {
        if self.leading.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Stops campaigning and, if we lead, releases the Lease (bounded by a
    /// few seconds: shutdown must not hang on an unreachable API server).
    pub async fn release(&mut self) {
        let Some(election) = self.election.take() else {
            return;
        };
        election.abort();
        let _ = election.await;
        if !self.is_leading() {
            return;
        }
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.election_config.namespace);
        match tokio::time::timeout(
            Duration::from_secs(3),
            leader::release(&api, &self.election_config),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("releasing the connector lease: {e}"),
            Err(_) => warn!("releasing the connector lease: the API server did not answer"),
        }
    }

    /// Called with every new view of the cluster (and periodically);
    /// `objects` is asked for only while leading.
    pub async fn step(
        &mut self,
        objects: impl FnOnce() -> Option<Objects>,
        is_connector: bool,
        own_flannel_mac: Option<[u8; 6]>,
    ) {
        if is_connector && self.election.is_none() {
            let api: Api<Lease> =
                Api::namespaced(self.client.clone(), &self.election_config.namespace);
            let tx = self.leading_tx.take().expect("started once");
            self.election = Some(tokio::spawn(leader::run(
                api,
                self.election_config.clone(),
                tx,
            )));
        }
        if self.is_leading()
            && let Some(objects) = objects()
            && let Err(e) = self.work.run_once(&objects, own_flannel_mac).await
        {
            error!("{e:#} (retrying)");
        }
    }
}

/// Whether `node` is labelled a connector in `nodes`.
pub fn is_connector<'n>(nodes: impl IntoIterator<Item = &'n core::Node>, node: &str) -> bool {
    has_label(nodes, node, crate::model::label::CONNECTOR)
}

fn has_label<'n>(nodes: impl IntoIterator<Item = &'n core::Node>, node: &str, label: &str) -> bool {
    nodes.into_iter().any(|n| {
        n.metadata.name.as_deref() == Some(node)
            && n.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(label))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest;

    fn fixture() -> Objects {
        fixture_with("")
    }

    /// The mini cluster and `more` YAML documents.
    fn fixture_with(more: &str) -> Objects {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/mini-cluster.yaml"
        ))
        .expect("fixture");
        manifest::parse(&format!("{text}\n{more}")).expect("fixture parses")
    }

    #[test]
    fn merge_patch_sets_and_removes_only_the_named_keys_and_a_pool_cidr_becomes_spec_pod_cidr() {
        let patch = AnnotationPatch {
            node: "edge-1".into(),
            set: BTreeMap::from([(annotation::POD_CIDR.to_owned(), "10.234.9.0/24".to_owned())]),
            remove: vec![annotation::FLANNEL_PUBLIC_IP.to_owned()],
        };
        assert_eq!(
            merge_patch(&patch),
            serde_json::json!({
                "metadata": {"annotations": {
                    "fabedge.io/pod-cidr": "10.234.9.0/24",
                    "flannel.alpha.coreos.com/public-ip": null,
                }},
                // Flannel on cloud nodes routes by spec.podCIDR.
                "spec": {"podCIDR": "10.234.9.0/24", "podCIDRs": ["10.234.9.0/24"]},
            })
        );
        let flannel_only = AnnotationPatch {
            node: "edge-1".into(),
            set: BTreeMap::new(),
            remove: vec![annotation::FLANNEL_PUBLIC_IP.to_owned()],
        };
        assert_eq!(
            merge_patch(&flannel_only),
            serde_json::json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": null}}})
        );
    }

    #[test]
    fn only_the_connector_account_holds_the_lease_and_event_calls() {
        let resources =
            |account: Account| -> BTreeSet<&str> { account.calls().map(|c| c.resource).collect() };
        assert_eq!(
            resources(Account::Agent),
            BTreeSet::from(["nodes", "services", "endpointslices", "communities"])
        );
        assert_eq!(
            resources(Account::Connector),
            API_CALLS.iter().map(|c| c.resource).collect()
        );
        assert!(API_CALLS.iter().all(|c| !c.accounts.is_empty()));
        assert_ne!(
            Account::Agent.service_account(),
            Account::Connector.service_account()
        );
    }

    /// What `deploy/node-policy.yaml` lets a connector write on another
    /// Node is all the leader ever writes: the Flannel lease and the pod
    /// CIDR of edge Nodes, and the removal of its lease from a Node that
    /// is no longer one.
    #[test]
    fn the_leaders_patches_touch_only_the_flannel_lease_and_pod_cidr_of_edge_nodes() {
        // An edge Node without spec.podCIDR (the leader allocates it one),
        // and a former edge Node still carrying the connector's lease.
        let objects = fixture_with(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: edge-new\n  labels:\n    \
             node-role.kubernetes.io/edge: \"\"\nstatus:\n  addresses:\n    \
             - {type: InternalIP, address: 10.2.0.99}\n\
             ---\napiVersion: v1\nkind: Node\nmetadata:\n  name: was-edge\n  annotations:\n    \
             flannel.alpha.coreos.com/backend-data: '{\"VtepMAC\":\"ce:0c:01:00:00:01\"}'\n    \
             flannel.alpha.coreos.com/backend-type: vxlan\n    \
             flannel.alpha.coreos.com/kube-subnet-manager: \"true\"\n    \
             flannel.alpha.coreos.com/public-ip: 10.1.0.1\n\
             spec:\n  podCIDR: 10.244.9.0/24\nstatus:\n  addresses:\n    \
             - {type: InternalIP, address: 10.1.0.9}\n",
        );
        let pool = Pool::new("10.250.0.0/16".parse().unwrap(), 24).unwrap();
        let desired = desired(&objects, "cloud-1", None, Some(&pool));
        let of = |node: &str| desired.patches.iter().find(|p| p.node == node);
        let new = of("edge-new").expect("a patch for edge-new");
        assert!(
            new.set.contains_key(annotation::POD_CIDR)
                && new.set.contains_key(annotation::FLANNEL_PUBLIC_IP),
            "{new:?}"
        );
        let was = of("was-edge").expect("a patch for was-edge");
        assert_eq!(was.remove.len(), annotation::FLANNEL_LEASE.len(), "{was:?}");
        for patch in &desired.patches {
            let keys: Vec<&String> = patch.set.keys().chain(&patch.remove).collect();
            if has_label(&objects.nodes, &patch.node, crate::model::label::EDGE) {
                assert!(
                    keys.iter()
                        .all(|key| annotation::FLANNEL_LEASE.contains(&key.as_str())
                            || *key == annotation::POD_CIDR),
                    "{patch:?}"
                );
            } else {
                assert!(
                    patch.set.is_empty()
                        && keys
                            .iter()
                            .all(|key| annotation::FLANNEL_LEASE.contains(&key.as_str())),
                    "only removals of the Flannel lease off a non-edge Node: {patch:?}"
                );
            }
        }
    }

    #[test]
    fn any_leader_writes_the_active_connectors_lease_onto_every_edge_node() {
        let objects = fixture();
        // Computed by a connector that is not the active one: same result,
        // from the active connector's own Flannel lease.
        let desired = desired(&objects, "someone-else", None, None);
        let edges: Vec<_> = desired.patches.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(edges, ["edge-1", "edge-2", "edge-3"]);
        for patch in &desired.patches {
            assert_eq!(
                patch
                    .set
                    .get(annotation::FLANNEL_PUBLIC_IP)
                    .map(String::as_str),
                Some("10.1.0.1")
            );
            assert_eq!(
                patch
                    .set
                    .get(annotation::FLANNEL_BACKEND_DATA)
                    .map(String::as_str),
                Some(r#"{"VtepMAC":"ce:0c:01:00:00:01"}"#)
            );
        }
    }

    #[test]
    fn a_lagging_cache_never_moves_an_allocated_cidr() {
        let pool = Pool::new("10.234.0.0/16".parse().unwrap(), 24).unwrap();
        let edge = |name: &str, rv: &str, cidr: Option<&str>| core::Node {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                labels: Some(BTreeMap::from([(
                    crate::model::label::EDGE.to_owned(),
                    String::new(),
                )])),
                annotations: cidr
                    .map(|c| BTreeMap::from([(annotation::POD_CIDR.to_owned(), c.to_owned())])),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut in_flight = BTreeMap::new();
        // z holds the first block; x is new and gets the second.
        let first = Objects {
            nodes: vec![edge("x", "5", None), edge("z", "3", Some("10.234.0.0/24"))],
            ..Default::default()
        };
        let patches = desired(
            &with_in_flight(&first, &mut in_flight),
            "c",
            None,
            Some(&pool),
        )
        .patches;
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0].set[annotation::POD_CIDR], "10.234.1.0/24");
        remember(&mut in_flight, Some("5".into()), &patches[0]);

        // z is deleted and the cache saw that, but not yet x's annotation:
        // without the in-flight patch x would now get z's freed block.
        let lagging = Objects {
            nodes: vec![edge("x", "5", None)],
            ..Default::default()
        };
        let again = desired(
            &with_in_flight(&lagging, &mut in_flight),
            "c",
            None,
            Some(&pool),
        );
        assert_eq!(again.patches, [], "nothing re-sent, nothing moved");

        // Once the cache shows x's new version the entry is gone.
        let caught_up = Objects {
            nodes: vec![edge("x", "6", Some("10.234.1.0/24"))],
            ..Default::default()
        };
        assert!(
            desired(
                &with_in_flight(&caught_up, &mut in_flight),
                "c",
                None,
                Some(&pool)
            )
            .patches
            .is_empty()
        );
        assert!(in_flight.is_empty());
    }
}
