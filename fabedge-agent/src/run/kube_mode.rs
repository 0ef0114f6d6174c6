//! `run` in kube mode: the same plan-and-apply as the manifest mode, fed by
//! the API server's watches, with edge autonomy and, on connectors, the
//! leader-elected cluster work.
//!
//! Edge autonomy: the last snapshot applied successfully is saved in the
//! state dir. A start applies it at once (the datapath comes back even if
//! the API server is unreachable; with the pins still in place this is a
//! no-op diff), and the watches replace it when they have listed
//! everything. A broken watch keeps the cache as it was, so nothing is
//! flushed; only a complete, different view of the cluster changes maps.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use log::{error, info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use super::{Reconciler, RunOptions, observe_host, slices::Applied};
use crate::{
    connector::{
        annotate::{ConnectorDuty, is_connector},
        ipam::Pool,
        leader::ElectionConfig,
    },
    datapath::Datapath,
    maps::Maps,
    model::{NamespacedName, Role, SliceInput},
    plan::TunnelMode,
    source::{
        kube::{Connection, KeptSlice, KubeSource, NodeView},
        last_good,
    },
};

#[derive(Debug, Clone)]
pub struct KubeOptions {
    pub connection: Connection,
    /// The agent's namespace: where the Lease goes (Events go to `annotate::EVENT_NAMESPACE`).
    pub namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
    /// `None`: no edge pod CIDR allocation.
    pub pod_cidr_pool: Option<Pool>,
}

type Logs = Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>;

/// The watches this agent's view needs, started at once: they list while
/// the datapath loads.
pub(super) fn start_source(options: &RunOptions, client: kube::Client) -> KubeSource {
    KubeSource::start_viewing(client, node_view(&options.node, &options.settings))
}

