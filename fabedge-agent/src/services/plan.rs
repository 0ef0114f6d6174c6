//! Service translation plan (edge nodes): which frontends (ClusterIP, port,
//! protocol) exist and which backends each one balances to.
//!
//! Kubernetes' rules, as kube-proxy applies them:
//! - backends are the ready endpoints; serving-but-terminating ones only
//!   while a port has no ready endpoint at all;
//! - the backend port is the EndpointSlice port of the same name and
//!   protocol (that is how a named `targetPort` is resolved);
//! - `internalTrafficPolicy: Local` keeps endpoints on this node only;
//! - a frontend with no backends is kept, with count 0: the datapath
//!   rejects its clients (RST / port unreachable) like kube-proxy does.
//!
//! A Service is programmed whole or not at all: if the maps cannot hold all
//! of its frontends and backends it is left out with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use fabedge_common::services::{
    Backend, BackendKey, ServiceEntry, ServiceKey, backend_flags, service_flags,
};
use ipnet::Ipv4Net;

use crate::model::{
    EndpointSlice, NamespacedName, Protocol, Service, SessionAffinity, Snapshot, TargetPort,
    TrafficPolicy, checks::Problem,
};

/// What `FE_SERVICES` and `FE_BACKENDS` must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePlan {
    /// Frontends with ids `1..`, in key order; apply keeps the ids of
    /// frontends already in the map (see [`frontend_ids`]).
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    /// Services left out (capacity, unsupported protocol), with why.
    pub skipped: Vec<Problem>,
    /// The node and map sizes it was planned for (`None`: a node that
    /// translates no Service).
    pub scope: Option<ServiceScope>,
    /// Some Service was left out because the maps could not hold it.
    pub overflowed: bool,
}

