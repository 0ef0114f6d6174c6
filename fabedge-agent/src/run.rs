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
    apply::{Applier, net},
    datapath::{AttachMode, Datapath, PinLayout, XdpMode},
    maps::Maps,
    model::parse_mac,
    plan::{PeerIds, Plan, Settings, plan},
    source::{manifest, watch as manifest_watch},
    sys::write_if_changed,
};

pub mod ha;
pub mod handover;
mod kube_mode;
pub mod problems;
mod slices;

pub use kube_mode::{KubeOptions, default_namespace};

/// The first and the longest wait before an unchanged, failing manifest is tried again.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

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
    /// How long a drastic change is held back (see [`Guard`]); zero: never.
    pub hold_drastic_changes: Duration,
    /// Connector liveness: probe timers.
    pub ha: HaOptions,
    /// Edge: the cgroup v2 directory whose sockets (hostNetwork pods, the
    /// node's own processes) get Service translation; `None`: none.
    pub cgroup: Option<PathBuf>,
    /// ESP mode's timers (`None` in VXLAN mode).
    pub esp: Option<crate::esp::run::EspOptions>,
    /// Serve Prometheus metrics and the probes here (`None`: not at all).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Probe timers of connector high availability (`--probe-interval`,
/// `--probe-misses`, `--hold-down`).
#[derive(Debug, Clone, Copy)]
pub struct HaOptions {
    pub probe_interval: Duration,
    pub probe_misses: u32,
    pub hold_down: Duration,
}

impl Default for HaOptions {
    fn default() -> Self {
        HaOptions {
            probe_interval: Duration::from_millis(100),
            probe_misses: 3,
            hold_down: Duration::from_secs(10),
        }
    }
}

