//! What the running agent tells the outside: Prometheus metrics on
//! `/metrics`, liveness on `/healthz` and readiness on `/readyz`
//! (`run --metrics-addr`).
//!
//! The server runs on its own thread with its own small runtime, so a slow
//! scrape never delays the reconcile loop and a stuck loop is still
//! reported. Everything is read when scraped (maps, xfrm SAs); the loop
//! only records what it alone knows — when it last turned, when and how
//! its last apply ended — in a [`Status`] the two share.

mod http;
pub mod metrics;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use log::info;

use crate::{datapath::PinLayout, plan::PeerIds};

pub use http::{Handler, Response, serve};

/// Port of `run --metrics-addr` in `deploy/`. The agent runs in the node's
/// network namespace, so the port must not meet any common node daemon:
/// node-exporter (9100), kubelet (10250), kube-proxy (10249/10256),
/// Calico (9091/9099), Cilium (9962-9965), Prometheus itself (9090), nor
/// our own tunnels (4500, 8472, 8475).
pub const DEFAULT_METRICS_PORT: u16 = 9476;

/// `/healthz` fails when the reconcile loop has not turned for this long.
/// The loop turns at least every `--poll-interval`, but one turn may wait
/// on an API call (kube-client gives a write up after 295 s); only a loop
/// silent for longer than that is called stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(300);

/// What the reconcile loop shares with the metrics server.
pub struct Status {
    stuck_after: Duration,
    inner: Mutex<StatusInner>,
}

#[derive(Clone, Default)]
struct StatusInner {
    last_turn: Option<Instant>,
    last_apply: Option<ApplyRecord>,
    applies_ok: u64,
    applies_failed: u64,
    /// A plan has been applied since the agent started (readiness).
    applied_once: bool,
    plan_warnings: usize,
    /// Objects left out of the last plan (`inspect problems`).
    problems: usize,
    peer_ids: PeerIds,
    /// ESP mode: the node's current key generation.
    esp_generation: Option<u32>,
    /// Connector liveness as the probes see it.
    ha: Option<crate::run::ha::HaStatus>,
}

#[derive(Clone)]
struct ApplyRecord {
    duration: Duration,
    finished: SystemTime,
    /// `None`: success; else the error, as logged.
    error: Option<String>,
}

/// A copy of [`Status`] taken for one scrape.
#[derive(Clone, Default)]
pub struct StatusSnapshot {
    pub applies_ok: u64,
    pub applies_failed: u64,
    pub applied_once: bool,
    /// Duration, end (Unix seconds) and success of the last apply.
    pub last_apply: Option<(Duration, f64, bool)>,
    pub plan_warnings: usize,
    pub problems: usize,
    pub peer_ids: PeerIds,
    pub esp_generation: Option<u32>,
    pub ha: Option<crate::run::ha::HaStatus>,
}

