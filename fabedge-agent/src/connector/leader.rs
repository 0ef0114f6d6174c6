//! Connector leader election over a `coordination.k8s.io/v1` Lease, so that
//! exactly one connector agent does the cluster-wide work (Flannel
//! annotations on edge Nodes, edge pod CIDR allocation).
//!
//! The Lease holds `holderIdentity`, `leaseDurationSeconds`, `acquireTime`,
//! `renewTime` and `leaseTransitions`. Every `renew_interval` each candidate
//! reads it: the holder renews it; the others take it over once it has not
//! changed for a whole lease duration *by their own clock* (the holder's
//! `renewTime` is not compared with ours, so clock skew between nodes does
//! not matter). Writes carry the resourceVersion that was read, so when two
//! candidates race the API server accepts one and answers 409 to the other.
//! A leader that cannot renew stops leading before its lease can expire
//! elsewhere.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};
use log::{info, warn};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The Lease's namespace (the agent's own, from the downward API).
    pub namespace: String,
    pub lease_name: String,
    /// This candidate (the node name: one connector agent per node).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
}

pub const DEFAULT_LEASE_NAME: &str = "fabedge-connector";

/// What a candidate does after reading the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No Lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Its holder stopped renewing (or released it): take it over.
    TakeOver,
    /// Someone else holds a live lease.
    Follow { holder: String },
}

/// The decision, pure: `stale` says whether the Lease has not changed for a
/// whole lease duration as this candidate observed it.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, stale: bool) -> Action {
    let Some(spec) = lease else {
        return Action::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => Action::Renew,
        None | Some("") => Action::TakeOver,
        Some(_) if stale => Action::TakeOver,
        Some(holder) => Action::Follow {
            holder: holder.to_owned(),
        },
    }
}

/// The spec a candidate writes when it (re)takes or renews the Lease.
pub fn claimed(
    previous: Option<&LeaseSpec>,
    me: &str,
    duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let renewing = previous.and_then(|p| p.holder_identity.as_deref()) == Some(me);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)),
        acquire_time: if renewing {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if renewing || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..previous.cloned().unwrap_or_default()
    }
}

/// Runs the election forever, publishing whether we lead on `leading`.
pub async fn run(api: Api<Lease>, config: ElectionConfig, leading: watch::Sender<bool>) {
    let mut observed: Option<(String, Instant)> = None;
    let mut last_renewed: Option<Instant> = None;
    let mut last_problem: Option<String> = None;
    let mut ticker = tokio::time::interval(config.renew_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match round(&api, &config, &mut observed).await {
            Ok(true) => {
                last_renewed = Some(Instant::now());
                last_problem = None;
            }
            Ok(false) => {
                last_renewed = None;
                last_problem = None;
            }
            Err(e) => {
                let message = e.to_string();
                if last_problem.as_deref() != Some(message.as_str()) {
                    warn!(
                        "leader election ({}/{}): {message}",
                        config.namespace, config.lease_name
                    );
                    last_problem = Some(message);
                }
            }
        }
        // Keep leading only while our last renewal is fresher than the lease
        // minus one renew interval: others take over only after a full duration.
        let deadline = config.lease_duration.saturating_sub(config.renew_interval);
        let lead = last_renewed.is_some_and(|t| t.elapsed() < deadline);
        leading.send_if_modified(|was| {
            if *was != lead {
                info!(
                    "{} {} lease {}/{}",
                    config.identity,
                    if lead {
                        "now holds the"
                    } else {
                        "no longer holds the"
                    },
                    config.namespace,
                    config.lease_name
                );
                *was = lead;
                true
            } else {
                false
            }
        });
    }
}

/// Gives the Lease up if we hold it (on shutdown, after the election task
/// stopped), so a follower takes over at its next look instead of after a
/// whole lease duration. `Ok(true)` when it was ours.
pub async fn release(api: &Api<Lease>, config: &ElectionConfig) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&config.lease_name).await? else {
        return Ok(false);
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(false);
    }
    // No holder: `decide` makes every candidate take it over.
    spec.holder_identity = None;
    api.replace(&config.lease_name, &PostParams::default(), &lease)
        .await?;
    info!(
        "{} released lease {}/{}",
        config.identity, config.namespace, config.lease_name
    );
    Ok(true)
}

/// One read-decide-write; `Ok(true)` when we hold the lease afterwards.
async fn round(
    api: &Api<Lease>,
    config: &ElectionConfig,
    observed: &mut Option<(String, Instant)>,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&config.lease_name).await?;
    let version = current
        .as_ref()
        .and_then(|l| l.metadata.resource_version.clone())
        .unwrap_or_default();
    let stale = match observed {
        Some((seen, since)) if *seen == version => since.elapsed() >= config.lease_duration,
        _ => {
            *observed = Some((version, Instant::now()));
            false
        }
    };
    let spec = current.as_ref().and_then(|l| l.spec.clone());
    let spec = spec.as_ref();
    let action = decide(spec, &config.identity, stale);
    let lease = |metadata: ObjectMeta| Lease {
        metadata,
        spec: Some(claimed(
            spec,
            &config.identity,
            config.lease_duration,
            Timestamp::now(),
        )),
    };
    let result = match &action {
        Action::Follow { .. } => return Ok(false),
        Action::Create => {
            let metadata = ObjectMeta {
                name: Some(config.lease_name.clone()),
                namespace: Some(config.namespace.clone()),
                ..Default::default()
            };
            api.create(&PostParams::default(), &lease(metadata)).await
        }
        Action::Renew | Action::TakeOver => {
            let metadata = current
                .as_ref()
                .map(|l| l.metadata.clone())
                .unwrap_or_default();
            api.replace(&config.lease_name, &PostParams::default(), &lease(metadata))
                .await
        }
    };
    match result {
        Ok(written) => {
            if action == Action::TakeOver || action == Action::Create {
                info!(
                    "{} acquired lease {}/{}",
                    config.identity, config.namespace, config.lease_name
                );
            }
            *observed = written
                .metadata
                .resource_version
                .map(|v| (v, Instant::now()));
            Ok(true)
        }
        // Another candidate wrote first (409 Conflict), or created it (409 AlreadyExists).
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_transitions: Some(transitions),
            acquire_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_is_followed_a_stale_one_taken_over() {
        assert_eq!(decide(None, "a", false), Action::Create);
        assert_eq!(decide(Some(&held_by("a", 0)), "a", false), Action::Renew);
        assert_eq!(decide(Some(&held_by("a", 0)), "a", true), Action::Renew);
        assert_eq!(
            decide(Some(&held_by("b", 0)), "a", false),
            Action::Follow { holder: "b".into() }
        );
        assert_eq!(decide(Some(&held_by("b", 0)), "a", true), Action::TakeOver);
        assert_eq!(decide(Some(&held_by("", 0)), "a", false), Action::TakeOver);
    }

    #[test]
    fn takeover_counts_a_transition_and_renewal_keeps_the_acquire_time() {
        let now = Timestamp::from_second(1_000).unwrap();
        let renewed = claimed(Some(&held_by("a", 3)), "a", Duration::from_secs(2), now);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, Some(MicroTime(Timestamp::UNIX_EPOCH)));
        assert_eq!(renewed.renew_time, Some(MicroTime(now)));
        assert_eq!(renewed.lease_duration_seconds, Some(2));
        let taken = claimed(Some(&held_by("b", 3)), "a", Duration::from_secs(2), now);
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        assert_eq!(
            claimed(None, "a", Duration::from_secs(15), now).lease_transitions,
            Some(0)
        );
    }
}
