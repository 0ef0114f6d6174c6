//! Objects that are each valid but cannot all be honoured at once: two Nodes
//! with overlapping pod CIDRs or the same address, a pod CIDR that covers a
//! node's address or the Service CIDR, two Services on one ClusterIP:port, a
//! ClusterIP outside the Service CIDR. Of two conflicting objects the newer
//! one is left out (creationTimestamp, else its place in the source) and the
//! older one stays, so one bad edit never takes down what already worked.
//! Every object left out becomes a [`Problem`]; the rest plans as usual.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{NamespacedName, ObjectRef, Snapshot};

/// One object the agent could not use, and why. `object` names it as a
/// person would look for it (`Node edge-1`, `Service default/dns`, or a
/// manifest document); `message` names the field, the value and the fix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Problem {
    pub object: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

impl Problem {
    pub fn new(object: impl fmt::Display, message: impl Into<String>) -> Problem {
        Problem {
            object: object.to_string(),
            message: message.into(),
        }
    }
}

/// How old an object is: its creationTimestamp (RFC 3339, so text order is
/// time order) when the source has one, then its place in the source. An
/// object without a timestamp counts as older than one with.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Age {
    pub created: Option<String>,
    pub position: usize,
}

/// The age of every object a source delivered.
pub type Ages = HashMap<ObjectRef, Age>;

/// Leave out the newer object of every conflicting pair; returns why each was
/// left out. Deterministic: the same snapshot and ages give the same result.
pub fn drop_conflicts(snapshot: &mut Snapshot, ages: &Ages, service_cidr: Ipv4Net) -> Vec<Problem> {
    let mut problems = node_conflicts(snapshot, ages, service_cidr);
    problems.extend(service_conflicts(snapshot, ages, service_cidr));
    problems.extend(orphan_slices(snapshot));
    problems
}

fn age_of(ages: &Ages, object: &ObjectRef) -> Age {
    ages.get(object).cloned().unwrap_or_default()
}

fn node_conflicts(snapshot: &mut Snapshot, ages: &Ages, service_cidr: Ipv4Net) -> Vec<Problem> {
    let mut problems = Vec::new();
    // Every address some node is reached at: a pod CIDR covering one would
    // route that node's traffic to pods.
    let mut addresses: Vec<(Ipv4Addr, &str)> = Vec::new();
    for node in snapshot.nodes.values() {
        addresses.push((node.internal_ip, &node.name));
        addresses.push((node.tunnel_endpoint, &node.name));
        if let Some(ip) = node.external_ip {
            addresses.push((ip, &node.name));
        }
    }
    let mut by_age: Vec<&str> = snapshot.nodes.keys().map(String::as_str).collect();
    by_age.sort_by_cached_key(|name| (age_of(ages, &ObjectRef::cluster("Node", *name)), *name));

    let mut kept: Vec<&str> = Vec::new();
    let mut left_out = Vec::new();
    for name in by_age {
        let node = &snapshot.nodes[name];
        let object = ObjectRef::cluster("Node", name);
        let mut reason = None;
        if let Some(cidr) = node.pod_cidr {
            if let Some((ip, owner)) = addresses.iter().find(|(ip, _)| cidr.contains(ip)) {
                reason = Some(format!(
                    "spec.podCIDR {cidr} covers node {owner}'s address {ip}: routing it to pods would cut \
                     that node off; give this node a pod CIDR outside the node network"
                ));
            } else if cidr.contains(&service_cidr.network())
                || service_cidr.contains(&cidr.network())
            {
                reason = Some(format!(
                    "spec.podCIDR {cidr} overlaps the Service CIDR {service_cidr}; give this node a pod CIDR \
                     outside it (or fix the agent's --service-cidr)"
                ));
            } else if let Some((other, other_cidr)) = kept.iter().find_map(|other| {
                let other_cidr = snapshot.nodes[*other].pod_cidr?;
                (other_cidr.contains(&cidr.network()) || cidr.contains(&other_cidr.network()))
                    .then_some((*other, other_cidr))
            }) {
                reason = Some(format!(
                    "spec.podCIDR {cidr} overlaps node {other}'s {other_cidr} (older, kept); every node needs \
                     its own pod CIDR"
                ));
            }
        }
        if reason.is_none()
            && let Some(other) = kept
                .iter()
                .find(|other| snapshot.nodes[**other].internal_ip == node.internal_ip)
        {
            reason = Some(format!(
                "InternalIP {} is also node {other}'s (older, kept); every node needs its own address",
                node.internal_ip
            ));
        }
        match reason {
            Some(message) => {
                problems.push(Problem::new(&object, message));
                left_out.push(name.to_owned());
            }
            None => kept.push(name),
        }
    }
    for name in left_out {
        snapshot.nodes.remove(&name);
        for community in snapshot.communities.values_mut() {
            community.members.remove(&name);
        }
    }
    problems
}

