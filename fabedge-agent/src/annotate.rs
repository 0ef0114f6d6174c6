//! The leading connector's cluster work in kube mode: the Flannel lease of
//! the active connector on every edge Node (taken off Nodes that stop being
//! edge), and `fabedge.io/pod-cidr` for edge Nodes without `spec.podCIDR`
//! (see `ipam`). Both go out as one JSON merge patch per Node that touches
//! only those annotation keys.
//!
//! [`API_CALLS`] lists every Kubernetes call the agent makes; the deploy
//! test checks that the RBAC in `deploy/` grants exactly these, and the kube
//! test checks that everything the fake API server saw is among them.

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

use crate::{
    ipam::{self, Allocation, Pool},
    leader::{self, ElectionConfig},
    model::{Role, annotation},
    plan::{AnnotationPatch, flannel_annotation_patches},
    source::Objects,
};

/// One RBAC rule's worth of API use: API group, resource, verbs, and
/// whether it is namespaced (the Lease and Events live in the agent's namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiCall {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub namespaced: bool,
}

/// Every call the agent makes: the watchers (`source::kube`), the election
/// (`leader`), this module's patches and events.
pub const API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch", "patch"],
        namespaced: false,
    },
    ApiCall {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
        namespaced: false,
    },
    ApiCall {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
        namespaced: false,
    },
    ApiCall {
        group: "fabedge.io",
        resource: "communities",
        verbs: &["list", "watch"],
        namespaced: false,
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        namespaced: true,
    },
    ApiCall {
        group: "",
        resource: "events",
        verbs: &["create"],
        namespaced: true,
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
            // The active connector (lowest name, as `plan` picks it) is the
            // VTEP cloud nodes must send edge traffic to.
            if let Some(active) = snapshot.nodes_with_role(Role::Connector).next() {
                let mac = active
                    .flannel
                    .as_ref()
                    .map(|l| l.vtep_mac)
                    .or(if active.name == me {
                        own_flannel_mac
                    } else {
                        None
                    });
                let underlay = active
                    .flannel
                    .as_ref()
                    .map_or(active.internal_ip, |l| l.public_ip);
                match mac {
                    Some(mac) => {
                        for patch in flannel_annotation_patches(&snapshot, active, mac, underlay) {
                            by_node.insert(patch.node.clone(), patch);
                        }
                    }
                    None => warn!(
                        "connector {} has no Flannel lease yet; edge Nodes get their annotations once it does",
                        active.name
                    ),
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

/// The merge patch for one Node: set keys, `null` removes.
pub fn merge_patch(patch: &AnnotationPatch) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    for (key, value) in &patch.set {
        annotations.insert(key.clone(), serde_json::Value::String(value.clone()));
    }
    for key in &patch.remove {
        annotations.insert(key.clone(), serde_json::Value::Null);
    }
    serde_json::json!({ "metadata": { "annotations": annotations } })
}

/// Writes what the leader decided; remembers what it reported so that an
/// exhausted pool is logged and recorded as an Event once, not every pass.
pub struct ClusterWork {
    nodes: Api<core::Node>,
    events: Api<core::Event>,
    me: String,
    pool: Option<Pool>,
    reported: BTreeSet<String>,
}

impl ClusterWork {
    pub fn new(client: Client, namespace: &str, me: &str, pool: Option<Pool>) -> ClusterWork {
        ClusterWork {
            nodes: Api::all(client.clone()),
            events: Api::namespaced(client, namespace),
            me: me.to_owned(),
            pool,
            reported: BTreeSet::new(),
        }
    }

    /// One pass: patch every Node that differs from what it should carry.
    pub async fn run_once(
        &mut self,
        objects: &Objects,
        own_flannel_mac: Option<[u8; 6]>,
    ) -> Result<Desired> {
        let desired = desired(objects, &self.me, own_flannel_mac, self.pool.as_ref());
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
        let work = ClusterWork::new(
            client.clone(),
            &election_config.namespace,
            &election_config.identity,
            pool,
        );
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

    /// Called with every new view of the cluster (and periodically).
    pub async fn step(
        &mut self,
        objects: &Objects,
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
            && let Err(e) = self.work.run_once(objects, own_flannel_mac).await
        {
            error!("{e:#} (retrying)");
        }
    }
}

/// Whether `node` is labelled a connector in `objects`.
pub fn is_connector(objects: &Objects, node: &str) -> bool {
    objects.nodes.iter().any(|n| {
        n.metadata.name.as_deref() == Some(node)
            && n.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(crate::model::label::CONNECTOR))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest;

    fn fixture() -> Objects {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/mini-cluster.yaml"
        ))
        .expect("fixture");
        manifest::parse(&text).expect("fixture parses")
    }

    #[test]
    fn merge_patch_sets_and_removes_only_the_named_keys() {
        let patch = AnnotationPatch {
            node: "edge-1".into(),
            set: BTreeMap::from([(annotation::POD_CIDR.to_owned(), "10.234.9.0/24".to_owned())]),
            remove: vec![annotation::FLANNEL_PUBLIC_IP.to_owned()],
        };
        assert_eq!(
            merge_patch(&patch),
            serde_json::json!({"metadata": {"annotations": {
                "fabedge.io/pod-cidr": "10.234.9.0/24",
                "flannel.alpha.coreos.com/public-ip": null,
            }}})
        );
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
}
