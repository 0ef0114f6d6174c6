//! `fabedge-agent run`: keep this node's datapath equal to the plan of the
//! current cluster snapshot. Standalone mode reads a manifest file (changes
//! are picked up live) and writes the connector's annotations back into it.
//!
//! Stopping the agent (SIGTERM/SIGINT) leaves the datapath forwarding: maps
//! and links are pinned. The next start adopts them and re-applies by diff.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use log::{error, info, warn};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    apply::{Applier, net, write_if_changed},
    datapath::{AttachMode, Datapath, PinLayout, XdpMode},
    maps::Maps,
    model::parse_mac,
    plan::{PeerIds, Plan, Settings, plan},
    source::manifest,
};

pub mod esp;
mod kube_mode;

pub use kube_mode::{KubeOptions, default_namespace};

pub struct RunOptions {
    pub node: String,
    pub manifests: PathBuf,
    /// Kube mode (watch the API server) instead of the manifest file.
    pub kube: Option<KubeOptions>,
    pub settings: Settings,
    /// Flannel's VXLAN device, whose MAC the connector advertises.
    pub flannel_iface: String,
    pub layout: PinLayout,
    pub attach_mode: AttachMode,
    /// How `fe_xdp_uplink` goes on the uplinks (`--xdp`).
    pub xdp: XdpMode,
    /// Where the agent keeps state across restarts (peer ids).
    pub state_dir: PathBuf,
    pub poll_interval: Duration,
    /// Capacity of the Service conntrack table `FE_CT` (entries, two per flow).
    pub ct_entries: u32,
    /// Edge: the cgroup v2 directory whose sockets (hostNetwork pods, the
    /// node's own processes) get Service translation; `None`: none.
    pub cgroup: Option<PathBuf>,
    /// ESP mode's timers (`None` in VXLAN mode).
    pub esp: Option<esp::EspOptions>,
}

