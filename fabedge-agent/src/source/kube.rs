//! The Kubernetes source: kube-rs watchers (one per kind, Nodes possibly
//! several, see [`NodeView`]) keep a cache of the cluster, and
//! [`KubeSource::objects`] hands out the same [`Objects`] the manifest file
//! gives, so both sources feed the same model and plan.
//!
//! An edge that routes the cluster's prefixes through its connectors as a
//! whole (`--cluster-prefix`) needs no other Node than its own, the
//! connectors and its community peers: it watches just those, so a change
//! to any other Node costs it nothing however large the cluster grows.
//! Who is a peer comes from the Community objects (an administrator's), who
//! is a connector from the role label (which no agent may write,
//! `deploy/node-policy.yaml`): a node cannot make itself seen by setting
//! anything on its own Node.
//!
//! Watch errors, expired resource versions (410 Gone) and reconnects make
//! the watcher relist. A relist is staged: the cache keeps the old objects
//! until the new list is complete (`Init` … `InitDone`) and then swaps, so a
//! relist that finds the same objects changes nothing and the reconcile loop
//! (which skips identical `Objects`) touches no map. While the API server is
//! unreachable the cache simply keeps its last state.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use log::{info, warn};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinHandle};

use super::{CommunityObject, ObjectRefs, Objects};
use crate::model::{self, Role, ServiceInput, SliceInput, label};

/// How the agent reaches the API server.
#[derive(Debug, Clone)]
pub enum Connection {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted
    /// token and CA), or `$KUBECONFIG` / `~/.kube/config` outside a pod.
    Infer,
    /// A kubeconfig file (`--kubeconfig`).
    Kubeconfig(PathBuf),
}

/// A client for `connection`. Building it does not contact the server, so
/// an edge node that starts offline still gets one.
pub async fn client(connection: &Connection) -> Result<Client> {
    let config = match connection {
        Connection::Infer => kube::Config::infer()
            .await
            .context("finding the API server: not in a pod (no service account) and no kubeconfig; pass --kubeconfig FILE or --manifests FILE")?,
        Connection::Kubeconfig(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// One kind's cache: what it keeps of each object ([`Keep`]), by
/// `namespace/name`, so every read is sorted.
struct Cache<K: Keep> {
    objects: BTreeMap<String, K::Kept>,
    /// A relist in progress: filled by `InitApply`, swapped in at `InitDone`.
    relisting: Option<BTreeMap<String, K::Kept>>,
    /// The first list completed.
    ready: bool,
    /// What changed since [`KubeSource::take_changes`] last asked.
    touched: Touched,
}

/// The objects of one cache that changed: some by key, or any of them (a
/// relist that found a different set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Touched {
    #[default]
    Nothing,
    Keys(BTreeSet<String>),
    Any,
}

impl Touched {
    fn key(&mut self, key: &str) {
        match self {
            Touched::Nothing => *self = Touched::Keys(BTreeSet::from([key.to_owned()])),
            Touched::Keys(keys) => {
                keys.insert(key.to_owned());
            }
            Touched::Any => {}
        }
    }
}

impl<K: Keep> Default for Cache<K> {
    fn default() -> Self {
        Cache {
            objects: BTreeMap::new(),
            relisting: None,
            ready: false,
            touched: Touched::Nothing,
        }
    }
}

/// What a cache keeps of an object: what the model, the checks, the
/// connector's duties and the saved snapshot read. The rest can be most of
/// an object (a Node's image list, a Service's last-applied annotation, an
/// endpoint's target reference) and is dropped on arrival, so it costs
/// neither memory nor a comparison.
pub(crate) trait Slim {
    fn slim(&mut self);
}

impl Slim for core::Node {
    fn slim(&mut self) {
        // Read: labels, annotations, spec (pod CIDRs) and status.addresses.
        if let Some(status) = &mut self.status {
            status.images = None;
            status.volumes_attached = None;
            status.volumes_in_use = None;
            status.node_info = None;
            status.conditions = None;
            status.config = None;
            status.daemon_endpoints = None;
        }
    }
}

impl Slim for core::Service {
    fn slim(&mut self) {
        // Read: the name and the spec; no annotation of a Service is.
        self.metadata.annotations = None;
        self.status = None;
    }
}

impl Slim for discovery::EndpointSlice {
    fn slim(&mut self) {
        // Read: labels (the owning Service), ports, and each endpoint's
        // addresses, conditions and node.
        self.metadata.annotations = None;
        for endpoint in self.endpoints.iter_mut().flatten() {
            endpoint.target_ref = None;
            endpoint.hostname = None;
            endpoint.hints = None;
            endpoint.zone = None;
            endpoint.deprecated_topology = None;
        }
    }
}

impl Slim for CommunityObject {
    fn slim(&mut self) {}
}

/// What a cache keeps of one object of its kind.
pub(crate) trait Keep: Resource + Sized {
    type Kept: Clone + PartialEq;

    /// `self` as kept. managedFields (server-side-apply bookkeeping, often
    /// the larger part of an object, never read) is gone already.
    fn keep(self) -> Self::Kept;
}

impl Keep for core::Node {
    type Kept = Self;

    fn keep(mut self) -> Self {
        self.slim();
        self
    }
}

/// What the Service cache keeps of a Service: like [`KeptSlice`], its
/// model when the model reads it (with the creationTimestamp the checks
/// age it by), else the object as it came.
#[derive(Debug, Clone, PartialEq)]
pub enum KeptService {
    Model(Box<(Arc<model::Service>, Option<Time>)>),
    Object(Box<core::Service>),
}

impl Keep for core::Service {
    type Kept = KeptService;

    fn keep(mut self) -> KeptService {
        match model::Service::from_k8s(&self) {
            Ok(service) => KeptService::Model(Box::new((
                Arc::new(service),
                self.metadata.creation_timestamp.take(),
            ))),
            Err(_) => {
                self.slim();
                KeptService::Object(Box::new(self))
            }
        }
    }
}

impl KeptService {
    pub fn input(&self) -> ServiceInput<'_> {
        match self {
            KeptService::Model(kept) => ServiceInput::Model {
                service: &kept.0,
                created: kept.1.as_ref(),
            },
            KeptService::Object(object) => ServiceInput::Object(object),
        }
    }
}

impl Keep for CommunityObject {
    type Kept = Self;

    fn keep(self) -> Self {
        self
    }
}

/// What the EndpointSlice cache keeps of a slice. A large cluster's
/// slices are most of what an agent holds (100 k endpoints), so a slice
/// the model reads is kept as its model, shared with every snapshot
/// planned from it, instead of as the object it came as (several times
/// larger).
#[derive(Debug, Clone, PartialEq)]
pub enum KeptSlice {
    /// An IPv4 slice, as the model reads it.
    Model(Arc<model::EndpointSlice>),
    /// One the model refuses: kept as it came (slimmed), for the pass to
    /// report and the saved state to hold as it is.
    Object(Box<discovery::EndpointSlice>),
    /// Another address type (IPv6, FQDN): nothing here translates it.
    NotIpv4,
}

impl Keep for discovery::EndpointSlice {
    type Kept = KeptSlice;

    fn keep(mut self) -> KeptSlice {
        match model::EndpointSlice::from_k8s(&self) {
            Ok(Some(slice)) => KeptSlice::Model(Arc::new(slice)),
            Ok(None) => KeptSlice::NotIpv4,
            Err(_) => {
                self.slim();
                KeptSlice::Object(Box::new(self))
            }
        }
    }
}

impl KeptSlice {
    /// The slice as a source hands it to the model; `None`: not IPv4.
    pub fn input(&self) -> Option<SliceInput<'_>> {
        match self {
            KeptSlice::Model(slice) => Some(SliceInput::Model(slice)),
            KeptSlice::Object(object) => Some(SliceInput::Object(object)),
            KeptSlice::NotIpv4 => None,
        }
    }
}