impl Status {
    pub fn new(stuck_after: Duration) -> Arc<Self> {
        Arc::new(Status {
            stuck_after,
            inner: Mutex::new(StatusInner {
                last_turn: Some(Instant::now()),
                ..StatusInner::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        // The data stays consistent field by field; a panic elsewhere must
        // not take the probes down with it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reconcile loop is alive: called once per turn.
    pub fn turned(&self) {
        self.lock().last_turn = Some(Instant::now());
    }

    /// An apply ended after `duration`; `error` is its message if it failed.
    pub fn applied(&self, duration: Duration, error: Option<String>) {
        let mut inner = self.lock();
        if error.is_none() {
            inner.applies_ok += 1;
            inner.applied_once = true;
        } else {
            inner.applies_failed += 1;
        }
        inner.last_apply = Some(ApplyRecord {
            duration,
            finished: SystemTime::now(),
            error,
        });
    }

    /// What the last plan says that only the plan knows.
    pub fn planned(&self, warnings: usize, peer_ids: &PeerIds, esp_generation: Option<u32>) {
        let mut inner = self.lock();
        inner.plan_warnings = warnings;
        if inner.peer_ids != *peer_ids {
            inner.peer_ids = peer_ids.clone();
        }
        inner.esp_generation = esp_generation;
    }

    /// Connector liveness, as the run loop last saw it.
    pub fn ha(&self, status: crate::run::ha::HaStatus) {
        self.lock().ha = Some(status);
    }

    /// How many objects the last pass left out.
    pub fn problems(&self, count: usize) {
        self.lock().problems = count;
    }

    /// `Err(why)` when the loop has not turned within the stuck limit.
    pub fn health(&self) -> Result<(), String> {
        let silent = self.lock().last_turn.map_or(Duration::MAX, |t| t.elapsed());
        if silent > self.stuck_after {
            return Err(format!(
                "the reconcile loop has not turned for {}s (limit {}s)",
                silent.as_secs(),
                self.stuck_after.as_secs()
            ));
        }
        Ok(())
    }

    /// `Err(why)` until a plan has been applied.
    pub fn readiness(&self) -> Result<(), String> {
        let inner = self.lock();
        if inner.applied_once {
            return Ok(());
        }
        Err(
            match inner.last_apply.as_ref().and_then(|a| a.error.as_deref()) {
                Some(error) => format!("no plan applied yet; the last attempt failed: {error}"),
                None => "no plan applied yet".to_owned(),
            },
        )
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let inner = self.lock();
        StatusSnapshot {
            applies_ok: inner.applies_ok,
            applies_failed: inner.applies_failed,
            applied_once: inner.applied_once,
            last_apply: inner.last_apply.as_ref().map(|a| {
                let end = a
                    .finished
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                (a.duration, end, a.error.is_none())
            }),
            plan_warnings: inner.plan_warnings,
            problems: inner.problems,
            peer_ids: inner.peer_ids.clone(),
            esp_generation: inner.esp_generation,
            ha: inner.ha.clone(),
        }
    }
}

/// Where the metrics are read from.
#[derive(Clone)]
pub struct Sources {
    pub layout: PinLayout,
    /// ESP mode: the agent's state dir (xfrm SAs are read and named from it).
    pub esp_state_dir: Option<PathBuf>,
    pub status: Arc<Status>,
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `address` from a thread of
/// their own. Binding happens here, so a taken port fails the start.
pub fn start(address: SocketAddr, sources: Sources) -> Result<SocketAddr> {
    let status = sources.status.clone();
    let handler = Handler {
        metrics: Box::new(move || metrics::render(&sources)),
        health: Box::new({
            let status = status.clone();
            move || status.health()
        }),
        readiness: Box::new(move || status.readiness()),
    };
    let bound = serve(address, handler).with_context(|| {
        format!("serving metrics on {address} (--metrics-addr): is the port taken? pick another")
    })?;
    info!("metrics on http://{bound}/metrics, probes on /healthz and /readyz");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_a_successful_apply_and_says_why_not() {
        let status = Status::new(STUCK_AFTER);
        assert_eq!(status.readiness(), Err("no plan applied yet".to_owned()));
        status.applied(
            Duration::from_millis(3),
            Some("node edge-1: no InternalIP".into()),
        );
        assert_eq!(
            status.readiness(),
            Err("no plan applied yet; the last attempt failed: node edge-1: no InternalIP".into())
        );
        status.applied(Duration::from_millis(2), None);
        assert_eq!(status.readiness(), Ok(()));
        // A later failure keeps the datapath (and readiness) as it was.
        status.applied(Duration::from_millis(2), Some("boom".into()));
        assert_eq!(status.readiness(), Ok(()));
        let snapshot = status.snapshot();
        assert_eq!((snapshot.applies_ok, snapshot.applies_failed), (1, 2));
        assert_eq!(snapshot.last_apply.map(|a| a.2), Some(false));
    }

    #[test]
    fn unhealthy_when_the_loop_stops_turning() {
        let status = Status::new(Duration::from_millis(20));
        assert_eq!(status.health(), Ok(()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while status.health().is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let why = status.health().unwrap_err();
        assert!(why.contains("has not turned"), "{why}");
        status.turned();
        assert_eq!(status.health(), Ok(()));
    }
}