pub async fn run(options: RunOptions) -> Result<()> {
    // First of all, in ESP mode: hold UDP 4500. While no socket holds it,
    // ESP in UDP arriving during a restart is refused by the kernel.
    let mut reconciler = Reconciler::new(&options)?;
    let mut hellos = match &reconciler.esp {
        Some(esp) => Some(esp.hello_readiness()?),
        None => None,
    };
    let mut datapath = Datapath::load_with_ct_entries(
        options.layout.clone(),
        options.attach_mode,
        options.ct_entries,
    )?;
    let logger = datapath.init_kernel_logs();
    let mut maps = Maps::open(&options.layout)?;
    info!(
        "fabedge-agent running for node {} ({:?} attach)",
        options.node,
        datapath.attach_mode()
    );

    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut logs = match logger {
        // SAFETY: the logger owns its ring fd and lives inside the AsyncFd,
        // so the fd stays open for as long as it is registered.
        Ok(logger) => Some(
            unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching the kernel log ring: {e}"))?,
        ),
        Err(e) => {
            warn!("kernel-side logs unavailable: {e:#}");
            None
        }
    };
    if options.kube.is_some() {
        let result = kube_mode::run(
            &options,
            &mut reconciler,
            &mut datapath,
            &mut maps,
            &mut logs,
            &mut hellos,
        )
        .await;
        info!("stopping; the datapath keeps forwarding (pinned maps and links)");
        return result;
    }
    let mut tick = tokio::time::interval(options.poll_interval);
    let mut ct_gc = tokio::time::interval(crate::ctgc::INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                reconciler.reconcile_if_changed(&mut datapath, &mut maps, &options);
                if reconciler.esp_tick() {
                    reconciler.applied_text = None;
                }
            }
            _ = ct_gc.tick() => crate::ctgc::collect_and_log(&mut maps),
            // A hello: a peer's NAT mapping may have moved; follow it now,
            // not at the next tick.
            readable = async { hellos.as_mut().expect("guarded").readable_mut().await }, if hellos.is_some() => {
                if let Ok(mut guard) = readable {
                    if reconciler.esp_tick() {
                        reconciler.applied_text = None;
                        reconciler.reconcile_if_changed(&mut datapath, &mut maps, &options);
                    }
                    guard.clear_ready();
                }
            }
            readable = async { logs.as_mut().expect("guarded").readable_mut().await }, if logs.is_some() => {
                if let Ok(mut guard) = readable {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!("stopping; the datapath keeps forwarding (pinned maps and links)");
    Ok(())
}

/// The reconcile loop's memory between passes.
struct Reconciler {
    applier: Applier,
    peer_ids: PeerIds,
    peer_ids_path: PathBuf,
    /// The manifest text last applied successfully.
    applied_text: Option<String>,
    last_error: Option<String>,
    /// Whether the socket-level Service programs are attached to the cgroup.
    cgroup_attached: bool,
    esp: Option<esp::EspRuntime>,
}

impl Reconciler {
    fn new(options: &RunOptions) -> Result<Self> {
        let peer_ids_path = options.state_dir.join("peer-ids.json");
        let peer_ids = match std::fs::read(&peer_ids_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(
                    "{} is unreadable ({e}); peer ids will be reassigned",
                    peer_ids_path.display()
                );
                PeerIds::new()
            }),
            Err(_) => PeerIds::new(),
        };
        let esp = match &options.esp {
            Some(esp_options) => Some(esp::EspRuntime::start(
                &options.state_dir,
                esp_options.clone(),
            )?),
            None => None,
        };
        Ok(Reconciler {
            applier: Applier::with_xdp(options.xdp),
            peer_ids,
            peer_ids_path,
            applied_text: None,
            last_error: None,
            cgroup_attached: false,
            esp,
        })
    }

    /// ESP timers (keepalives, hellos, rotation). True when a new key
    /// generation began: the caller re-plans so it is published and used.
    pub(crate) fn esp_tick(&mut self) -> bool {
        let Some(esp) = &mut self.esp else {
            return false;
        };
        match esp.tick() {
            Ok(new_generation) => new_generation,
            Err(e) => {
                self.report(Err(e.context("ESP")));
                false
            }
        }
    }

    fn reconcile_if_changed(
        &mut self,
        datapath: &mut Datapath,
        maps: &mut Maps,
        options: &RunOptions,
    ) {
        let text = match std::fs::read_to_string(&options.manifests) {
            Ok(text) => text,
            Err(e) => {
                return self.report(
                    Err(e).with_context(|| format!("reading {}", options.manifests.display())),
                );
            }
        };
        if self.applied_text.as_deref() == Some(text.as_str()) {
            return;
        }
        let result = self.reconcile(&text, datapath, maps, options);
        if let Ok(written) = &result {
            // Our own write-back needs no second pass.
            self.applied_text = Some(written.clone().unwrap_or(text));
        }
        self.report(result.map(drop));
    }

    /// Log an error once per distinct message; the datapath keeps its last good state.
    fn report(&mut self, result: Result<()>) {
        match result {
            Ok(()) => self.last_error = None,
            Err(e) => {
                let message = format!("{e:#}");
                if self.last_error.as_deref() != Some(message.as_str()) {
                    error!("{message} (keeping the last applied state; retrying)");
                    self.last_error = Some(message);
                }
            }
        }
    }

    /// `Ok(Some(text))`: the annotations were written back; `text` is the file now.
    fn reconcile(
        &mut self,
        text: &str,
        datapath: &mut Datapath,
        maps: &mut Maps,
        options: &RunOptions,
    ) -> Result<Option<String>> {
        let settings = observe_host(&options.settings, &options.flannel_iface)?;
        let snapshot =
            manifest::snapshot(text).with_context(|| options.manifests.display().to_string())?;
        let plan = self.plan_and_apply(&snapshot, &settings, datapath, maps, options)?;
        write_annotations(&options.manifests, text, &plan)
    }

    /// Plan `snapshot` for this node and apply it: the same for every source.
    fn plan_and_apply(
        &mut self,
        snapshot: &crate::model::Snapshot,
        observed: &Settings,
        datapath: &mut Datapath,
        maps: &mut Maps,
        options: &RunOptions,
    ) -> Result<Plan> {
        let mut settings = observed.clone();
        if let Some(esp) = &self.esp {
            esp.fill_settings(&mut settings);
        }
        let settings = &settings;
        let plan = plan(snapshot, &options.node, settings, &self.peer_ids)?;
        for warning in &plan.warnings {
            warn!("{warning}");
        }
        self.applier.apply(datapath, maps, &plan, settings)?;
        if let Some(esp) = &mut self.esp
            && esp.apply(snapshot, &plan)?
        {
            // A new generation: plan again so it is published and used.
            return self.plan_and_apply(snapshot, observed, datapath, maps, options);
        }
        if let Some(cgroup) = options
            .cgroup
            .as_deref()
            .filter(|_| plan.role == crate::model::Role::Edge && !self.cgroup_attached)
        {
            datapath.attach_cgroup(cgroup)?;
            self.cgroup_attached = true;
        }
        if plan.peer_ids != self.peer_ids {
            let json = serde_json::to_vec_pretty(&plan.peer_ids)?;
            write_if_changed(&self.peer_ids_path, &json, 0o600)?;
            self.peer_ids = plan.peer_ids.clone();
        }
        Ok(plan)
    }
}

/// Fill in what the plan needs from the host: the uplink's MTU, `flannel.1`'s MAC.
fn observe_host(configured: &Settings, flannel_iface: &str) -> Result<Settings> {
    let mut settings = configured.clone();
    if let Some(uplink) = &settings.uplink {
        let link =
            net::require_link(uplink).with_context(|| format!("uplink {uplink} (--uplink)"))?;
        settings.uplink_mtu = u16::try_from(link.mtu).unwrap_or(u16::MAX);
    }
    if settings.flannel_mac.is_none()
        && let Some(link) = net::link(flannel_iface)?
    {
        settings.flannel_mac = link.mac.as_deref().and_then(parse_mac);
    }
    Ok(settings)
}

/// Standalone mode: what the agent would patch onto Node objects goes into
/// the file. `Some(text)`: what the file holds after our write.
fn write_annotations(path: &Path, text: &str, plan: &Plan) -> Result<Option<String>> {
    if plan.annotations.is_empty() {
        return Ok(None);
    }
    let mut updated = text.to_owned();
    for patch in &plan.annotations {
        updated = manifest::set_node_annotations(&updated, &patch.node, &patch.set, &patch.remove)?;
        info!(
            "node {}: set {:?}, removed {:?}",
            patch.node,
            patch.set.keys().collect::<Vec<_>>(),
            patch.remove
        );
    }
    // The file may be edited concurrently: write only if it still holds what we planned from.
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        return Ok(None);
    }
    write_if_changed(path, updated.as_bytes(), 0o644)?;
    Ok(Some(updated))
}