pub async fn run(options: RunOptions) -> Result<()> {
    // First of all, in ESP mode: hold UDP 4500, beside the agent we replace
    // if it still runs. While no socket holds it, ESP in UDP is refused by
    // the kernel.
    let encap = match &options.esp {
        Some(_) => Some(
            handover::bind_when_free("UDP 4500 for ESP in UDP", || {
                Ok(crate::esp::natt::EncapSocket::bind()?)
            })
            .await?,
        ),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // Then wait until the agent we replace has gone: one agent applies.
    let holds = if encap.is_some() {
        "UDP 4500 held beside it"
    } else {
        "nothing to hold in VXLAN mode"
    };
    let stop = async {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    let Some(_lock) = handover::wait_for_turn(&options.state_dir, holds, stop).await? else {
        return Ok(());
    };
    let mut reconciler = Reconciler::new(&options, encap)?;
    // Before the datapath loads: probes answer (not ready yet) at once. Not
    // before our turn: a standby serves nothing, and until it takes over the
    // agent it replaces (which holds the port) answers the node's probes.
    if let Some(address) = options.metrics_addr {
        handover::bind_when_free("the metrics port", || {
            crate::observe::start(
                address,
                crate::observe::Sources {
                    layout: options.layout.clone(),
                    esp_state_dir: options.esp.as_ref().map(|_| options.state_dir.clone()),
                    status: reconciler.status.clone(),
                },
            )
        })
        .await?;
    }
    let mut hellos = match &reconciler.esp {
        Some(esp) => Some(esp.hello_readiness()?),
        None => None,
    };
    // Before anything is loaded or pinned: a start that cannot find its
    // source (no kubeconfig, not in a pod) fails without leaving a trace.
    let kube_client = match &options.kube {
        Some(kube) => Some(crate::source::kube::client(&kube.connection).await?),
        None => None,
    };
    // The watches list the cluster while the programs load (the verifier
    // takes a good part of a second): on its own thread, so that this one
    // runs the watches meanwhile.
    let source = kube_client
        .as_ref()
        .map(|client| kube_mode::start_source(&options, client.clone()));
    let (layout, attach_mode, capacity) = (
        options.layout.clone(),
        options.attach_mode,
        options.settings.capacity,
    );
    let load = move || Datapath::load_with_capacity(layout, attach_mode, capacity);
    // (Not in file mode, where nothing runs meanwhile: a thread of its own
    // would leave its arena's pages to the agent.)
    let mut datapath = match source {
        Some(_) => tokio::task::spawn_blocking(load)
            .await
            .context("loading the datapath")??,
        None => load()?,
    };
    let logger = datapath.init_kernel_logs();
    let mut maps = Maps::open(&options.layout)?;
    // Before any XDP program is attached: cached XDP verdicts follow the
    // kernel's routes and neighbours from the first frame on.
    let _xdp_epoch_watch = match &maps.xdp_epoch {
        Some(epoch) => Some(crate::datapath::xdp_epoch::watch_kernel(
            epoch.try_clone()?,
        )?),
        None => None,
    };
    info!(
        "fabedge-agent running for node {} ({:?} attach)",
        options.node,
        datapath.attach_mode()
    );

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
    if let (Some(client), Some(source)) = (kube_client, source) {
        let result = kube_mode::run(
            &options,
            (client, source),
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
    // Changes to the file are seen at once; without inotify, at the next tick.
    let mut file_watch = match manifest_watch::DirWatch::new(&options.manifests) {
        Ok(watch) => Some(watch),
        Err(e) => {
            warn!(
                "{e:#}: changes to {} are seen at the next poll (--poll-interval {:?})",
                options.manifests.display(),
                options.poll_interval
            );
            None
        }
    };
    let mut tick = tokio::time::interval(options.poll_interval);
    let mut ct_gc = tokio::time::interval(crate::services::ctgc::INTERVAL);
    let mut ha_changes = None;
    loop {
        reconciler.status.turned();
        if ha_changes.is_none() {
            ha_changes = reconciler.ha.changes();
        }
        tokio::select! {
            _ = tick.tick() => {
                reconciler.reconcile_if_changed(&mut datapath, &mut maps, &options);
                reconciler.restore_routes();
                reconciler.guard_pod_ports(&mut datapath, &mut maps);
                if reconciler.esp_tick(&mut maps) {
                    reconciler.force_replan();
                }
                // Hold-downs end without a probe event.
                reconciler.ha.react(&mut maps);
                reconciler.read_buffer.let_go_when_idle();
            }
            // A connector went up or down: fail over now, not at the next tick.
            changed = async { ha_changes.as_mut().expect("guarded").changed().await }, if ha_changes.is_some() => {
                if changed.is_ok() {
                    reconciler.ha.react(&mut maps);
                }
            }
            changed = async { file_watch.as_mut().expect("guarded").changed().await }, if file_watch.is_some() => {
                match changed {
                    Ok(()) => reconciler.reconcile_if_changed(&mut datapath, &mut maps, &options),
                    Err(e) => {
                        warn!(
                            "{e:#}: changes to {} are seen at the next poll from now on",
                            options.manifests.display()
                        );
                        file_watch = None;
                    }
                }
            }
            _ = ct_gc.tick() => crate::services::ctgc::collect_and_log(&mut maps),
            // A hello: a peer's NAT mapping may have moved; follow it now,
            // not at the next tick.
            readable = async { hellos.as_mut().expect("guarded").readable_mut().await }, if hellos.is_some() => {
                if let Ok(mut guard) = readable {
                    if reconciler.esp_tick(&mut maps) {
                        reconciler.force_replan();
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

/// The buffer the manifest file is read into. While the file keeps
/// changing, one read reuses the last one's memory: a fresh buffer the
/// size of the file (12 MB at 10 k Services) costs a page fault per 4 KiB
/// on every change, about a third of its time. [`ReadBuffer::IDLE`] after
/// the last read it is let go, so an agent whose file rests holds no copy
/// of it.
#[derive(Default)]
struct ReadBuffer {
    kept: Option<(String, std::time::Instant)>,
}

impl ReadBuffer {
    const IDLE: Duration = Duration::from_secs(2);

    /// The text of the file at `path`, read into the kept buffer if any.
    fn read(&mut self, path: &std::path::Path) -> std::io::Result<String> {
        use std::io::Read;
        let mut text = self.kept.take().map(|(text, _)| text).unwrap_or_default();
        text.clear();
        std::fs::File::open(path)?.read_to_string(&mut text)?;
        Ok(text)
    }

    /// Keep `text`'s memory for the next read.
    fn keep(&mut self, text: String) {
        self.kept = Some((text, std::time::Instant::now()));
    }

    /// Let the buffer go once it has rested [`ReadBuffer::IDLE`].
    fn let_go_when_idle(&mut self) {
        if self
            .kept
            .as_ref()
            .is_some_and(|(_, used)| used.elapsed() >= Self::IDLE)
        {
            self.kept = None;
        }
    }
}

/// The reconcile loop's memory between passes.
struct Reconciler {
    applier: Applier,
    peer_ids: PeerIds,
    peer_ids_path: PathBuf,
    /// The manifest text last applied successfully, as its fingerprint:
    /// enough to tell an unchanged text and the EndpointSlice shortcut's
    /// edits, where the text itself (12 MB at 10 k Services) would stay
    /// resident between passes.
    applied_text: Option<manifest::Fingerprint>,
    /// What the last full pass over `applied_text` applied, patched by the
    /// EndpointSlice shortcut since (file mode).
    file_applied: Option<slices::Applied>,
    /// What the manifest file is read into, kept while it keeps changing.
    read_buffer: ReadBuffer,
    /// The manifest file's stamp when it was last read: while it holds,
    /// the file is not read again.
    read_stamp: Option<manifest_watch::Stamp>,
    /// The manifest text whose last pass failed (its hash), and when to try
    /// it again: an unchanged file that fails is not re-parsed on every poll.
    failed_text: Option<(manifest::TextHash, std::time::Instant)>,
    retry_backoff: Duration,
    problems: problems::ProblemLog,
    guard: Guard,
    /// Why the last ESP (xfrm) apply failed, if it did.
    xfrm_failure: Option<crate::model::checks::Problem>,
    /// The last pass's problems from the source and the plan.
    plan_problems: Vec<crate::model::checks::Problem>,
    last_error: Option<String>,
    /// Whether the socket-level Service programs are attached to the cgroup.
    cgroup_attached: bool,
    esp: Option<crate::esp::run::EspRuntime>,
    /// What the metrics server and probes learn from the loop.
    status: std::sync::Arc<crate::observe::Status>,
    /// The pods' bridge ports guarded so far (edges).
    pod_ports: crate::apply::pod_ports::PodPorts,
    /// Connector liveness: probes, the edge's connector group, VTEP addresses.
    ha: ha::HaRuntime,
}

impl Reconciler {
    fn new(options: &RunOptions, encap: Option<crate::esp::natt::EncapSocket>) -> Result<Self> {
        let peer_ids_path = options.state_dir.join(crate::plan::PEER_IDS_FILE);
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
        let esp = match (&options.esp, encap) {
            (Some(esp_options), Some(socket)) => Some(crate::esp::run::EspRuntime::start(
                &options.state_dir,
                esp_options.clone(),
                socket,
            )?),
            (Some(_), None) => anyhow::bail!("ESP mode without its UDP 4500 socket"),
            (None, _) => None,
        };
        let status = crate::observe::Status::new(crate::observe::STUCK_AFTER);
        status.planned(0, &peer_ids, None);
        let ha = ha::HaRuntime::new(options.ha, &options.node, &options.state_dir)
            .with_metrics(status.clone());
        Ok(Reconciler {
            status,
            pod_ports: Default::default(),
            applier: Applier::with_xdp(options.xdp).recording_sysctls_in(&options.state_dir),
            peer_ids,
            peer_ids_path,
            applied_text: None,
            file_applied: None,
            read_stamp: None,
            read_buffer: ReadBuffer::default(),
            failed_text: None,
            retry_backoff: RETRY_MIN,
            problems: problems::ProblemLog::new(&options.state_dir),
            guard: Guard::default(),
            xfrm_failure: None,
            plan_problems: Vec::new(),
            last_error: None,
            cgroup_attached: false,
            esp,
            ha,
        })
    }

    /// ESP timers (keepalives, hellos, rotation). True when a new key
    /// generation began (the caller re-plans so it is published and used)
    /// or a peer's NAT-observed endpoint changed (the plan follows it).
    pub(crate) fn esp_tick(&mut self, maps: &mut Maps) -> bool {
        let Some(esp) = &mut self.esp else {
            return false;
        };
        let mut let_in_failed = false;
        let let_in =
            |plan: &Plan, senders: &std::collections::BTreeMap<std::net::Ipv4Addr, u16>| {
                let written = maps
                    .sync_peer_addrs(&plan.peers, senders)
                    .map(drop)
                    .context("letting ESP in from where a peer's NAT now shows it (FE_PEER_ADDRS)");
                let_in_failed = written.is_err();
                written
            };
        match esp.tick(let_in) {
            Ok(new_generation) => new_generation,
            Err(e) => {
                self.report(Err(e.context("ESP")));
                // The hello is learnt, its SAs not moved: the full pass
                // (retried as any failed one) writes both.
                let_in_failed
            }
        }
    }

    fn reconcile_if_changed(
        &mut self,
        datapath: &mut Datapath,
        maps: &mut Maps,
        options: &RunOptions,
    ) {
        let now = std::time::Instant::now();
        let stamp = match manifest_watch::Stamp::of(&options.manifests) {
            Ok(stamp) => stamp,
            Err(e) => {
                return self.report(
                    Err(e).with_context(|| format!("reading {}", options.manifests.display())),
                );
            }
        };
        // Nothing to read while the file is as last read, unless a pass is
        // due anyway: a re-plan was asked for, or a failed one's retry.
        let replan = self.applied_text.is_none() && self.failed_text.is_none();
        let retry_due = matches!(&self.failed_text, Some((_, at)) if now >= *at);
        if self.read_stamp == Some(stamp) && !replan && !retry_due {
            return;
        }
        self.read_stamp = Some(stamp);
        let text = match self.read_buffer.read(&options.manifests) {
            Ok(text) => text,
            Err(e) => {
                return self.report(
                    Err(e).with_context(|| format!("reading {}", options.manifests.display())),
                );
            }
        };
        let pages = manifest::PageHashes::of(&text);
        if self.applied_text.as_ref().map(manifest::Fingerprint::text) == Some(pages.text()) {
            return self.read_buffer.keep(text);
        }
        if let Some((failed, retry_at)) = &self.failed_text
            && *failed == pages.text()
            && now < *retry_at
        {
            return self.read_buffer.keep(text);
        }
        if let Some(fingerprint) = self.patch_file_slices(&text, &pages, maps) {
            self.status.applied(now.elapsed(), None);
            self.applied_text = Some(fingerprint);
            self.report(Ok(()));
            return self.read_buffer.keep(text);
        }
        let text_hash = pages.text();
        let result = self.reconcile(&text, pages, datapath, maps, options);
        // Not kept after a full pass (which is rare): its fingerprint is
        // (below).
        drop(text);
        self.status.applied(
            now.elapsed(),
            result.as_ref().err().map(|e| format!("{e:#}")),
        );
        let result = match result {
            Ok(fingerprint) => {
                // Our own write-back needs no second pass: the next read
                // finds the text as written, whose fingerprint is the one
                // applied. That read is not skipped by taking the file's
                // stamp now: another agent's write-back landing between ours
                // and that stamp would be taken for ours and never read.
                self.applied_text = Some(fingerprint);
                self.failed_text = None;
                self.retry_backoff = RETRY_MIN;
                Ok(())
            }
            Err(e) => {
                // Transient causes (a device not there yet) clear by
                // themselves: retry, but ever less often, until the file changes.
                self.failed_text = Some((text_hash, now + self.retry_backoff));
                self.retry_backoff = (self.retry_backoff * 2).min(RETRY_MAX);
                Err(e)
            }
        };
        self.report(result);
        crate::sys::release_free_memory();
    }

    /// What this pass left out: objects the checks refused and Services the
    /// plan could not fit.
    fn record_problems(
        &mut self,
        mut problems: Vec<crate::model::checks::Problem>,
        plan: Option<&Plan>,
    ) {
        if let Some(plan) = plan {
            problems.extend(plan.services.skipped.iter().cloned());
        }
        if let Some(held) = self.guard.held_problem() {
            problems.push(held);
        }
        self.plan_problems = problems;
        self.publish_problems();
    }

    /// The problem list: the last pass's, plus what apply met (route
    /// conflicts, a failed step), which may change between passes.
    fn publish_problems(&mut self) {
        let mut problems = self.plan_problems.clone();
        problems.extend(self.applier.problems());
        problems.extend(self.xfrm_failure.clone());
        self.problems.update(problems);
        self.status.problems(self.problems.count());
    }

    /// Put back our kernel routes that were deleted behind our back: an
    /// unchanged plan is not applied again, so this check runs on every tick
    /// (a periodic dump rather than a netlink monitor: it is bounded by the
    /// poll interval, needs no second socket, and cannot miss a deletion
    /// the way a monitor overrunning its buffer can). Logged once per route
    /// restored.
    pub(crate) fn restore_routes(&mut self) {
        match self.applier.restore_routes() {
            Ok(restored) => {
                for route in &restored {
                    warn!("{route} was removed outside fabedge: restored");
                }
                // A route taken over meanwhile is a conflict now.
                self.publish_problems();
            }
            Err(e) => self.report(Err(e)),
        }
    }

    /// Guard new pods' bridge ports, release vanished ones (see
    /// `apply::pod_ports`): on every tick, outside the plan's apply.
    pub(crate) fn guard_pod_ports(&mut self, datapath: &mut Datapath, maps: &mut Maps) {
        if let Err(e) = self.pod_ports.sync(datapath, maps) {
            self.report(Err(e.context("guarding the pods' bridge ports")));
        }
    }

    /// Plan and apply again at the next poll, whatever the file holds (a new
    /// key generation must be published).
    fn force_replan(&mut self) {
        self.applied_text = None;
        self.failed_text = None;
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

    /// A full pass over `text` (its page hashes: `pages`). `Ok`: the
    /// fingerprint of the text as this pass left the file (with the
    /// annotations it wrote back, if it did).
    fn reconcile(
        &mut self,
        text: &str,
        pages: manifest::PageHashes,
        datapath: &mut Datapath,
        maps: &mut Maps,
        options: &RunOptions,
    ) -> Result<manifest::Fingerprint> {
        let settings = observe_host(&options.settings, &options.flannel_iface)?;
        let cidr = options.settings.service_cidr;
        let parsed = crate::sys::apart(|| manifest::checked_noting_slices(text, cidr))
            .with_context(|| options.manifests.display().to_string())?;
        // Kept as a copy made on this thread; the original goes with the
        // parsing thread's arena (`sys::apart`).
        let (checked, lone_slices) = (
            crate::source::Checked {
                snapshot: parsed.0.snapshot.unshared(),
                problems: parsed.0.problems.clone(),
            },
            parsed.1.clone(),
        );
        drop(parsed);
        let fingerprint = manifest::Fingerprint::new(text, pages, &lone_slices);
        drop(lone_slices);
        self.file_applied = None;
        let plan = self.plan_and_apply(&checked.snapshot, &settings, datapath, maps, options);
        self.record_problems(checked.problems, plan.as_ref().ok());
        let plan = plan?;
        let written = write_annotations(&options.manifests, text, &plan)?;
        self.file_applied = Some(slices::Applied {
            snapshot: checked.snapshot,
            services: plan.services,
        });
        Ok(match written {
            Some(written) => fingerprint.rewritten(&written),
            None => fingerprint,
        })
    }

    /// The EndpointSlice shortcut in file mode ([`slices`]): when `text`
    /// (its page hashes: `pages`) differs from the text applied last in
    /// EndpointSlice documents alone, each keeping its name, and those were
    /// applied, the fingerprint of `text`.
    fn patch_file_slices(
        &mut self,
        text: &str,
        pages: &manifest::PageHashes,
        maps: &mut Maps,
    ) -> Option<manifest::Fingerprint> {
        if self.last_error.is_some() || self.failed_text.is_some() {
            return None;
        }
        let (Some(applied_text), Some(applied)) = (&self.applied_text, &mut self.file_applied)
        else {
            return None;
        };
        let edits = applied_text.slice_edits(text, pages)?;
        // A problem of a later document would name a line that moved.
        if edits.lines_moved && !self.plan_problems.is_empty() {
            return None;
        }
        // Each slice IPv4 before and after (another address type changes
        // what the checks see).
        let changes = edits.changes(&applied.snapshot)?;
        let changes = changes
            .into_iter()
            .map(|(key, slice)| (key, Some(std::sync::Arc::new(slice))))
            .collect();
        if !applied.patch(&mut self.applier, maps, changes) {
            self.file_applied = None;
            return None;
        }
        Some(edits.fingerprint)
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
        let mut plan = plan(snapshot, &options.node, settings, &self.peer_ids)?;
        for warning in &plan.warnings {
            warn!("{warning}");
        }
        self.guard.check(&plan, options.hold_drastic_changes)?;
        self.ha.prepare(&mut plan, maps)?;
        self.applier.apply(datapath, maps, &plan, settings)?;
        self.guard.applied(&plan);
        self.ha.applied(maps);
        self.status.planned(
            plan.warnings.len(),
            &plan.peer_ids,
            self.esp.as_ref().map(|_| settings.esp_generation),
        );
        let new_generation = match self.esp.as_mut().map(|esp| esp.apply(snapshot, &plan)) {
            None => false,
            Some(Ok(new_generation)) => {
                self.xfrm_failure = None;
                new_generation
            }
            // Not rolled back: putting back an SA removed midway would restart
            // its sequence counter under the same key (AES-GCM nonce reuse).
            // XfrmApplier replaces make-before-break, and the next pass retries.
            Some(Err(e)) => {
                self.xfrm_failure = Some(crate::model::checks::Problem::new(
                    "apply (step xfrm)",
                    format!("{e:#}"),
                ));
                return Err(e);
            }
        };
        if new_generation {
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

/// Holds back a plan that would take down most of what this node forwards —
/// every tunnel, or more than half of the routes — for a grace period, with
/// a loud error and a problem entry; after the grace it applies. One typo
/// (a connector label removed, a truncated file) then costs a warning, not
/// every tunnel of the fleet at the next poll.
#[derive(Default)]
struct Guard {
    /// Tunnel peers and routes of the plan last applied.
    applied: Option<(usize, usize)>,
    /// The drastic change being held, and since when.
    held: Option<(String, std::time::Instant)>,
}

/// Fewer routes than this are too few to call a drop "most of them".
const GUARD_MIN_ROUTES: usize = 4;

impl Guard {
    fn size(plan: &Plan) -> (usize, usize) {
        let tunnels = plan
            .peers
            .values()
            .filter(|p| p.kind == fabedge_common::peer_kind::TUNNEL)
            .count();
        (tunnels, plan.routes.len())
    }

    fn check(&mut self, plan: &Plan, grace: Duration) -> Result<()> {
        let Some((tunnels_before, routes_before)) = self.applied else {
            return Ok(());
        };
        let (tunnels, routes) = Self::size(plan);
        let drastic = if tunnels_before > 0 && tunnels == 0 {
            Some(format!(
                "remove every tunnel of this node ({tunnels_before} peers)"
            ))
        } else if routes_before >= GUARD_MIN_ROUTES && routes * 2 < routes_before {
            Some(format!(
                "remove {} of its {routes_before} routes",
                routes_before - routes
            ))
        } else {
            None
        };
        let Some(change) = drastic.filter(|_| !grace.is_zero()) else {
            self.held = None;
            return Ok(());
        };
        match &self.held {
            Some((held, since)) if *held == change && since.elapsed() >= grace => {
                warn!("applying the held-back change now ({change}): it stayed for {grace:?}");
                self.held = None;
                Ok(())
            }
            Some((held, _)) if *held == change => Err(self.held_error(grace)),
            _ => {
                self.held = Some((change, std::time::Instant::now()));
                Err(self.held_error(grace))
            }
        }
    }

    fn held_error(&self, grace: Duration) -> anyhow::Error {
        let change = self.held.as_ref().map_or("", |(c, _)| c.as_str());
        anyhow::anyhow!(
            "held back: the new plan would {change}; if that is intended it applies by itself once it has \
             stayed {grace:?} (run with --hold-drastic-changes 0 to apply such changes at once)"
        )
    }

    fn applied(&mut self, plan: &Plan) {
        self.applied = Some(Self::size(plan));
    }

    fn held_problem(&self) -> Option<crate::model::checks::Problem> {
        self.held.as_ref().map(|(change, _)| {
            crate::model::checks::Problem::new("plan", format!("held back: it would {change}"))
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest::{EXAMPLE_CLUSTER, snapshot};

    #[test]
    fn the_read_buffer_is_reused_while_the_file_changes_and_let_go_when_it_rests() {
        let dir = std::env::temp_dir().join(format!("fabedge-read-buffer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.yaml");
        std::fs::write(&path, "a".repeat(100_000)).unwrap();
        let mut buffer = ReadBuffer::default();
        let first = buffer.read(&path).unwrap();
        let memory = first.as_ptr();
        buffer.keep(first);
        std::fs::write(&path, "b".repeat(90_000)).unwrap();
        let second = buffer.read(&path).unwrap();
        assert_eq!(
            second,
            "b".repeat(90_000),
            "the new text, nothing of the old"
        );
        assert_eq!(second.as_ptr(), memory, "read into the kept memory");
        buffer.keep(second);
        buffer.let_go_when_idle();
        assert!(buffer.kept.is_some(), "just used");
        let (text, _) = buffer.kept.take().unwrap();
        let long_ago = std::time::Instant::now() - ReadBuffer::IDLE;
        buffer.kept = Some((text, long_ago));
        buffer.let_go_when_idle();
        assert!(buffer.kept.is_none(), "rested: let go");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn edge_plan() -> Plan {
        let snapshot = snapshot(EXAMPLE_CLUSTER).unwrap();
        plan(&snapshot, "edge-1", &Settings::default(), &PeerIds::new()).unwrap()
    }

    #[test]
    fn a_plan_without_tunnels_is_held_for_the_grace_then_applied() {
        let grace = Duration::from_millis(200);
        let before = edge_plan();
        let mut guard = Guard::default();
        guard
            .check(&before, grace)
            .expect("the first plan is never held");
        guard.applied(&before);

        let mut after = before.clone();
        after
            .peers
            .retain(|_, p| p.kind != fabedge_common::peer_kind::TUNNEL);
        let err = guard.check(&after, grace).unwrap_err().to_string();
        assert!(
            err.starts_with("held back: the new plan would remove every tunnel"),
            "{err}"
        );
        assert!(guard.held_problem().is_some());
        // Still held before the grace, whatever the number of passes.
        assert!(guard.check(&after, grace).is_err());
        std::thread::sleep(grace);
        guard.check(&after, grace).expect("applied after the grace");
        assert!(guard.held_problem().is_none());
    }

    #[test]
    fn losing_most_routes_is_held_and_zero_grace_applies_at_once() {
        let before = edge_plan();
        assert!(
            before.routes.len() >= GUARD_MIN_ROUTES,
            "{:?}",
            before.routes
        );
        let mut guard = Guard::default();
        guard.applied(&before);
        let mut after = before.clone();
        let keep = before.routes.len() / 2 - 1;
        after.routes = before.routes.clone().into_iter().take(keep).collect();
        let err = guard
            .check(&after, Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("remove {} of its", before.routes.len() - keep)),
            "{err}"
        );
        guard
            .check(&after, Duration::ZERO)
            .expect("no hold with zero grace");
        // A small change is never held.
        let mut small = before.clone();
        small.routes.pop_first();
        guard.check(&small, Duration::from_secs(60)).unwrap();
    }
}
