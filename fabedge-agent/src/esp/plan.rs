//! The ESP tunnel mode's desired xfrm state: pure, from the plan's tunnel
//! peers, the peers' published public keys and generations, and this node's
//! key and generation.
//!
//! Shape (see DESIGN notes in the module docs of `apply::xfrm`):
//! - outbound: one policy per peer matching the `to-tunnel` mark of that
//!   peer (peer id + magic) on our xfrm interface, tunnelling to the peer's
//!   endpoint with `reqid = peer id`; one SA of our current generation.
//!   When a new generation's SA is added, the kernel prefers it (newest
//!   state wins the template), so rotation switches without a gap.
//! - a default-drop policy for the `to-tunnel` magic alone, at a lower
//!   priority: a marked packet whose peer has no policy or no SA is dropped,
//!   never sent in clear.
//! - inbound: SAs for the peer's published generation and its neighbours
//!   (g-1 for packets still in flight after its rotation, and the SAs a
//!   peer keeps one generation behind; g+1 and g+2 so the peer can start a
//!   new generation, twice, before we have read its annotation); each sets the
//!   `from-tunnel` mark of the peer, which `fe_tunnel_ingress` checks the
//!   inner source against. `in`/`fwd` policies on the interface accept what
//!   any of our SAs decrypted.

use std::{collections::BTreeMap, net::Ipv4Addr};

use fabedge_common::{mark, peer_kind};

use fabedge_common::ESP_IN_UDP_PORT;

use super::{
    keys::{
        ESP_ENDPOINT_ANNOTATION, KEY_GENERATION_ANNOTATION, KEY_NONCE_ANNOTATION, KeyNonce,
        NodeKey, PUBLIC_KEY_ANNOTATION, PublicKey, SpiSlots, legacy_spi,
    },
    xfrm::{
        Encap, FE_IF_ID, PolicyAction, PolicyDir, PolicySpec, SaSpec, Tmpl,
        msg::{Lifetime, REPLAY_WINDOW},
    },
};
use crate::{model::Snapshot, plan::Plan};

/// Priority of per-peer policies (lower wins).
pub const PEER_POLICY_PRIORITY: u32 = 100;
/// Priority of the default-drop policy.
pub const DROP_POLICY_PRIORITY: u32 = 1000;
/// Limits of an outbound SA. With ESN the sequence number never wraps; the
/// limits make a long-lived SA rotate anyway (the kernel's soft expire
/// starts a new generation, see `run`), well before the hard limit, where
/// the kernel deletes it. 2^36 packets is about 9 days at 1 Gbit/s of full
/// frames.
pub const OUTBOUND_LIFETIME: Lifetime = Lifetime {
    soft_bytes: 1 << 46,
    hard_bytes: (1 << 46) + (1 << 42),
    soft_packets: 1 << 36,
    hard_packets: (1 << 36) + (1 << 32),
};
// The soft limit must come first, or an SA dies before it is replaced.
const _: () = assert!(
    OUTBOUND_LIFETIME.soft_packets < OUTBOUND_LIFETIME.hard_packets
        && OUTBOUND_LIFETIME.soft_bytes < OUTBOUND_LIFETIME.hard_bytes
);

/// Which way an SA carries traffic, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

/// One SA we want, with what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSa {
    pub peer: String,
    pub peer_id: u16,
    pub direction: Direction,
    pub generation: u32,
    pub spec: SaSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EspPlan {
    pub sas: Vec<PlannedSa>,
    pub policies: Vec<PolicySpec>,
    /// Peers left without SAs (no or bad public key): their traffic hits the
    /// default drop until they publish one.
    pub warnings: Vec<String>,
    /// Connector: edges whose hello has not come yet; nothing is sent to
    /// them (their inbound SAs exist, so they can open the tunnel).
    pub waiting: Vec<String>,
}

/// Where a peer's ESP-in-UDP reaches it: the NAT-observed address and port
/// when we have seen its hellos, else the endpoint it publishes
/// (`fabedge.io/esp-endpoint`), else its tunnel endpoint's UDP 4500.
pub type ObservedEndpoints = BTreeMap<String, (Ipv4Addr, u16)>;

/// Peers whose outbound SA stays on an older generation than ours (one
/// behind at most, which their inbound window covers): after a generation
/// started only because some peers' endpoints moved, the others keep their
/// SAs, so that their own moves later need no further generation.
pub type PinnedGenerations = BTreeMap<String, u32>;