impl<K: Keep> Cache<K> {
    /// Applies one watcher event; true when the visible objects changed.
    fn handle(&mut self, event: watcher::Event<K>) -> bool {
        let keep = |mut object: K| {
            object.meta_mut().managed_fields = None;
            object.keep()
        };
        match event {
            watcher::Event::Apply(object) => {
                let key = key_of(&object);
                let kept = keep(object);
                if self.objects.get(&key) == Some(&kept) {
                    return false;
                }
                self.touched.key(&key);
                self.objects.insert(key, kept);
                true
            }
            watcher::Event::Delete(object) => {
                let key = key_of(&object);
                let removed = self.objects.remove(&key).is_some();
                if removed {
                    self.touched.key(&key);
                }
                removed
            }
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let key = key_of(&object);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, keep(object));
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let first = !self.ready;
                self.ready = true;
                // Objects compare by what is kept of them (a Service's or a
                // slice's model, other kinds with their resourceVersion), so
                // an unchanged relist reports no change.
                let changed = first || self.objects != listed;
                self.objects = listed;
                if changed {
                    self.touched = Touched::Any;
                }
                changed
            }
        }
    }
}

fn key_of<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// Which Nodes an agent watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeView {
    /// Every Node: connectors and cloud nodes plan with the whole cluster.
    All,
    /// Node `me` watches its own Node first. As an edge (its label, or
    /// `role_override`) it then watches the connectors and its community
    /// peers only; as anything else, every Node.
    OwnCommunity {
        me: String,
        role_override: Option<Role>,
    },
}

/// One watch of Nodes, and the key of its cache.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeWatch {
    All,
    /// One Node, by name (field selector `metadata.name`).
    Named(String),
    /// The Nodes labelled [`label::CONNECTOR`].
    Connectors,
}