fn service_conflicts(snapshot: &mut Snapshot, ages: &Ages, service_cidr: Ipv4Net) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut by_age: Vec<NamespacedName> = snapshot.services.keys().cloned().collect();
    by_age.sort_by_cached_key(|key| {
        let object = ObjectRef::namespaced("Service", &key.namespace, &key.name);
        (age_of(ages, &object), key.clone())
    });
    // (ClusterIP, port, protocol) → the Service that has it.
    let mut taken: BTreeMap<(Ipv4Addr, u16, String), NamespacedName> = BTreeMap::new();
    let mut left_out = Vec::new();
    for key in by_age {
        let service = &snapshot.services[&key];
        let object = ObjectRef::namespaced("Service", &key.namespace, &key.name);
        let mut reason = None;
        if let Some(ip) = service
            .cluster_ips
            .iter()
            .find(|ip| !service_cidr.contains(*ip))
        {
            reason = Some(format!(
                "spec.clusterIP {ip} is outside the Service CIDR {service_cidr}; the agent translates \
                 only that range (fix the Service, or the agent's --service-cidr)"
            ));
        } else if !service.headless && !service.cluster_ips.is_empty() && service.ports.is_empty() {
            reason =
                Some("spec.ports is empty; a ClusterIP Service needs at least one port".to_owned());
        } else {
            'find: for ip in &service.cluster_ips {
                for port in &service.ports {
                    let slot = (*ip, port.port, format!("{:?}", port.protocol));
                    if let Some(other) = taken.get(&slot) {
                        reason = Some(format!(
                            "{ip}:{}/{:?} is also Service {other}'s (older, kept); two Services cannot \
                             share a ClusterIP and port",
                            port.port, port.protocol
                        ));
                        break 'find;
                    }
                }
            }
        }
        match reason {
            Some(message) => {
                problems.push(Problem::new(&object, message));
                left_out.push(key);
            }
            None => {
                for ip in &service.cluster_ips {
                    for port in &service.ports {
                        taken.insert(
                            (*ip, port.port, format!("{:?}", port.protocol)),
                            key.clone(),
                        );
                    }
                }
            }
        }
    }
    for key in left_out {
        snapshot.services.remove(&key);
    }
    problems
}

/// EndpointSlices whose Service is not there: harmless (nothing uses them),
/// but almost always a typo in the `kubernetes.io/service-name` label.
fn orphan_slices(snapshot: &Snapshot) -> Vec<Problem> {
    snapshot
        .endpoint_slices
        .values()
        .filter_map(|slice| {
            let service = slice.service()?;
            (!snapshot.services.contains_key(&service)).then(|| {
                Problem::new(
                    ObjectRef::namespaced("EndpointSlice", &slice.namespace, &slice.name),
                    format!(
                        "label kubernetes.io/service-name names Service {service}, which does not exist \
                         (or was left out); its endpoints are unused"
                    ),
                )
            })
        })
        .collect()
}