/// The generation a peer publishes (1 when it has not yet).
pub fn published_generation(annotations: &BTreeMap<String, String>) -> Option<u32> {
    annotations
        .get(KEY_GENERATION_ANNOTATION)
        .and_then(|g| g.trim().parse().ok())
}

/// Where a peer says its UDP 4500 is reached (`fabedge.io/esp-endpoint`):
/// `Ok(None)` when it does not say, `Err(text)` when it says nonsense.
pub fn published_endpoint(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<(Ipv4Addr, u16)>, String> {
    match annotations.get(ESP_ENDPOINT_ANNOTATION) {
        None => Ok(None),
        Some(text) => match text.trim().parse::<std::net::SocketAddrV4>() {
            Ok(endpoint) if endpoint.port() != 0 && !endpoint.ip().is_unspecified() => {
                Ok(Some((*endpoint.ip(), endpoint.port())))
            }
            _ => Err(text.clone()),
        },
    }
}

/// The mark value and mask an outbound policy for `peer_id` matches.
pub fn out_mark(peer_id: u16) -> (u32, u32) {
    (
        mark::to_tunnel(0, peer_id),
        mark::PEER_MASK | mark::MAGIC_MASK,
    )
}

/// This node's key material: its key pair and the nonce it publishes
/// (`None` only in tests of the nonce-less derivation).
pub struct LocalKeys<'a> {
    pub key: &'a NodeKey,
    pub nonce: Option<&'a KeyNonce>,
}

