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
use tokio::{io::{Interest, unix::AsyncFd}, signal::unix::{SignalKind, signal}};

use crate::{
    apply::{Applier, net, write_if_changed},
    datapath::{AttachMode, Datapath, PinLayout},
    maps::Maps,
    model::parse_mac,
    plan::{PeerIds, Plan, Settings, plan},
    source::manifest,
};

pub mod esp;

pub struct RunOptions {
    pub node: String,
    pub manifests: PathBuf,
    pub settings: Settings,
    /// Flannel's VXLAN device, whose MAC the connector advertises.
    pub flannel_iface: String,
    pub layout: PinLayout,
    pub attach_mode: AttachMode,
    /// Where the agent keeps state across restarts (peer ids).
    pub state_dir: PathBuf,
    pub poll_interval: Duration,
    /// ESP mode's timers (`None` in VXLAN mode).
    pub esp: Option<esp::EspOptions>,
}

pub async fn run(options: RunOptions) -> Result<()> {
    let mut datapath = Datapath::load(options.layout.clone(), options.attach_mode)?;
    let logger = datapath.init_kernel_logs();
    let mut maps = Maps::open(&options.layout)?;
    let mut reconciler = Reconciler::new(&options)?;
    info!("fabedge-agent running for node {} ({:?} attach)", options.node, datapath.attach_mode());

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
    let mut tick = tokio::time::interval(options.poll_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                reconciler.reconcile_if_changed(&mut datapath, &mut maps, &options);
                reconciler.esp_tick();
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
    esp: Option<esp::EspRuntime>,
}

impl Reconciler {
    fn new(options: &RunOptions) -> Result<Self> {
        let peer_ids_path = options.state_dir.join("peer-ids.json");
        let peer_ids = match std::fs::read(&peer_ids_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!("{} is unreadable ({e}); peer ids will be reassigned", peer_ids_path.display());
                PeerIds::new()
            }),
            Err(_) => PeerIds::new(),
        };
        let esp = match &options.esp {
            Some(esp_options) => Some(esp::EspRuntime::start(&options.state_dir, esp_options.clone())?),
            None => None,
        };
        Ok(Reconciler { applier: Applier::default(), peer_ids, peer_ids_path, applied_text: None, last_error: None, esp })
    }

    /// ESP timers; a new generation re-plans everything on the next tick.
    fn esp_tick(&mut self) {
        let Some(esp) = &mut self.esp else { return };
        match esp.tick() {
            Ok(true) => self.applied_text = None,
            Ok(false) => {}
            Err(e) => self.report(Err(e.context("ESP"))),
        }
    }

    fn reconcile_if_changed(&mut self, datapath: &mut Datapath, maps: &mut Maps, options: &RunOptions) {
        let text = match std::fs::read_to_string(&options.manifests) {
            Ok(text) => text,
            Err(e) => return self.report(Err(e).with_context(|| format!("reading {}", options.manifests.display()))),
        };
        if self.applied_text.as_deref() == Some(text.as_str()) {
            return;
        }
        let result = self.reconcile(&text, datapath, maps, options);
        if result.is_ok() {
            self.applied_text = Some(text);
        }
        self.report(result);
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

    fn reconcile(&mut self, text: &str, datapath: &mut Datapath, maps: &mut Maps, options: &RunOptions) -> Result<()> {
        let mut settings = observe_host(&options.settings, &options.flannel_iface)?;
        if let Some(esp) = &self.esp {
            esp.fill_settings(&mut settings);
        }
        let snapshot = manifest::snapshot(text).with_context(|| options.manifests.display().to_string())?;
        let plan = plan(&snapshot, &options.node, &settings, &self.peer_ids)?;
        for warning in &plan.warnings {
            warn!("{warning}");
        }
        self.applier.apply(datapath, maps, &plan, &settings)?;
        if let Some(esp) = &mut self.esp
            && esp.apply(&snapshot, &plan)?
        {
            // A new generation: plan again so it is published and used.
            return self.reconcile(text, datapath, maps, options);
        }
        if plan.peer_ids != self.peer_ids {
            let json = serde_json::to_vec_pretty(&plan.peer_ids)?;
            write_if_changed(&self.peer_ids_path, &json, 0o600)?;
            self.peer_ids = plan.peer_ids.clone();
        }
        write_annotations(&options.manifests, text, &plan)
    }
}

/// Fill in what the plan needs from the host: the uplink's MTU, `flannel.1`'s MAC.
fn observe_host(configured: &Settings, flannel_iface: &str) -> Result<Settings> {
    let mut settings = configured.clone();
    if let Some(uplink) = &settings.uplink {
        let link = net::require_link(uplink).with_context(|| format!("uplink {uplink} (--uplink)"))?;
        settings.uplink_mtu = u16::try_from(link.mtu).unwrap_or(u16::MAX);
    }
    if settings.flannel_mac.is_none()
        && let Some(link) = net::link(flannel_iface)?
    {
        settings.flannel_mac = link.mac.as_deref().and_then(parse_mac);
    }
    Ok(settings)
}

/// Standalone mode: what the agent would patch onto Node objects goes into the file.
fn write_annotations(path: &Path, text: &str, plan: &Plan) -> Result<()> {
    if plan.annotations.is_empty() {
        return Ok(());
    }
    let mut updated = text.to_owned();
    for patch in &plan.annotations {
        updated = manifest::set_node_annotations(&updated, &patch.node, &patch.set, &patch.remove)?;
        info!("node {}: set {:?}, removed {:?}", patch.node, patch.set.keys().collect::<Vec<_>>(), patch.remove);
    }
    // The file may be edited concurrently: write only if it still holds what we planned from.
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        return Ok(());
    }
    write_if_changed(path, updated.as_bytes(), 0o644)
}
