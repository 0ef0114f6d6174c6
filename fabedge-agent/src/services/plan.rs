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
        me,
        pod_cidr,
        capacity.services as usize,
        capacity.backends as usize,
    )
}

/// [`plan_services`] for maps of `max_frontends` and `max_backends` entries.
fn plan_within(
    snapshot: &Snapshot,
    me: &str,
    pod_cidr: Ipv4Net,
    max_frontends: usize,
    max_backends: usize,
) -> ServicePlan {
    let mut plan = ServicePlan::default();
    let mut slices: BTreeMap<NamespacedName, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in snapshot.endpoint_slices.values() {
        if let Some(owner) = slice.service() {
            slices.entry(owner).or_default().push(slice);
        }
    }
    let mut backend_total = 0usize;
    for (name, service) in &snapshot.services {
        if service.headless || service.cluster_ips.is_empty() {
            continue;
        }
        let own_slices = slices.get(name).map(Vec::as_slice).unwrap_or_default();
        let mut frontends = Vec::new();
        for port in &service.ports {
            if port.protocol == Protocol::Sctp {
                plan.skipped.push(Problem::new(
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
                own_slices,
                me,
            )
            .into_iter()
            .map(|(addr, p)| Backend {
                addr: addr.octets(),
                port: p,
                flags: if pod_cidr.contains(&addr) {
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
        let backends: usize = frontends.iter().map(|(_, f)| f.backends.len()).sum();
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
            continue;
        }
        backend_total += backends;
        plan.frontends.extend(frontends);
    }
    for (id, frontend) in plan.frontends.values_mut().enumerate() {
        frontend.entry.id = id as u32 + 1;
    }
    plan
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
    use super::*;
    use crate::model::{Endpoint, EndpointPort, ServicePort};

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
            addresses: vec![Ipv4Addr::from(ip)],
            ready,
            serving: true,
            terminating,
            node_name: Some(node.into()),
        }
    }

    fn snapshot(service: Service, ports: Vec<EndpointPort>, endpoints: Vec<Endpoint>) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.services
            .insert(NamespacedName::new("default", "web"), service);
        snap.endpoint_slices.insert(
            NamespacedName::new("default", "web-abc"),
            EndpointSlice {
                namespace: "default".into(),
                name: "web-abc".into(),
                service_name: Some("web".into()),
                ports,
                endpoints,
            },
        );
        snap
    }

    fn cidr() -> Ipv4Net {
        "10.234.1.0/24".parse().unwrap()
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
            .insert(NamespacedName::new("default", "big"), big);
        // Services are planned in name order: default/big (2 frontends)
        // takes the room for 2, default/web does not fit and is left out.
        let plan = plan_within(&snap, "edge-1", cidr(), 2, 100);
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
        let plan = plan_within(&snap, "edge-1", cidr(), 100, 1);
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
}