impl NodeWatch {
    /// The watch's label and field selectors (`labelSelector`, `fieldSelector`).
    pub fn selectors(&self) -> (Option<String>, Option<String>) {
        match self {
            NodeWatch::All => (None, None),
            NodeWatch::Named(name) => (None, Some(format!("metadata.name={name}"))),
            NodeWatch::Connectors => (Some(label::CONNECTOR.to_owned()), None),
        }
    }

    /// Whether the API server sends `node` on this watch.
    pub fn selects(&self, node: &core::Node) -> bool {
        match self {
            NodeWatch::All => true,
            NodeWatch::Named(name) => node.metadata.name.as_ref() == Some(name),
            NodeWatch::Connectors => node
                .metadata
                .labels
                .as_ref()
                .is_some_and(|labels| labels.contains_key(label::CONNECTOR)),
        }
    }

    fn config(&self) -> watcher::Config {
        let (labels, fields) = self.selectors();
        let mut config = watcher::Config::default();
        if let Some(labels) = labels {
            config = config.labels(&labels);
        }
        if let Some(fields) = fields {
            config = config.fields(&fields);
        }
        config
    }
}

impl NodeView {
    /// The watches that show this agent every Node it plans with, given its
    /// own Node (`None` until seen) and the Communities.
    pub fn watches<'c>(
        &self,
        own: Option<&core::Node>,
        communities: impl IntoIterator<Item = &'c CommunityObject>,
    ) -> BTreeSet<NodeWatch> {
        let NodeView::OwnCommunity { me, role_override } = self else {
            return BTreeSet::from([NodeWatch::All]);
        };
        let mut watches = BTreeSet::from([NodeWatch::Named(me.clone())]);
        match (*role_override).or_else(|| own.map(labelled_role)) {
            // Until its own Node is seen, nothing else: it may be anything.
            None => {}
            Some(Role::Edge) => {
                watches.insert(NodeWatch::Connectors);
                let peers = communities
                    .into_iter()
                    .map(|c| &c.spec.members)
                    .filter(|members| members.contains(me))
                    .flatten()
                    .filter(|member| *member != me);
                watches.extend(peers.map(|peer| NodeWatch::Named(peer.clone())));
            }
            Some(_) => {
                watches.insert(NodeWatch::All);
            }
        }
        watches
    }
}

/// The role a Node's labels give it. One with both labels (the model refuses
/// it) counts as a connector: it then watches every Node, the safe side.
fn labelled_role(node: &core::Node) -> Role {
    let labels = node.metadata.labels.as_ref();
    let has = |key: &str| labels.is_some_and(|l| l.contains_key(key));
    match (has(label::EDGE), has(label::CONNECTOR)) {
        (_, true) => Role::Connector,
        (true, false) => Role::Edge,
        (false, false) => Role::Cloud,
    }
}

struct Caches {
    view: NodeView,
    /// One cache per running Node watch.
    nodes: BTreeMap<NodeWatch, Cache<core::Node>>,
    services: Cache<core::Service>,
    endpoint_slices: Cache<discovery::EndpointSlice>,
    communities: Cache<CommunityObject>,
}

impl Caches {
    /// The Node watches the caches call for now.
    fn node_watches(&self) -> BTreeSet<NodeWatch> {
        let own = match &self.view {
            NodeView::All => None,
            NodeView::OwnCommunity { me, .. } => self
                .nodes
                .get(&NodeWatch::Named(me.clone()))
                .and_then(|cache| cache.objects.get(&format!("/{me}"))),
        };
        self.view.watches(own, self.communities.objects.values())
    }

    /// Everything cached, or `None` until every kind (and every Node watch
    /// called for) has listed once.
    fn refs(&self) -> Option<ObjectRefs<'_>> {
        if !(self.services.ready && self.endpoint_slices.ready && self.communities.ready) {
            return None;
        }
        Some(ObjectRefs {
            nodes: self.nodes()?,
            communities: self.communities.objects.values().collect(),
            services: self
                .services
                .objects
                .values()
                .map(KeptService::input)
                .collect(),
            endpoint_slices: self
                .endpoint_slices
                .objects
                .values()
                .filter_map(KeptSlice::input)
                .collect(),
        })
    }

    /// The Nodes of every watch called for, or `None` while one of them
    /// has not listed once. A Node seen by two watches (its own and every
    /// Node) is one Node.
    fn nodes(&self) -> Option<Vec<&core::Node>> {
        let mut nodes = BTreeMap::new();
        for watch in self.node_watches() {
            let cache = self.nodes.get(&watch).filter(|cache| cache.ready)?;
            nodes.extend(&cache.objects);
        }
        Some(nodes.into_values().collect())
    }
}

/// What changed in the caches between two [`KubeSource::take_changes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceChanges {
    /// Nodes, Services or Communities changed, or a relist found other
    /// EndpointSlices: only a full pass knows what follows.
    pub others: bool,
    /// The EndpointSlices added, changed or deleted (`namespace/name`).
    pub slices: BTreeSet<String>,
}