pub(super) async fn run(
    options: &RunOptions,
    (client, mut source): (kube::Client, KubeSource),
    reconciler: &mut Reconciler,
    datapath: &mut Datapath,
    maps: &mut Maps,
    logs: &mut Logs,
    hellos: &mut Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
) -> Result<()> {
    let kube = options.kube.as_ref().expect("kube mode");
    let mut state = KubeState {
        applied: None,
        full_due: true,
        save_due: false,
        saved_at: std::time::Instant::now(),
        last_error: None,
        own_annotations: None,
    };
    // Every agent publishes its own Node's annotations (ESP: public key, key generation).
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());

    match last_good::load(&options.state_dir) {
        Ok(Some(saved)) => {
            info!(
                "applying the last good cluster state from {} until the API server answers",
                last_good::path(&options.state_dir).display()
            );
            let cidr = options.settings.service_cidr;
            let checked = checked_apart(|| Some(saved.checked(cidr))).expect("given");
            state.reconcile(reconciler, checked, datapath, maps, options, None);
            drop(saved);
            crate::sys::release_free_memory();
        }
        Ok(None) => info!("no saved cluster state yet; waiting for the API server"),
        Err(e) => warn!("{e:#}"),
    }

    // Leader election runs on connectors only; it starts once our Node says we are one.
    let election = ElectionConfig {
        namespace: kube.namespace.clone(),
        lease_name: kube.lease_name.clone(),
        identity: options.node.clone(),
        lease_duration: kube.lease_duration,
        renew_interval: kube.renew_interval,
    };
    let mut duty = ConnectorDuty::new(client, election, kube.pod_cidr_pool);

    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut tick = tokio::time::interval(options.poll_interval);
    let mut ct_gc = tokio::time::interval(crate::services::ctgc::INTERVAL);
    let mut ha_changes = None;
    loop {
        reconciler.status.turned();
        if ha_changes.is_none() {
            ha_changes = reconciler.ha.changes();
        }
        // Only a watch event may take the EndpointSlice shortcut.
        let mut full = true;
        tokio::select! {
            _ = source.changed() => full = false,
            // A connector went up or down: fail over now.
            changed = async { ha_changes.as_mut().expect("guarded").changed().await }, if ha_changes.is_some() => {
                if changed.is_ok() {
                    reconciler.ha.react(maps);
                }
                continue;
            }
            _ = ct_gc.tick() => {
                crate::services::ctgc::collect_and_log(maps);
                continue;
            }
            // The tick only retries: a failed apply, or the leader's patches.
            _ = tick.tick() => {
                state.save_if_due(&source, options, false);
                reconciler.restore_routes();
                reconciler.guard_pod_ports(datapath, maps);
                // Hold-downs end without a probe event.
                reconciler.ha.react(maps);
                if reconciler.esp_tick(maps) {
                    // A new key generation: re-plan so it is used and published.
                    state.applied = None;
                } else if state.last_error.is_none() && state.own_annotations.is_none() && !duty.is_leading() {
                    continue;
                }
            }
            _ = duty.leading_changed() => {}
            // A hello: a peer's NAT mapping may have moved; follow it now.
            readable = async { hellos.as_mut().expect("guarded").readable_mut().await }, if hellos.is_some() => {
                let Ok(mut guard) = readable else { continue };
                let new_generation = reconciler.esp_tick(maps);
                guard.clear_ready();
                if !new_generation {
                    continue;
                }
                state.applied = None;
            }
            readable = async { logs.as_mut().expect("guarded").readable_mut().await }, if logs.is_some() => {
                if let Ok(mut guard) = readable {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                continue;
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        let changes = source.take_changes();
        state.full_due |= changes.others;
        if !full && !state.full_due {
            if changes.slices.is_empty() {
                // Taken by the pass this event woke up late for.
                continue;
            }
            let slices = source.endpoint_slices(&changes.slices);
            if state.patch_slices(reconciler, &slices, maps) {
                continue;
            }
        }
        let cidr = options.settings.service_cidr;
        let Some(checked) = checked_apart(|| source.with_objects(|refs| refs.checked(cidr))) else {
            state.full_due = true;
            continue;
        };
        state.full_due = false;
        state.reconcile(reconciler, checked, datapath, maps, options, Some(&source));
        if let Some(patch) = state.own_annotations.clone() {
            let body = crate::connector::annotate::merge_patch(&patch);
            match nodes
                .patch(
                    &options.node,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(body),
                )
                .await
            {
                Ok(_) => state.own_annotations = None,
                Err(e) => warn!(
                    "publishing the annotations of node {} (retrying): {e}",
                    options.node
                ),
            }
        }

        let connector = match options.settings.role_override {
            Some(role) => role == Role::Connector,
            None => source
                .with_objects(|refs| is_connector(refs.nodes, &options.node))
                .unwrap_or(false),
        };
        let mac = if duty.is_leading() {
            observe_host(&options.settings, &options.flannel_iface)
                .ok()
                .and_then(|s| s.flannel_mac)
        } else {
            None
        };
        duty.step(|| source.objects(), connector, mac).await;
        crate::sys::release_free_memory();
    }
    state.save_if_due(&source, options, true);
    duty.release().await;
    Ok(())
}

/// The checked snapshot `check` makes (from the saved objects, or from
/// the caches' objects under their lock, never copied), made on a thread
/// of its own ([`crate::sys::apart`]) and copied onto this one: the
/// garbage of making it stays in that thread's arena, free as a whole
/// once it is done.
fn checked_apart(
    check: impl FnOnce() -> Option<crate::source::Checked> + Send,
) -> Option<crate::source::Checked> {
    let checked = crate::sys::apart(check)?;
    let kept = checked.clone();
    drop(checked);
    Some(kept)
}

/// How stale the saved snapshot may get while only EndpointSlices change:
/// saving writes every object (megabytes in a large cluster), so the
/// shortcut saves at most this often; a full pass and a stop save at once.
const SAVE_EVERY: Duration = Duration::from_secs(30);

/// Which Nodes this agent watches: with `--cluster-prefix` an edge needs no
/// Node outside its community but the connectors. Not in ESP mode: SPIs are
/// derived from every node's name (`esp::keys::SpiSlots`), so an edge that
/// saw fewer Nodes than its connector could derive other SPIs.
fn node_view(node: &str, settings: &crate::plan::Settings) -> NodeView {
    match (settings.cluster_prefixes.is_empty(), settings.tunnel_mode) {
        (true, _) => NodeView::All,
        (false, TunnelMode::Esp) => {
            info!(
                "ESP mode: watching every Node (SPIs depend on every node's name); --cluster-prefix only adds routes"
            );
            NodeView::All
        }
        (false, TunnelMode::Vxlan) => NodeView::OwnCommunity {
            me: node.to_owned(),
            role_override: settings.role_override,
        },
    }
}

struct KubeState {
    /// The snapshot and Service plan last applied successfully.
    applied: Option<Applied>,
    /// Only a full pass may run next: something else than EndpointSlices
    /// changed, or a pass found the caches not ready.
    full_due: bool,
    /// EndpointSlice changes applied since the last save.
    save_due: bool,
    saved_at: std::time::Instant,
    last_error: Option<String>,
    /// Annotations the last plan wants on this agent's own Node, not yet written.
    own_annotations: Option<crate::plan::AnnotationPatch>,
}

impl KubeState {
    /// Plan and apply `objects` (checked: their snapshot, from
    /// [`checked_apart`]) unless they model the same cluster as what is
    /// applied (a relist, a kubelet heartbeat); save them on success.
    fn reconcile(
        &mut self,
        reconciler: &mut Reconciler,
        checked: crate::source::Checked,
        datapath: &mut Datapath,
        maps: &mut Maps,
        options: &RunOptions,
        save: Option<&KubeSource>,
    ) {
        let started = std::time::Instant::now();
        let result = (|| -> Result<Option<Applied>> {
            let snapshot = checked.snapshot;
            if self.applied.as_ref().map(|a| &a.snapshot) == Some(&snapshot) {
                return Ok(None);
            }
            let settings = observe_host(&options.settings, &options.flannel_iface)?;
            let plan = reconciler.plan_and_apply(&snapshot, &settings, datapath, maps, options);
            reconciler.record_problems(checked.problems, plan.as_ref().ok());
            let plan = plan?;
            let services = plan.services;
            self.own_annotations = plan
                .annotations
                .into_iter()
                .find(|patch| patch.node == options.node);
            if let Some(source) = save {
                source
                    .with_objects(|refs| last_good::save_refs(&options.state_dir, &refs))
                    .unwrap_or(Ok(()))?;
                self.save_due = false;
                self.saved_at = std::time::Instant::now();
            }
            Ok(Some(Applied { snapshot, services }))
        })();
        if !matches!(result, Ok(None)) {
            reconciler.status.applied(
                started.elapsed(),
                result.as_ref().err().map(|e| format!("{e:#}")),
            );
        }
        match result {
            Ok(Some(applied)) => {
                self.applied = Some(applied);
                self.last_error = None;
            }
            Ok(None) => {}
            Err(e) => {
                let message = format!("{e:#}");
                if self.last_error.as_deref() != Some(message.as_str()) {
                    error!("{message} (keeping the last applied state; retrying)");
                    self.last_error = Some(message);
                }
            }
        }
    }
}

impl KubeState {
    /// Apply changes of EndpointSlices alone (`slices`, as cached now)
    /// without a full pass ([`super::slices`]). False when only a full
    /// pass can do it — nothing applied yet, the last pass failed, a slice
    /// the checks would report, maps too small — and the caller runs one.
    fn patch_slices(
        &mut self,
        reconciler: &mut Reconciler,
        slices: &[(String, Option<KeptSlice>)],
        maps: &mut Maps,
    ) -> bool {
        let started = std::time::Instant::now();
        if self.last_error.is_some() {
            return false;
        }
        let Some(applied) = &mut self.applied else {
            return false;
        };
        let mut changes = Vec::new();
        for (key, object) in slices {
            let Some((namespace, name)) = key.split_once('/') else {
                return false;
            };
            // An invalid slice: the full pass reports it.
            let Ok(slice) = object
                .as_ref()
                .and_then(KeptSlice::input)
                .map(SliceInput::model)
                .transpose()
            else {
                return false;
            };
            changes.push((NamespacedName::new(namespace, name), slice.flatten()));
        }
        if !applied.patch(&mut reconciler.applier, maps, changes) {
            // No longer what the maps hold: plan whole.
            self.applied = None;
            return false;
        }
        reconciler.status.applied(started.elapsed(), None);
        self.save_due = true;
        true
    }

    /// Save what the shortcut applied, at most every [`SAVE_EVERY`] (or
    /// now: `stopping`).
    fn save_if_due(&mut self, source: &KubeSource, options: &RunOptions, stopping: bool) {
        if !self.save_due || !(stopping || self.saved_at.elapsed() >= SAVE_EVERY) {
            return;
        }
        let Some(saved) =
            source.with_objects(|refs| last_good::save_refs(&options.state_dir, &refs))
        else {
            return;
        };
        match saved {
            Ok(()) => {
                self.save_due = false;
                self.saved_at = std::time::Instant::now();
            }
            Err(e) => {
                // Retried at the next due time, not on every tick.
                warn!("{e:#}");
                self.saved_at = std::time::Instant::now();
            }
        }
    }
}

/// Default location of the in-cluster namespace file.
pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The agent's namespace: `--namespace`/`POD_NAMESPACE`, else the service
/// account's, else `fabedge`.
pub fn default_namespace() -> String {
    std::fs::read_to_string(PathBuf::from(NAMESPACE_FILE))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fabedge".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Settings;

    #[test]
    fn only_a_vxlan_agent_with_cluster_prefixes_narrows_its_node_watches() {
        let prefixes = vec!["10.0.0.0/8".parse().unwrap()];
        let vxlan = Settings {
            cluster_prefixes: prefixes.clone(),
            ..Settings::default()
        };
        assert_eq!(
            node_view("edge-1", &vxlan),
            NodeView::OwnCommunity {
                me: "edge-1".into(),
                role_override: None
            }
        );
        assert_eq!(node_view("edge-1", &Settings::default()), NodeView::All);
        let esp = Settings {
            cluster_prefixes: prefixes,
            tunnel_mode: TunnelMode::Esp,
            ..Settings::default()
        };
        assert_eq!(node_view("edge-1", &esp), NodeView::All);
    }
}