pub fn plan_esp(
    snapshot: &Snapshot,
    plan: &Plan,
    local_keys: LocalKeys<'_>,
    generation: u32,
    observed: &ObservedEndpoints,
    pinned: &PinnedGenerations,
) -> EspPlan {
    let key = local_keys.key;
    // The connector sends to an edge only once the edge's hello has shown
    // where it is reached: edges open the tunnels (their published endpoint
    // is often a private address behind a NAT, and an SA created there would
    // have to be replaced, with a new generation, as soon as the hello came).
    let wait_for_hello = plan.role == crate::model::Role::Connector;
    let mut out = EspPlan::default();
    let Some(me) = snapshot.nodes.get(&plan.node) else {
        return out;
    };
    let local = me.tunnel_endpoint;
    let names: Vec<&str> = snapshot.nodes.keys().map(String::as_str).collect();
    let slots = SpiSlots::new(&names);
    for (&peer_id, entry) in plan
        .peers
        .iter()
        .filter(|(_, p)| p.kind == peer_kind::TUNNEL)
    {
        let Some(name) = plan.peer_name(peer_id) else {
            continue;
        };
        let Some(node) = snapshot.nodes.get(name) else {
            continue;
        };
        let public = match node.annotations.get(PUBLIC_KEY_ANNOTATION) {
            Some(text) => match PublicKey::parse(name, text) {
                Ok(public) => public,
                Err(e) => {
                    out.warnings.push(format!(
                        "{e}: no ESP tunnel to {name} (its traffic is dropped)"
                    ));
                    continue;
                }
            },
            None => {
                out.warnings.push(format!(
                    "node {name} has not published annotation {PUBLIC_KEY_ANNOTATION} yet: \
                     no ESP tunnel to it (its traffic is dropped until its agent runs)"
                ));
                continue;
            }
        };
        let published = match published_endpoint(&node.annotations) {
            Ok(endpoint) => endpoint,
            Err(bad) => {
                out.warnings.push(format!(
                    "node {name}: annotation {ESP_ENDPOINT_ANNOTATION} {bad:?} is not ADDRESS:PORT; \
                     its tunnel endpoint's UDP {ESP_IN_UDP_PORT} is used"
                ));
                None
            }
        };
        let (remote, remote_port) = observed
            .get(name)
            .copied()
            .or(published)
            .unwrap_or((Ipv4Addr::from(entry.underlay_ip), ESP_IN_UDP_PORT));
        let peer_nonce = match node.annotations.get(KEY_NONCE_ANNOTATION) {
            None => None,
            Some(text) => match KeyNonce::parse(name, text) {
                Ok(nonce) => Some(nonce),
                Err(e) => {
                    out.warnings.push(format!(
                        "{e}: no ESP tunnel to {name} (its traffic is dropped)"
                    ));
                    continue;
                }
            },
        };
        let nonces = local_keys.nonce.zip(peer_nonce.as_ref());
        let secret = key.shared_with(&public);
        let sa = |direction, generation| {
            let (src, dst, src_name, dst_name) = match direction {
                Direction::Out => (local, remote, plan.node.as_str(), name),
                Direction::In => (remote, local, name, plan.node.as_str()),
            };
            let (set_mark, encap) = match direction {
                // Our bits leave no trace on the outer packet.
                Direction::Out => (
                    (0, mark::OWNED_MASK),
                    Encap {
                        sport: ESP_IN_UDP_PORT,
                        dport: remote_port,
                    },
                ),
                Direction::In => (
                    (mark::from_tunnel(0, peer_id), mark::OWNED_MASK),
                    Encap {
                        sport: remote_port,
                        dport: ESP_IN_UDP_PORT,
                    },
                ),
            };
            PlannedSa {
                peer: name.to_owned(),
                peer_id,
                direction,
                generation,
                spec: SaSpec {
                    src,
                    dst,
                    // A peer from before nonces computes SPIs the old way.
                    spi: if nonces.is_some() {
                        slots.spi(src_name, dst_name, generation)
                    } else {
                        legacy_spi(src_name, dst_name, generation, &names)
                    },
                    reqid: u32::from(peer_id),
                    key: secret.sa_key(
                        src_name,
                        dst_name,
                        generation,
                        nonces.map(|(mine, theirs)| match direction {
                            Direction::Out => (mine, theirs),
                            Direction::In => (theirs, mine),
                        }),
                    ),
                    encap: Some(encap),
                    if_id: FE_IF_ID,
                    set_mark: Some(set_mark),
                    replay_window: if direction == Direction::In {
                        REPLAY_WINDOW
                    } else {
                        0
                    },
                    lifetime: match direction {
                        Direction::Out => OUTBOUND_LIFETIME,
                        // The sender's limits end the SA; ours would only
                        // cut traffic the sender still sends under it.
                        Direction::In => Lifetime::INFINITE,
                    },
                },
            }
        };
        let outbound = pinned
            .get(name)
            .copied()
            .filter(|&g| g == generation.wrapping_sub(1))
            .unwrap_or(generation);
        let waiting = wait_for_hello && !observed.contains_key(name);
        if waiting {
            out.waiting.push(name.to_owned());
        } else {
            out.sas.push(sa(Direction::Out, outbound));
        }
        let theirs = published_generation(&node.annotations).unwrap_or(1);
        for g in [
            theirs.wrapping_sub(1),
            theirs,
            theirs.wrapping_add(1),
            theirs.wrapping_add(2),
        ] {
            if g != 0 {
                out.sas.push(sa(Direction::In, g));
            }
        }
        if waiting {
            // No policy either: its traffic meets the default drop.
            continue;
        }
        out.policies.push(PolicySpec {
            dir: PolicyDir::Out,
            priority: PEER_POLICY_PRIORITY,
            mark: out_mark(peer_id),
            if_id: FE_IF_ID,
            action: PolicyAction::Allow,
            tmpl: Some(Tmpl {
                src: local,
                dst: remote,
                reqid: u32::from(peer_id),
            }),
        });
    }
    out.policies.extend(base_policies());
    out
}

/// The policies every ESP-mode node has, peers or not: default drop, and
/// acceptance of what our SAs decrypted.
pub fn base_policies() -> Vec<PolicySpec> {
    let any = Tmpl {
        src: Ipv4Addr::UNSPECIFIED,
        dst: Ipv4Addr::UNSPECIFIED,
        reqid: 0,
    };
    vec![
        PolicySpec {
            dir: PolicyDir::Out,
            priority: DROP_POLICY_PRIORITY,
            mark: (mark::MAGIC_TO_TUNNEL, mark::MAGIC_MASK),
            if_id: FE_IF_ID,
            action: PolicyAction::Block,
            tmpl: None,
        },
        PolicySpec {
            dir: PolicyDir::In,
            priority: PEER_POLICY_PRIORITY,
            mark: (0, 0),
            if_id: FE_IF_ID,
            action: PolicyAction::Allow,
            tmpl: Some(any),
        },
        PolicySpec {
            dir: PolicyDir::Fwd,
            priority: PEER_POLICY_PRIORITY,
            mark: (0, 0),
            if_id: FE_IF_ID,
            action: PolicyAction::Allow,
            tmpl: Some(any),
        },
    ]
}

#[cfg(test)]
mod tests;