/// The running watchers and their caches. Dropping it stops the watchers.
pub struct KubeSource {
    caches: Arc<Mutex<Caches>>,
    changed: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeSource {
    /// Starts watching every Node, Service, EndpointSlice and Community.
    /// Returns at once; see [`KubeSource::objects`].
    pub fn start(client: Client) -> KubeSource {
        KubeSource::start_viewing(client, NodeView::All)
    }

    /// Like [`KubeSource::start`], with the Nodes of `view`.
    pub fn start_viewing(client: Client, view: NodeView) -> KubeSource {
        let caches = Arc::new(Mutex::new(Caches {
            view,
            nodes: BTreeMap::new(),
            services: Cache::default(),
            endpoint_slices: Cache::default(),
            communities: Cache::default(),
        }));
        let (tx, changed) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let tasks = vec![
            tokio::spawn(follow_node_watches(
                client.clone(),
                caches.clone(),
                tx.clone(),
            )),
            spawn_watch(
                Api::<core::Service>::all(client.clone()),
                watcher::Config::default(),
                caches.clone(),
                tx.clone(),
                |c| Some(&mut c.services),
            ),
            spawn_watch(
                Api::<discovery::EndpointSlice>::all(client.clone()),
                watcher::Config::default(),
                caches.clone(),
                tx.clone(),
                |c| Some(&mut c.endpoint_slices),
            ),
            spawn_watch(
                Api::<CommunityObject>::all(client),
                watcher::Config::default(),
                caches.clone(),
                tx.clone(),
                |c| Some(&mut c.communities),
            ),
        ];
        KubeSource {
            caches,
            changed,
            tasks,
        }
    }

    /// The cluster as last seen, or `None` until every kind (and every Node
    /// watch the view calls for) has been listed once: a partial view would
    /// plan peers and Services away.
    pub fn objects(&self) -> Option<Objects> {
        self.with_objects(|refs| Objects {
            nodes: refs.nodes.into_iter().cloned().collect(),
            communities: refs.communities.into_iter().cloned().collect(),
            services: refs
                .services
                .into_iter()
                .map(|service| service.object().into_owned())
                .collect(),
            endpoint_slices: refs
                .endpoint_slices
                .into_iter()
                .map(|slice| slice.object().into_owned())
                .collect(),
        })
    }

    /// `read` of the objects where the caches keep them, under their lock
    /// (the watches wait meanwhile): what [`KubeSource::objects`] copies.
    /// `None` until every kind has been listed once.
    pub fn with_objects<R>(&self, read: impl FnOnce(ObjectRefs<'_>) -> R) -> Option<R> {
        let caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        Some(read(caches.refs()?))
    }

    /// What changed since the last call: only EndpointSlices (by
    /// `namespace/name`), or more ([`SourceChanges::others`]).
    pub fn take_changes(&self) -> SourceChanges {
        let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        let mut others = false;
        for cache in caches.nodes.values_mut() {
            others |= std::mem::take(&mut cache.touched) != Touched::Nothing;
        }
        others |= std::mem::take(&mut caches.services.touched) != Touched::Nothing;
        others |= std::mem::take(&mut caches.communities.touched) != Touched::Nothing;
        let slices = match std::mem::take(&mut caches.endpoint_slices.touched) {
            Touched::Nothing => BTreeSet::new(),
            Touched::Keys(keys) => keys,
            Touched::Any => {
                others = true;
                BTreeSet::new()
            }
        };
        SourceChanges { others, slices }
    }

    /// The EndpointSlices of `keys` as cached now (`None`: deleted).
    pub fn endpoint_slices(&self, keys: &BTreeSet<String>) -> Vec<(String, Option<KeptSlice>)> {
        let caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        keys.iter()
            .map(|key| {
                let slice = caches.endpoint_slices.objects.get(key).cloned();
                (key.clone(), slice)
            })
            .collect()
    }

    /// Resolves when the cache changed since the last call.
    pub async fn changed(&mut self) {
        if self.changed.changed().await.is_err() {
            // Every watcher ended (they do not on their own): wait forever
            // rather than spin; the caller's other branches still run.
            std::future::pending::<()>().await;
        }
    }
}

/// Keeps one watch running per [`NodeWatch`] the caches call for: a Node
/// joining this edge's community is watched as soon as the Community says
/// so, one leaving it is dropped with its cache.
async fn follow_node_watches(
    client: Client,
    caches: Arc<Mutex<Caches>>,
    tx: Arc<watch::Sender<u64>>,
) {
    /// A Node watch's task, stopped when dropped: when it is no longer
    /// wanted, and with this task (dropping the [`KubeSource`] aborts it).
    struct Running(JoinHandle<()>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    let mut changed = tx.subscribe();
    let mut running: BTreeMap<NodeWatch, Running> = BTreeMap::new();
    loop {
        let wanted = {
            let mut caches = caches.lock().unwrap_or_else(PoisonError::into_inner);
            let wanted = caches.node_watches();
            caches.nodes.retain(|watch, _| wanted.contains(watch));
            for watch in &wanted {
                caches.nodes.entry(watch.clone()).or_default();
            }
            wanted
        };
        running.retain(|watch, _| wanted.contains(watch));
        for watch in wanted {
            if running.contains_key(&watch) {
                continue;
            }
            let key = watch.clone();
            let task = spawn_watch(
                Api::<core::Node>::all(client.clone()),
                watch.config(),
                caches.clone(),
                tx.clone(),
                move |c| c.nodes.get_mut(&key),
            );
            running.insert(watch, Running(task));
        }
        // Never fails: this task holds a sender.
        let _ = changed.changed().await;
    }
}

fn spawn_watch<K, F>(
    api: Api<K>,
    config: watcher::Config,
    caches: Arc<Mutex<Caches>>,
    tx: Arc<watch::Sender<u64>>,
    cache: F,
) -> JoinHandle<()>
where
    K: Keep + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
    F: for<'c> Fn(&'c mut Caches) -> Option<&'c mut Cache<K>> + Send + 'static,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    tokio::spawn(async move {
        // The default backoff retries forever with growing pauses (capped),
        // so an unreachable API server costs little and is noticed when it returns.
        let mut events = watcher(api, config).default_backoff().boxed();
        let mut failing = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        info!("watch of {kind} resumed");
                        failing = false;
                    }
                    let changed = {
                        let mut caches = caches.lock().unwrap_or_else(PoisonError::into_inner);
                        // A Node watch no longer wanted: its cache is gone.
                        cache(&mut caches).is_some_and(|cache| cache.handle(event))
                    };
                    if changed {
                        tx.send_modify(|n| *n += 1);
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!("watch of {kind} failed: {e}; keeping the last state and retrying");
                        failing = true;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn node(name: &str, rv: &str) -> core::Node {
        core::Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The example cluster's objects, each with what a real cluster adds
    /// and nothing here reads: kubelet's status on Nodes, kubectl's
    /// last-applied annotation, endpoints' target references and zones.
    fn heavy_objects() -> crate::source::Objects {
        use k8s_openapi::api::core::v1::{ContainerImage, ObjectReference};
        let mut objects = crate::source::manifest::parse(crate::source::manifest::EXAMPLE_CLUSTER)
            .expect("the example cluster parses");
        for node in &mut objects.nodes {
            let status = node.status.get_or_insert_with(Default::default);
            status.images = Some(
                (0..40)
                    .map(|n| ContainerImage {
                        names: Some(vec![
                            format!("registry.example.com/team/app-{n}@sha256:{:064x}", n),
                            format!("registry.example.com/team/app-{n}:v1.{n}.0"),
                        ]),
                        size_bytes: Some(100_000_000 + n),
                    })
                    .collect(),
            );
            status.node_info = Some(Default::default());
            status.conditions = Some(vec![Default::default(); 5]);
        }
        for service in &mut objects.services {
            let json = serde_json::to_string(&*service).unwrap();
            service
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    json,
                );
            service.status = Some(Default::default());
        }
        for slice in &mut objects.endpoint_slices {
            for endpoint in slice.endpoints.iter_mut().flatten() {
                endpoint.target_ref = Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some("web-7d9f8c6b5-x2x4k".into()),
                    namespace: Some("default".into()),
                    uid: Some("5c1f6a3e-8d0b-4d7e-9a3c-2f1e0b9d8c7a".into()),
                    ..Default::default()
                });
                endpoint.zone = Some("zone-a".into());
                endpoint.hostname = Some("web-0".into());
            }
        }
        objects
    }

    /// Every object of `objects` through a fresh cache of its kind, as
    /// the watches deliver them.
    fn cached(objects: &crate::source::Objects) -> crate::source::Objects {
        fn through<K: Keep + Clone>(objects: &[K]) -> Vec<K::Kept> {
            let mut cache = Cache::default();
            for object in objects {
                cache.handle(watcher::Event::Apply(object.clone()));
            }
            cache.objects.into_values().collect()
        }
        crate::source::Objects {
            nodes: through(&objects.nodes),
            communities: through(&objects.communities),
            services: through(&objects.services)
                .iter()
                .map(|kept| kept.input().object().into_owned())
                .collect(),
            endpoint_slices: through(&objects.endpoint_slices)
                .iter()
                .filter_map(KeptSlice::input)
                .map(|slice| slice.object().into_owned())
                .collect(),
        }
    }

    #[test]
    fn caches_keep_what_the_model_reads_and_drop_the_rest() {
        let heavy = heavy_objects();
        let kept = cached(&heavy);
        assert_eq!(
            kept.snapshot().unwrap(),
            heavy.snapshot().unwrap(),
            "the model of what the caches keep is the model of the whole objects"
        );
        let size = |o: &crate::source::Objects| {
            serde_json::to_vec(&o.nodes).unwrap().len()
                + serde_json::to_vec(&o.services).unwrap().len()
                + serde_json::to_vec(&o.endpoint_slices).unwrap().len()
        };
        assert!(
            size(&kept) * 4 < size(&heavy),
            "kept {} of {} bytes",
            size(&kept),
            size(&heavy)
        );
        for node in &kept.nodes {
            let status = node.status.as_ref().unwrap();
            assert!(status.images.is_none() && status.conditions.is_none());
            assert!(
                status.addresses.is_some(),
                "{:?}: addresses kept",
                node.metadata.name
            );
        }
        for slice in &kept.endpoint_slices {
            for endpoint in slice.endpoints.iter().flatten() {
                assert_eq!(endpoint.target_ref, None);
                assert!(!endpoint.addresses.is_empty());
            }
        }
    }

    /// The example cluster plus an EndpointSlice the model refuses and an
    /// IPv6 one.
    fn objects_with_odd_slices() -> crate::source::Objects {
        let mut objects = crate::source::manifest::parse(crate::source::manifest::EXAMPLE_CLUSTER)
            .expect("the example cluster parses");
        let mut refused = objects.endpoint_slices[0].clone();
        refused.metadata.name = Some("dns-refused".into());
        refused.endpoints.as_mut().unwrap()[0].addresses = vec!["10.234.1.999".into()];
        let mut ipv6 = objects.endpoint_slices[0].clone();
        ipv6.metadata.name = Some("dns-v6".into());
        ipv6.address_type = "IPv6".into();
        ipv6.endpoints.as_mut().unwrap()[0].addresses = vec!["fd00::10".into()];
        objects.endpoint_slices.extend([refused, ipv6]);
        objects
    }

    #[test]
    fn a_slice_is_kept_as_its_model_and_one_the_model_refuses_as_it_came() {
        let objects = objects_with_odd_slices();
        let mut cache = Cache::<discovery::EndpointSlice>::default();
        cache.handle(watcher::Event::Init);
        for slice in &objects.endpoint_slices {
            cache.handle(watcher::Event::InitApply(slice.clone()));
        }
        cache.handle(watcher::Event::InitDone);
        let kinds: Vec<_> = cache
            .objects
            .iter()
            .map(|(key, kept)| {
                let kind = match kept {
                    KeptSlice::Model(_) => "model",
                    KeptSlice::Object(_) => "object",
                    KeptSlice::NotIpv4 => "not IPv4",
                };
                (key.as_str(), kind)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("kube-system/dns-7x2kq", "model"),
                ("kube-system/dns-refused", "object"),
                ("kube-system/dns-v6", "not IPv4"),
            ]
        );

        // A pass over the caches sees what a pass over the objects sees:
        // the same snapshot, the same problem for the refused slice.
        let mut caches = Caches {
            view: NodeView::All,
            nodes: BTreeMap::new(),
            services: Cache::default(),
            endpoint_slices: cache,
            communities: Cache::default(),
        };
        let listed = |caches: &mut Caches| {
            let mut nodes = Cache::default();
            nodes.handle(watcher::Event::Init);
            for node in &objects.nodes {
                nodes.handle(watcher::Event::InitApply(node.clone()));
            }
            nodes.handle(watcher::Event::InitDone);
            caches.nodes.insert(NodeWatch::All, nodes);
            for service in &objects.services {
                caches
                    .services
                    .handle(watcher::Event::Apply(service.clone()));
            }
            for community in &objects.communities {
                caches
                    .communities
                    .handle(watcher::Event::Apply(community.clone()));
            }
            for ready in [&mut caches.services.ready, &mut caches.communities.ready] {
                *ready = true;
            }
        };
        listed(&mut caches);
        let cidr = "10.96.0.0/12".parse().unwrap();
        let from_caches = caches.refs().expect("listed").checked(cidr);
        let from_objects = objects.checked(cidr);
        assert_eq!(from_caches, from_objects);
        assert!(
            from_caches
                .problems
                .iter()
                .any(|p| p.to_string().contains("dns-refused")),
            "{:?}",
            from_caches.problems
        );
        assert!(
            caches
                .services
                .objects
                .values()
                .all(|kept| matches!(kept, KeptService::Model(_))),
            "every Service of the example is kept as its model"
        );
        let KeptSlice::Model(kept) = &caches.endpoint_slices.objects["kube-system/dns-7x2kq"]
        else {
            unreachable!("checked above")
        };
        let planned = &from_caches.snapshot.endpoint_slices
            [&crate::model::NamespacedName::new("kube-system", "dns-7x2kq")];
        assert!(
            Arc::ptr_eq(kept, planned),
            "the snapshot shares the cached slice"
        );
        let KeptService::Model(kept) = &caches.services.objects["kube-system/dns"] else {
            unreachable!("checked above")
        };
        let planned = &from_caches.snapshot.services
            [&crate::model::NamespacedName::new("kube-system", "dns")];
        assert!(
            Arc::ptr_eq(&kept.0, planned),
            "the snapshot shares the cached Service"
        );
    }

    #[test]
    fn an_update_that_changes_nothing_the_model_reads_is_no_change() {
        let objects = objects_with_odd_slices();
        let mut cache = Cache::<discovery::EndpointSlice>::default();
        let slice = objects.endpoint_slices[0].clone();
        assert!(cache.handle(watcher::Event::Apply(slice.clone())));
        let mut touched = slice.clone();
        touched.metadata.resource_version = Some("99".into());
        touched.endpoints.as_mut().unwrap()[0].zone = Some("zone-b".into());
        assert!(!cache.handle(watcher::Event::Apply(touched.clone())));
        touched.endpoints.as_mut().unwrap()[0].addresses = vec!["10.234.1.11".into()];
        assert!(cache.handle(watcher::Event::Apply(touched)));
    }

    #[test]
    fn relist_keeps_old_objects_until_the_list_is_complete() {
        let mut cache = Cache::default();
        assert!(!cache.handle(watcher::Event::Init));
        cache.handle(watcher::Event::InitApply(node("a", "1")));
        assert!(
            cache.handle(watcher::Event::InitDone),
            "the first list is a change"
        );
        assert!(cache.ready);

        // A relist: during it the old objects stay visible.
        assert!(!cache.handle(watcher::Event::Init));
        assert_eq!(cache.objects.len(), 1);
        assert!(!cache.handle(watcher::Event::InitApply(node("a", "1"))));
        assert_eq!(cache.objects.len(), 1);
        assert!(
            !cache.handle(watcher::Event::InitDone),
            "an identical relist is not a change"
        );

        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(node("b", "7")));
        assert!(
            cache.handle(watcher::Event::InitDone),
            "a relist that finds other objects is a change"
        );
        assert_eq!(cache.objects.keys().collect::<Vec<_>>(), ["/b"]);
    }