/// What Service planning reads besides the Services and their slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceScope {
    /// The node planned for (`internalTrafficPolicy: Local`).
    pub me: String,
    /// Its pod CIDR (backends inside it are flagged local).
    pub pod_cidr: Ipv4Net,
    pub max_frontends: usize,
    pub max_backends: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name:port-name`, for logs and `inspect`.
    pub name: String,
    pub entry: ServiceEntry,
    /// Slot order.
    pub backends: Vec<Backend>,
}

impl ServicePlan {
    /// Backend slots over all frontends (what `FE_BACKENDS` must hold).
    pub fn backend_count(&self) -> usize {
        self.frontends.values().map(|f| f.backends.len()).sum()
    }

    /// `FE_BACKENDS` as planned.
    pub fn backend_map(&self) -> BTreeMap<BackendKey, Backend> {
        self.frontends
            .values()
            .flat_map(|f| {
                f.backends.iter().enumerate().map(|(slot, b)| {
                    (
                        BackendKey {
                            service_id: f.entry.id,
                            slot: slot as u32,
                        },
                        *b,
                    )
                })
            })
            .collect()
    }
}

/// The backends of one Service port: (address, port) sorted, deduplicated.
fn port_backends(
    service: &Service,
    port_name: &str,
    target: &TargetPort,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    me: &str,
) -> Vec<(Ipv4Addr, u16)> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        let port = match slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
        {
            Some(p) => p.port.or(match target {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(_) => None,
            }),
            None if slice.ports.is_empty() => match target {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(_) => None,
            },
            None => None,
        };
        let Some(port) = port else { continue };
        for endpoint in &slice.endpoints {
            if service.internal_traffic_policy == TrafficPolicy::Local
                && endpoint.node_name.as_deref() != Some(me)
            {
                continue;
            }
            let set = if endpoint.ready {
                &mut ready
            } else if endpoint.serving && endpoint.terminating {
                &mut terminating
            } else {
                continue;
            };
            set.extend(endpoint.addresses.iter().map(|a| (*a, port)));
        }
    }
    if ready.is_empty() {
        terminating.into_iter().collect()
    } else {
        ready.into_iter().collect()
    }
}

/// Plan Service translation for node `me` whose pod CIDR is `pod_cidr`,
/// within the maps' `capacity` (`--max-services`, `--max-backends`).
pub fn plan_services(
    snapshot: &Snapshot,
    me: &str,
    pod_cidr: Ipv4Net,
    capacity: &crate::maps::Capacity,
) -> ServicePlan {
    plan_within(
        snapshot,
        ServiceScope {
            me: me.to_owned(),
            pod_cidr,
            max_frontends: capacity.services as usize,
            max_backends: capacity.backends as usize,
        },
    )
}

/// [`plan_services`] for `scope`'s node and map sizes.
fn plan_within(snapshot: &Snapshot, scope: ServiceScope) -> ServicePlan {
    let mut plan = ServicePlan::default();
    let mut slices: BTreeMap<NamespacedName, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in snapshot.endpoint_slices.values() {
        if let Some(owner) = slice.service() {
            slices.entry(owner).or_default().push(slice);
        }
    }
    let mut backend_total = 0usize;
    for (name, service) in &snapshot.services {
        let own_slices = slices.get(name).map(Vec::as_slice).unwrap_or_default();
        let frontends = plan_service(name, service, own_slices, &scope, &mut plan.skipped);
        let backends: usize = frontends.iter().map(|(_, f)| f.backends.len()).sum();
        let (max_frontends, max_backends) = (scope.max_frontends, scope.max_backends);
        if plan.frontends.len() + frontends.len() > max_frontends
            || backend_total + backends > max_backends
        {
            plan.skipped.push(Problem::new(format!("Service {name}"), format!(
                "is not programmed: FE_SERVICES holds {max_frontends} frontends and FE_BACKENDS \
                 {max_backends} backends, and {} + {} frontends / {backend_total} + {backends} backends do not fit; \
                 its clients' packets go to the connector untranslated. Fix: raise --max-services or \
                 --max-backends (after `fabedge-agent uninstall` on a node whose maps are pinned)",
                plan.frontends.len(),
                frontends.len()
            )));
            plan.overflowed = true;
            continue;
        }
        backend_total += backends;
        plan.frontends.extend(frontends);
    }
    for (id, frontend) in plan.frontends.values_mut().enumerate() {
        frontend.entry.id = id as u32 + 1;
    }
    plan.scope = Some(scope);
    plan
}

/// The frontends of one Service (ids 0), whatever the maps' room; ports
/// the datapath cannot translate go to `skipped`.
fn plan_service(
    name: &NamespacedName,
    service: &Service,
    slices: &[&EndpointSlice],
    scope: &ServiceScope,
    skipped: &mut Vec<Problem>,
) -> Vec<(ServiceKey, Frontend)> {
    let mut frontends = Vec::new();
    if service.headless || service.cluster_ips.is_empty() {
        return frontends;
    }
    for port in &service.ports {
        if port.protocol == Protocol::Sctp {
            skipped.push(Problem::new(
                format!("Service {name}"),
                format!(
                    "port {} is SCTP: the datapath translates TCP and UDP only; it is left to the connector",
                    port.port
                ),
            ));
            continue;
        }
        let backends: Vec<Backend> = port_backends(
            service,
            &port.name,
            &port.target_port,
            port.protocol,
            slices,
            &scope.me,
        )
        .into_iter()
        .map(|(addr, p)| Backend {
            addr: addr.octets(),
            port: p,
            flags: if scope.pod_cidr.contains(&addr) {
                backend_flags::LOCAL
            } else {
                0
            },
            _pad: 0,
        })
        .collect();
        let (flags, affinity_timeout) = match service.session_affinity {
            SessionAffinity::None => (0, 0),
            SessionAffinity::ClientIp { timeout_seconds } => {
                (service_flags::AFFINITY, timeout_seconds)
            }
        };
        for ip in &service.cluster_ips {
            let key = ServiceKey {
                addr: ip.octets(),
                port: port.port,
                proto: port.protocol.ip_proto(),
                _pad: 0,
            };
            let label = if port.name.is_empty() {
                format!("{name}:{}", port.port)
            } else {
                format!("{name}:{}", port.name)
            };
            let entry = ServiceEntry {
                id: 0,
                count: backends.len().min(u16::MAX as usize) as u16,
                flags,
                _pad: 0,
                affinity_timeout,
            };
            frontends.push((
                key,
                Frontend {
                    name: label,
                    entry,
                    backends: backends.clone(),
                },
            ));
        }
    }
    frontends
}

/// Re-plan the Services `services` of `plan` after only EndpointSlices
/// changed in `snapshot` (no Service, no Node): the result equals a full
/// plan of `snapshot` for the same scope. Returns the frontends that
/// changed, or `None` when only a full plan can tell: a Service was left
/// out for room before, or the new backends would not fit. Frontend keys
/// and ids stay: they follow from the Services alone.
pub fn replan_services(
    plan: &mut ServicePlan,
    snapshot: &Snapshot,
    services: &BTreeSet<NamespacedName>,
) -> Option<BTreeSet<ServiceKey>> {
    let Some(scope) = plan.scope.clone() else {
        // This node translates no Service: slices change nothing.
        return Some(BTreeSet::new());
    };
    if plan.overflowed {
        return None;
    }
    let mut backend_total = plan.backend_count();
    let mut replaced = Vec::new();
    for name in services {
        let Some(service) = snapshot.services.get(name) else {
            // Slices of no Service plan nothing.
            continue;
        };
        let slices: Vec<&EndpointSlice> = snapshot
            .endpoint_slices
            .values()
            .filter(|slice| {
                slice.namespace == name.namespace
                    && slice.service_name.as_deref() == Some(name.name.as_str())
            })
            .map(|slice| &**slice)
            .collect();
        let mut ignored = Vec::new();
        for (key, mut frontend) in plan_service(name, service, &slices, &scope, &mut ignored) {
            let held = plan.frontends.get(&key)?;
            frontend.entry.id = held.entry.id;
            backend_total = backend_total + frontend.backends.len() - held.backends.len();
            if *held != frontend {
                replaced.push((key, frontend));
            }
        }
    }
    if backend_total > scope.max_backends {
        return None;
    }
    let mut changed = BTreeSet::new();
    for (key, frontend) in replaced {
        changed.insert(key);
        plan.frontends.insert(key, frontend);
    }
    Some(changed)
}

/// The id of each planned frontend: the one it already has in the map
/// (`current`), else the lowest id nobody uses, so a re-apply rewrites
/// nothing that did not change (and affinity entries keep their meaning).
pub fn frontend_ids(
    plan: &ServicePlan,
    current: &BTreeMap<ServiceKey, ServiceEntry>,
) -> BTreeMap<ServiceKey, u32> {
    let mut used: BTreeSet<u32> = BTreeSet::new();
    let mut ids = BTreeMap::new();
    let mut pending = Vec::new();
    for key in plan.frontends.keys() {
        match current.get(key) {
            Some(entry) if entry.id != 0 && used.insert(entry.id) => {
                ids.insert(*key, entry.id);
            }
            _ => pending.push(*key),
        }
    }
    let mut next = 1u32;
    for key in pending {
        while used.contains(&next) {
            next += 1;
        }
        used.insert(next);
        ids.insert(key, next);
    }
    ids
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Endpoint, EndpointPort, ServicePort};
    use crate::services::random::Random;

    fn service(ports: Vec<ServicePort>) -> Service {
        Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 20)],
            headless: false,
            ports,
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: TrafficPolicy::Cluster,
        }
    }

    fn port(name: &str, port: u16, protocol: Protocol, target: TargetPort) -> ServicePort {
        ServicePort {
            name: name.into(),
            port,
            protocol,
            target_port: target,
        }
    }

    fn endpoint(ip: [u8; 4], ready: bool, terminating: bool, node: &str) -> Endpoint {
        Endpoint {
            addresses: Ipv4Addr::from(ip).into(),
            ready,
            serving: true,
            terminating,
            node_name: Some(node.into()),
        }
    }

    fn snapshot(service: Service, ports: Vec<EndpointPort>, endpoints: Vec<Endpoint>) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.services
            .insert(NamespacedName::new("default", "web"), Arc::new(service));
        snap.endpoint_slices.insert(
            NamespacedName::new("default", "web-abc"),
            Arc::new(EndpointSlice {
                namespace: "default".into(),
                name: "web-abc".into(),
                service_name: Some("web".into()),
                ports,
                endpoints,
            }),
        );
        snap
    }

    fn cidr() -> Ipv4Net {
        "10.234.1.0/24".parse().unwrap()
    }

    fn scope(max_frontends: usize, max_backends: usize) -> ServiceScope {
        ServiceScope {
            me: "edge-1".into(),
            pod_cidr: cidr(),
            max_frontends,
            max_backends,
        }
    }

    #[test]
    fn named_target_port_resolves_through_the_endpoint_slice_and_local_backends_are_flagged() {
        let snap = snapshot(
            service(vec![
                port("http", 80, Protocol::Tcp, TargetPort::Name("web".into())),
                port("metrics", 9090, Protocol::Udp, TargetPort::Number(9100)),
            ]),
            vec![
                EndpointPort {
                    name: "http".into(),
                    port: Some(8080),
                    protocol: Protocol::Tcp,
                },
                EndpointPort {
                    name: "metrics".into(),
                    port: Some(9100),
                    protocol: Protocol::Udp,
                },
            ],
            vec![
                endpoint([10, 234, 1, 10], true, false, "edge-1"),
                endpoint([10, 234, 2, 10], true, false, "edge-2"),
            ],
        );
        let plan = plan_services(&snap, "edge-1", cidr(), &Default::default());
        let http = &plan.frontends[&ServiceKey {
            addr: [10, 96, 0, 20],
            port: 80,
            proto: 6,
            _pad: 0,
        }];
        assert_eq!(http.name, "default/web:http");
        assert_eq!(http.entry.count, 2);
        assert_eq!(
            http.backends,
            [
                Backend {
                    addr: [10, 234, 1, 10],
                    port: 8080,
                    flags: backend_flags::LOCAL,
                    _pad: 0
                },
                Backend {
                    addr: [10, 234, 2, 10],
                    port: 8080,
                    flags: 0,
                    _pad: 0
                },
            ]
        );
        let metrics = &plan.frontends[&ServiceKey {
            addr: [10, 96, 0, 20],
            port: 9090,
            proto: 17,
            _pad: 0,
        }];
        assert_eq!(metrics.backends[0].port, 9100);
        assert_ne!(http.entry.id, metrics.entry.id);
        assert_eq!(plan.backend_map().len(), 4);
    }

    #[test]
    fn terminating_endpoints_serve_only_while_no_endpoint_is_ready() {
        let ports = vec![EndpointPort {
            name: String::new(),
            port: Some(80),
            protocol: Protocol::Tcp,
        }];
        let svc = service(vec![port("", 80, Protocol::Tcp, TargetPort::Number(80))]);
        let key = ServiceKey {
            addr: [10, 96, 0, 20],
            port: 80,
            proto: 6,
            _pad: 0,
        };
        let both = snapshot(
            svc.clone(),
            ports.clone(),
            vec![
                endpoint([10, 234, 2, 1], true, false, "edge-2"),
                endpoint([10, 234, 2, 2], false, true, "edge-2"),
            ],
        );
        let addrs: Vec<_> = plan_services(&both, "edge-1", cidr(), &Default::default()).frontends
            [&key]
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        assert_eq!(addrs, [[10, 234, 2, 1]]);
        let only_terminating = snapshot(
            svc.clone(),
            ports.clone(),
            vec![endpoint([10, 234, 2, 2], false, true, "edge-2")],
        );
        let addrs: Vec<_> = plan_services(&only_terminating, "edge-1", cidr(), &Default::default())
            .frontends[&key]
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        assert_eq!(addrs, [[10, 234, 2, 2]]);
        let none = snapshot(svc, ports, vec![]);
        assert_eq!(
            plan_services(&none, "edge-1", cidr(), &Default::default()).frontends[&key]
                .entry
                .count,
            0,
            "kept, to be rejected"
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints_and_affinity_is_carried() {
        let mut svc = service(vec![port("", 53, Protocol::Udp, TargetPort::Number(53))]);
        svc.internal_traffic_policy = TrafficPolicy::Local;
        svc.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: 30,
        };
        let snap = snapshot(
            svc,
            vec![EndpointPort {
                name: String::new(),
                port: Some(53),
                protocol: Protocol::Udp,
            }],
            vec![
                endpoint([10, 234, 1, 5], true, false, "edge-1"),
                endpoint([10, 234, 2, 5], true, false, "edge-2"),
            ],
        );
        let plan = plan_services(&snap, "edge-1", cidr(), &Default::default());
        let f = plan.frontends.values().next().unwrap();
        assert_eq!(f.backends.len(), 1);
        assert_eq!(f.backends[0].addr, [10, 234, 1, 5]);
        assert_eq!(
            (f.entry.flags, f.entry.affinity_timeout),
            (service_flags::AFFINITY, 30)
        );
    }

    #[test]
    fn a_service_that_does_not_fit_is_left_out_whole_with_a_message_and_the_others_stay() {
        let ports = vec![EndpointPort {
            name: String::new(),
            port: Some(80),
            protocol: Protocol::Tcp,
        }];
        let mut snap = snapshot(
            service(vec![port("", 80, Protocol::Tcp, TargetPort::Number(80))]),
            ports.clone(),
            vec![
                endpoint([10, 234, 2, 1], true, false, "edge-2"),
                endpoint([10, 234, 2, 2], true, false, "edge-2"),
            ],
        );
        let mut big = service(vec![
            port("a", 80, Protocol::Tcp, TargetPort::Number(80)),
            port("b", 81, Protocol::Tcp, TargetPort::Number(80)),
        ]);
        big.name = "big".into();
        big.cluster_ips = vec![Ipv4Addr::new(10, 96, 0, 30)];
        snap.services
            .insert(NamespacedName::new("default", "big"), Arc::new(big));
        // Services are planned in name order: default/big (2 frontends)
        // takes the room for 2, default/web does not fit and is left out.
        let plan = plan_within(&snap, scope(2, 100));
        let names: Vec<_> = plan.frontends.values().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["default/big:a", "default/big:b"]);
        assert_eq!(plan.skipped.len(), 1);
        assert!(
            plan.skipped[0]
                .to_string()
                .contains("Service default/web: is not programmed"),
            "{}",
            plan.skipped[0]
        );
        // The backend limit the same way: web's 2 backends do not fit 1.
        let plan = plan_within(&snap, scope(100, 1));
        assert!(
            plan.frontends
                .values()
                .all(|f| f.name.starts_with("default/big"))
        );
        assert!(plan.skipped[0].to_string().contains("default/web"));
    }

    #[test]
    fn ids_already_in_the_map_are_kept_and_new_frontends_take_free_ones() {
        let k = |port| ServiceKey {
            addr: [10, 96, 0, 1],
            port,
            proto: 6,
            _pad: 0,
        };
        let frontend = || Frontend {
            name: "x".into(),
            entry: ServiceEntry::default(),
            backends: vec![],
        };
        let mut plan = ServicePlan::default();
        plan.frontends.insert(k(1), frontend());
        plan.frontends.insert(k(2), frontend());
        let current = BTreeMap::from([
            (
                k(2),
                ServiceEntry {
                    id: 1,
                    ..Default::default()
                },
            ),
            (
                k(9),
                ServiceEntry {
                    id: 2,
                    ..Default::default()
                },
            ),
        ]);
        let ids = frontend_ids(&plan, &current);
        assert_eq!(ids[&k(2)], 1);
        assert_eq!(ids[&k(1)], 2, "lowest id not kept by a planned frontend");
    }

    /// Six Services: one with a TCP and a UDP port, one named target port,
    /// one `internalTrafficPolicy: Local`, one with an SCTP port, one
    /// headless; no slices yet.
    fn services() -> Snapshot {
        let mut snap = Snapshot::default();
        for n in 0..6u8 {
            let mut ports = vec![port("http", 80, Protocol::Tcp, TargetPort::Number(8080))];
            match n {
                1 => ports.push(port("dns", 53, Protocol::Udp, TargetPort::Number(53))),
                2 => ports[0].target_port = TargetPort::Name("web".into()),
                4 => ports.push(port("sig", 9, Protocol::Sctp, TargetPort::Number(9))),
                _ => {}
            }
            let name = format!("svc-{n}");
            let service = Service {
                name: name.clone(),
                cluster_ips: if n == 5 {
                    vec![]
                } else {
                    vec![Ipv4Addr::new(10, 96, 0, 10 + n)]
                },
                headless: n == 5,
                internal_traffic_policy: if n == 3 {
                    TrafficPolicy::Local
                } else {
                    TrafficPolicy::Cluster
                },
                ..service(ports)
            };
            snap.services
                .insert(NamespacedName::new("default", name), Arc::new(service));
        }
        snap
    }

    /// One random EndpointSlice change: a slice written (new endpoints,
    /// maybe another owner, maybe another port) or deleted. Returns the
    /// Services it concerns, as the agent derives them: old and new owner.
    fn change_slice(snap: &mut Snapshot, random: &mut Random) -> BTreeSet<NamespacedName> {
        let slice_name = format!("slice-{}", random.below(10));
        let key = NamespacedName::new("default", &slice_name);
        let mut owners: BTreeSet<NamespacedName> = snap
            .endpoint_slices
            .get(&key)
            .and_then(|slice| slice.service())
            .into_iter()
            .collect();
        if random.below(5) == 0 {
            snap.endpoint_slices.remove(&key);
            return owners;
        }
        // Mostly a Service that exists; sometimes one that does not.
        let owner = format!("svc-{}", random.below(7));
        let (name, port) = match random.below(4) {
            0 => ("dns", Some(53)),
            1 => ("web", Some(8081)),
            2 => ("http", None),
            _ => ("http", Some(8080)),
        };
        let protocol = if name == "dns" {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        let endpoints = (0..random.below(5))
            .map(|_| {
                let addr = [10, 234, random.below(3) as u8, random.below(6) as u8];
                let ready = random.below(3) != 0;
                let node = if random.below(2) == 0 {
                    "edge-1"
                } else {
                    "edge-2"
                };
                endpoint(addr, ready, !ready && random.below(2) == 0, node)
            })
            .collect();
        let ports = vec![EndpointPort {
            name: name.into(),
            port,
            protocol,
        }];
        owners.insert(NamespacedName::new("default", &owner));
        snap.endpoint_slices.insert(
            key,
            Arc::new(EndpointSlice {
                namespace: "default".into(),
                name: slice_name,
                service_name: Some(owner),
                ports,
                endpoints,
            }),
        );
        owners
    }

    #[test]
    fn replanning_the_services_of_changed_slices_equals_a_full_plan() {
        let mut random = Random(0x5eed_f00d);
        let (mut replanned, mut refused) = (0, 0);
        for round in 0..100 {
            // Every other round the maps are small enough that some Service
            // does not fit now and then.
            let scope = match round % 2 {
                0 => scope(100, 1000),
                _ => scope(100, 5),
            };
            let mut snap = services();
            let mut plan = plan_within(&snap, scope.clone());
            for step in 0..30 {
                let owners = change_slice(&mut snap, &mut random);
                let full = plan_within(&snap, scope.clone());
                let before = plan.clone();
                match replan_services(&mut plan, &snap, &owners) {
                    Some(changed) => {
                        replanned += 1;
                        assert_eq!(plan, full, "round {round} step {step}");
                        let differ: BTreeSet<ServiceKey> = full
                            .frontends
                            .iter()
                            .filter(|(key, f)| before.frontends.get(*key) != Some(*f))
                            .map(|(key, _)| *key)
                            .collect();
                        assert_eq!(changed, differ, "round {round} step {step}");
                    }
                    None => {
                        refused += 1;
                        assert!(
                            before.overflowed || full.overflowed,
                            "round {round} step {step}: refused though everything fits"
                        );
                        assert_eq!(plan, before, "a refused replan changes nothing");
                        plan = full;
                    }
                }
            }
        }
        // Both outcomes were exercised.
        assert!(replanned > 1000 && refused > 50, "{replanned} {refused}");
    }

    #[test]
    fn a_node_without_service_translation_replans_nothing() {
        let mut snap = services();
        let mut plan = ServicePlan::default();
        let owners = change_slice(&mut snap, &mut Random(7));
        assert_eq!(
            replan_services(&mut plan, &snap, &owners),
            Some(BTreeSet::new())
        );
        assert_eq!(plan, ServicePlan::default());
    }
}
