//! The Kubernetes source: one kube-rs watcher per kind (Nodes, Services,
//! EndpointSlices, Communities) keeps a cache of the cluster, and
//! [`KubeSource::objects`] hands out the same [`Objects`] the manifest file
//! gives, so both sources feed the same model and plan.
//!
//! Watch errors, expired resource versions (410 Gone) and reconnects make
//! the watcher relist. A relist is staged: the cache keeps the old objects
//! until the new list is complete (`Init` … `InitDone`) and then swaps, so a
//! relist that finds the same objects changes nothing and the reconcile loop
//! (which skips identical `Objects`) touches no map. While the API server is
//! unreachable the cache simply keeps its last state.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use log::{info, warn};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinHandle};

use super::{CommunityObject, Objects};

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

/// One kind's cache: objects by `namespace/name`, so every read is sorted.
struct Cache<K> {
    objects: BTreeMap<String, K>,
    /// A relist in progress: filled by `InitApply`, swapped in at `InitDone`.
    relisting: Option<BTreeMap<String, K>>,
    /// The first list completed.
    ready: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Cache {
            objects: BTreeMap::new(),
            relisting: None,
            ready: false,
        }
    }
}

impl<K: Resource + Clone + PartialEq> Cache<K> {
    /// Applies one watcher event; true when the visible objects changed.
    fn handle(&mut self, mut event: watcher::Event<K>) -> bool {
        // managedFields is server-side-apply bookkeeping: often the larger
        // part of an object, never read by the model; not kept in memory
        // nor in the persisted snapshot.
        if let watcher::Event::Apply(object) | watcher::Event::InitApply(object) = &mut event {
            object.meta_mut().managed_fields = None;
        }
        match event {
            watcher::Event::Apply(object) => {
                let key = key_of(&object);
                if self.objects.get(&key) == Some(&object) {
                    return false;
                }
                self.objects.insert(key, object);
                true
            }
            watcher::Event::Delete(object) => self.objects.remove(&key_of(&object)).is_some(),
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let key = key_of(&object);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, object);
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let first = !self.ready;
                self.ready = true;
                // Objects compare by content (resourceVersion included), so an
                // unchanged relist reports no change.
                let changed = first || self.objects != listed;
                self.objects = listed;
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

#[derive(Default)]
struct Caches {
    nodes: Cache<core::Node>,
    services: Cache<core::Service>,
    endpoint_slices: Cache<discovery::EndpointSlice>,
    communities: Cache<CommunityObject>,
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
    /// Starts the four watchers (cluster-wide). Returns at once; see [`KubeSource::objects`].
    pub fn start(client: Client) -> KubeSource {
        let caches = Arc::new(Mutex::new(Caches::default()));
        let (tx, changed) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let tasks = vec![
            spawn_watch(
                Api::<core::Node>::all(client.clone()),
                caches.clone(),
                tx.clone(),
                |c| &mut c.nodes,
            ),
            spawn_watch(
                Api::<core::Service>::all(client.clone()),
                caches.clone(),
                tx.clone(),
                |c| &mut c.services,
            ),
            spawn_watch(
                Api::<discovery::EndpointSlice>::all(client.clone()),
                caches.clone(),
                tx.clone(),
                |c| &mut c.endpoint_slices,
            ),
            spawn_watch(
                Api::<CommunityObject>::all(client),
                caches.clone(),
                tx.clone(),
                |c| &mut c.communities,
            ),
        ];
        KubeSource {
            caches,
            changed,
            tasks,
        }
    }

    /// The cluster as last seen, or `None` until every kind has been listed
    /// once (a partial view would plan peers and Services away).
    pub fn objects(&self) -> Option<Objects> {
        let caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        let ready = caches.nodes.ready
            && caches.services.ready
            && caches.endpoint_slices.ready
            && caches.communities.ready;
        ready.then(|| Objects {
            nodes: caches.nodes.objects.values().cloned().collect(),
            communities: caches.communities.objects.values().cloned().collect(),
            services: caches.services.objects.values().cloned().collect(),
            endpoint_slices: caches.endpoint_slices.objects.values().cloned().collect(),
        })
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

fn spawn_watch<K>(
    api: Api<K>,
    caches: Arc<Mutex<Caches>>,
    tx: Arc<watch::Sender<u64>>,
    cache: fn(&mut Caches) -> &mut Cache<K>,
) -> JoinHandle<()>
where
    K: Resource + Clone + PartialEq + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    tokio::spawn(async move {
        // The default backoff retries forever with growing pauses (capped),
        // so an unreachable API server costs little and is noticed when it returns.
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
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
                        cache(&mut caches).handle(event)
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