    #[test]
    fn changed_keys_are_kept_until_taken_and_a_different_relist_touches_everything() {
        let mut cache = Cache::default();
        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(node("a", "1")));
        cache.handle(watcher::Event::InitDone);
        assert_eq!(std::mem::take(&mut cache.touched), Touched::Any);

        cache.handle(watcher::Event::Apply(node("a", "1")));
        assert_eq!(
            cache.touched,
            Touched::Nothing,
            "no change, nothing touched"
        );
        cache.handle(watcher::Event::Apply(node("a", "2")));
        cache.handle(watcher::Event::Apply(node("b", "1")));
        cache.handle(watcher::Event::Delete(node("ghost", "1")));
        cache.handle(watcher::Event::Delete(node("b", "1")));
        let keys = BTreeSet::from(["/a".to_owned(), "/b".to_owned()]);
        assert_eq!(std::mem::take(&mut cache.touched), Touched::Keys(keys));

        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(node("a", "2")));
        cache.handle(watcher::Event::InitDone);
        assert_eq!(cache.touched, Touched::Nothing, "an identical relist");
        cache.handle(watcher::Event::Apply(node("c", "1")));
        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(node("a", "3")));
        cache.handle(watcher::Event::InitDone);
        assert_eq!(cache.touched, Touched::Any);
    }

    #[test]
    fn deleting_an_unknown_object_or_reapplying_the_same_is_no_change() {
        let mut cache = Cache::default();
        assert!(cache.handle(watcher::Event::Apply(node("a", "1"))));
        assert!(!cache.handle(watcher::Event::Apply(node("a", "1"))));
        assert!(cache.handle(watcher::Event::Apply(node("a", "2"))));
        assert!(cache.handle(watcher::Event::Delete(node("a", "2"))));
        assert!(!cache.handle(watcher::Event::Delete(node("ghost", "1"))));
        assert!(cache.handle(watcher::Event::Apply(node("a", "1"))));
        assert!(cache.handle(watcher::Event::Delete(node("a", "1"))));
        assert!(cache.objects.is_empty());
    }

    fn labelled(name: &str, role_label: Option<&str>) -> core::Node {
        let mut node = node(name, "1");
        node.metadata.labels =
            role_label.map(|l| [(l.to_owned(), String::new())].into_iter().collect());
        node
    }

    fn community(name: &str, members: &[&str]) -> CommunityObject {
        CommunityObject {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: super::super::CommunitySpec {
                members: members.iter().map(|m| m.to_string()).collect(),
            },
        }
    }

    fn own_community(me: &str) -> NodeView {
        NodeView::OwnCommunity {
            me: me.into(),
            role_override: None,
        }
    }

    fn named(name: &str) -> NodeWatch {
        NodeWatch::Named(name.into())
    }

    #[test]
    fn an_edge_watches_itself_the_connectors_and_its_community_peers_only() {
        let communities = [
            community("beijing", &["edge-1", "edge-2"]),
            community("shanghai", &["edge-1", "edge-4"]),
            community("elsewhere", &["edge-3", "edge-5"]),
        ];
        let edge = labelled("edge-1", Some(label::EDGE));
        let watches = own_community("edge-1").watches(Some(&edge), &communities);
        assert_eq!(
            watches,
            BTreeSet::from([
                NodeWatch::Connectors,
                named("edge-1"),
                named("edge-2"),
                named("edge-4")
            ])
        );
        let lonely = labelled("edge-9", Some(label::EDGE));
        assert_eq!(
            own_community("edge-9").watches(Some(&lonely), &communities),
            BTreeSet::from([NodeWatch::Connectors, named("edge-9")])
        );
    }

    #[test]
    fn connectors_cloud_nodes_and_the_all_view_watch_every_node() {
        for role_label in [Some(label::CONNECTOR), None] {
            let own = labelled("cloud-1", role_label);
            assert_eq!(
                own_community("cloud-1").watches(Some(&own), []),
                BTreeSet::from([NodeWatch::All, named("cloud-1")])
            );
        }
        let edge = labelled("edge-1", Some(label::EDGE));
        assert_eq!(
            NodeView::All.watches(Some(&edge), []),
            BTreeSet::from([NodeWatch::All])
        );
        // `--role connector` on a node labelled edge plans as a connector.
        let overridden = NodeView::OwnCommunity {
            me: "edge-1".into(),
            role_override: Some(Role::Connector),
        };
        assert!(
            overridden
                .watches(Some(&edge), [])
                .contains(&NodeWatch::All)
        );
    }

    #[test]
    fn until_its_own_node_is_seen_an_agent_watches_only_that() {
        assert_eq!(
            own_community("edge-1").watches(None, [&community("c", &["edge-1", "edge-2"])]),
            BTreeSet::from([named("edge-1")])
        );
    }

    #[test]
    fn watches_select_what_their_selectors_say() {
        let connector = labelled("cloud-1", Some(label::CONNECTOR));
        let edge = labelled("edge-1", Some(label::EDGE));
        assert!(NodeWatch::Connectors.selects(&connector) && !NodeWatch::Connectors.selects(&edge));
        assert!(named("edge-1").selects(&edge) && !named("edge-1").selects(&connector));
        assert!(NodeWatch::All.selects(&edge));
        assert_eq!(
            NodeWatch::Connectors.selectors(),
            (Some(label::CONNECTOR.to_owned()), None)
        );
        assert_eq!(
            named("edge-1").selectors(),
            (None, Some("metadata.name=edge-1".to_owned()))
        );
    }

    /// Caches of an edge view whose own Node, connectors and Communities
    /// have listed.
    fn edge_caches(communities: &[CommunityObject]) -> Caches {
        let mut caches = Caches {
            view: own_community("edge-1"),
            nodes: BTreeMap::new(),
            services: Cache::default(),
            endpoint_slices: Cache::default(),
            communities: Cache::default(),
        };
        for c in communities {
            caches.communities.handle(watcher::Event::Apply(c.clone()));
        }
        let listed = |objects: Vec<core::Node>| {
            let mut cache = Cache::default();
            cache.handle(watcher::Event::Init);
            for object in objects {
                cache.handle(watcher::Event::InitApply(object));
            }
            cache.handle(watcher::Event::InitDone);
            cache
        };
        caches.nodes.insert(
            named("edge-1"),
            listed(vec![labelled("edge-1", Some(label::EDGE))]),
        );
        caches.nodes.insert(
            NodeWatch::Connectors,
            listed(vec![labelled("cloud-1", Some(label::CONNECTOR))]),
        );
        caches
    }

    fn names<'n>(nodes: &[&'n core::Node]) -> Vec<&'n str> {
        nodes
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect()
    }

    #[test]
    fn a_new_peer_holds_the_view_back_until_its_watch_has_listed() {
        let mut caches = edge_caches(&[community("beijing", &["edge-1", "edge-2"])]);
        assert_eq!(caches.nodes(), None, "edge-2's watch has not listed");
        let mut peer = Cache::default();
        peer.handle(watcher::Event::Init);
        peer.handle(watcher::Event::InitApply(labelled(
            "edge-2",
            Some(label::EDGE),
        )));
        peer.handle(watcher::Event::InitDone);
        caches.nodes.insert(named("edge-2"), peer);
        assert_eq!(
            names(&caches.nodes().unwrap()),
            ["cloud-1", "edge-1", "edge-2"]
        );

        // edge-2 leaves the community: its Node leaves the view at once,
        // before its watch is stopped.
        caches
            .communities
            .handle(watcher::Event::Apply(community("beijing", &["edge-1"])));
        assert_eq!(names(&caches.nodes().unwrap()), ["cloud-1", "edge-1"]);
    }

    #[test]
    fn managed_fields_are_not_kept() {
        let mut cache = Cache::default();
        let mut object = node("a", "1");
        object.metadata.managed_fields = Some(vec![Default::default()]);
        cache.handle(watcher::Event::Apply(object.clone()));
        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(object));
        cache.handle(watcher::Event::InitDone);
        assert_eq!(cache.objects["/a"].metadata.managed_fields, None);
        assert_eq!(
            cache.objects["/a"].metadata.resource_version.as_deref(),
            Some("1")
        );
    }
}
