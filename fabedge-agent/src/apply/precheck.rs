//! Everything apply can check before its first write: a plan that fails
//! here changes nothing on the node. Pure, so it is unit tested without root;
//! [`HostFacts::observe`] reads what it needs from the host.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Result, bail};
use fabedge_common::{MAX_GROUPS, MAX_PEERS, MAX_VTEP_ADDRS};
use ipnet::Ipv4Net;

use super::net;
use crate::{
    maps::Capacity,
    model::checks::Problem,
    plan::{KernelRoute, Plan},
};

/// What the pre-checks need to know about the host.
#[derive(Debug, Default, Clone)]
pub struct HostFacts {
    /// Addresses on this host's interfaces.
    pub addresses: BTreeSet<Ipv4Addr>,
    /// Names of this host's interfaces.
    pub links: BTreeSet<String>,
    /// Main-table routes fabedge did not create, by destination (see
    /// [`net::foreign_routes`]).
    pub foreign_routes: BTreeMap<Ipv4Net, String>,
}

impl HostFacts {
    pub fn observe() -> Result<HostFacts> {
        Ok(HostFacts {
            addresses: net::local_addresses()?,
            links: net::link_names()?,
            foreign_routes: net::foreign_routes()?,
        })
    }
}

/// A plan that passed the pre-checks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The kernel routes to install: the plan's, less those in conflict.
    pub kernel_routes: Vec<KernelRoute>,
    /// Planned kernel routes left out because a route fabedge does not own
    /// has their destination: one problem each, naming both routes.
    pub conflicts: Vec<Problem>,
}

/// Check `plan` against the maps' `capacity` and the host. An error means
/// nothing may be written (it names the object and the fix); a route
/// conflict leaves that one route out and everything else applies.
pub fn precheck(plan: &Plan, capacity: &Capacity, host: &HostFacts) -> Result<Checked> {
    if plan.routes.len() > capacity.routes as usize {
        bail!(
            "the plan has {} routes but FE_ROUTES holds {}: nothing was applied; \
             reduce the number of nodes/prefixes or raise --max-routes",
            plan.routes.len(),
            capacity.routes
        );
    }
    if let Some(id) = plan
        .peers
        .keys()
        .find(|&&id| id == 0 || u32::from(id) >= MAX_PEERS)
    {
        bail!("peer id {id} is outside FE_PEERS (1..{MAX_PEERS}): nothing was applied");
    }
    for (&id, group) in &plan.groups {
        if id == 0 || u32::from(id) >= MAX_GROUPS {
            bail!("group id {id} is outside FE_GROUPS (1..{MAX_GROUPS}): nothing was applied");
        }
        let members: Vec<u16> = group
            .members
            .iter()
            .copied()
            .take_while(|&m| m != 0)
            .collect();
        if let Some(stranger) = members.iter().find(|m| !plan.peers.contains_key(m)) {
            bail!(
                "group {id} lists peer {stranger}, which the plan has no peer for: nothing was \
                 applied"
            );
        }
        if group.active != 0 && !members.contains(&group.active) {
            bail!(
                "group {id} makes peer {} active, which is not one of its members {members:?}: \
                 nothing was applied",
                group.active
            );
        }
    }
    if plan.vtep_addrs.len() > MAX_VTEP_ADDRS as usize {
        bail!(
            "the plan has {} shared VTEP addresses but FE_VTEP_ADDRS holds {MAX_VTEP_ADDRS}: \
             nothing was applied",
            plan.vtep_addrs.len()
        );
    }
    let frontends = plan.services.frontends.len();
    if frontends > capacity.services as usize {
        bail!(
            "the plan has {frontends} Service frontends but FE_SERVICES holds {}: nothing was \
             applied; raise --max-services",
            capacity.services
        );
    }
    let backends = plan.services.backend_count();
    if backends > capacity.backends as usize {
        bail!(
            "the plan has {backends} Service backends but FE_BACKENDS holds {}: nothing was \
             applied; raise --max-backends",
            capacity.backends
        );
    }
    let planned_devices: BTreeSet<&str> = plan.devices.iter().map(|d| d.name()).collect();
    let mut checked = Checked::default();
    for route in &plan.kernel_routes {
        let what = net::describe_route(route);
        if let Some(src) = route.src
            && !host.addresses.contains(&src)
        {
            bail!(
                "{what}: source address {src} is not on any interface of this host: nothing was \
                 applied; the Node's InternalIP must be one of this host's addresses"
            );
        }
        if let Some(dev) = &route.dev
            && !host.links.contains(dev)
            && !planned_devices.contains(dev.as_str())
        {
            bail!("{what}: device {dev} does not exist and the plan does not create it");
        }
        match host.foreign_routes.get(&route.dst) {
            Some(foreign) => checked.conflicts.push(Problem::new(
                &what,
                format!(
                    "collides with {foreign}, which fabedge did not create: left out (fabedge \
                     never replaces a route it does not own); a pod CIDR that covers a network \
                     of this host is the usual cause"
                ),
            )),
            None => checked.kernel_routes.push(route.clone()),
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        plan::{PeerIds, Settings, plan},
        source::manifest::{EXAMPLE_CLUSTER, snapshot},
    };

    fn edge_plan() -> Plan {
        let snapshot = snapshot(EXAMPLE_CLUSTER).unwrap();
        plan(&snapshot, "edge-1", &Settings::default(), &PeerIds::new()).unwrap()
    }

    /// edge-1's host as the example cluster describes it.
    fn edge_host() -> HostFacts {
        HostFacts {
            addresses: BTreeSet::from([Ipv4Addr::new(10, 2, 0, 11)]),
            links: BTreeSet::from(["eth0".to_owned()]),
            foreign_routes: BTreeMap::from([(
                "10.2.0.0/24".parse().unwrap(),
                "route 10.2.0.0/24 dev eth0 src 10.2.0.11 proto kernel".to_owned(),
            )]),
        }
    }

    #[test]
    fn a_plan_that_fits_the_host_keeps_every_kernel_route() {
        let plan = edge_plan();
        let checked = precheck(&plan, &Capacity::default(), &edge_host()).unwrap();
        assert_eq!(checked.kernel_routes, plan.kernel_routes);
        assert!(checked.conflicts.is_empty());
    }

    #[test]
    fn a_route_onto_a_connected_network_is_left_out_naming_both_routes() {
        let mut plan = edge_plan();
        let lan = KernelRoute {
            dst: "10.2.0.0/24".parse().unwrap(),
            dev: Some("fe-tunnel".into()),
            via: None,
            src: Some(Ipv4Addr::new(10, 2, 0, 11)),
        };
        plan.kernel_routes.push(lan.clone());
        let checked = precheck(&plan, &Capacity::default(), &edge_host()).unwrap();
        assert!(!checked.kernel_routes.contains(&lan));
        assert_eq!(checked.kernel_routes.len(), plan.kernel_routes.len() - 1);
        assert_eq!(
            checked.conflicts,
            [Problem::new(
                "route 10.2.0.0/24 dev fe-tunnel src 10.2.0.11",
                "collides with route 10.2.0.0/24 dev eth0 src 10.2.0.11 proto kernel, which \
                 fabedge did not create: left out (fabedge never replaces a route it does not \
                 own); a pod CIDR that covers a network of this host is the usual cause"
            )]
        );
    }

    #[test]
    fn a_source_address_missing_from_the_host_fails_before_any_write() {
        let plan = edge_plan();
        let mut host = edge_host();
        host.addresses.clear();
        let err = precheck(&plan, &Capacity::default(), &host)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("source address 10.2.0.11 is not on any interface of this host")
                && err.contains("nothing was applied"),
            "{err}"
        );
    }

    #[test]
    fn capacities_come_from_the_flags() {
        let plan = edge_plan();
        let routes = plan.routes.len() as u32;
        let tight = Capacity {
            routes: routes - 1,
            ..Capacity::default()
        };
        let err = precheck(&plan, &tight, &edge_host())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "the plan has {routes} routes but FE_ROUTES holds {}: nothing was applied; \
                 reduce the number of nodes/prefixes or raise --max-routes",
                routes - 1
            )
        );
        let exact = Capacity {
            routes,
            ..Capacity::default()
        };
        precheck(&plan, &exact, &edge_host()).unwrap();
        let frontends = plan.services.frontends.len() as u32;
        assert!(frontends > 0, "the example has Services on edge-1");
        let err = precheck(
            &plan,
            &Capacity {
                services: frontends - 1,
                ..Capacity::default()
            },
            &edge_host(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("raise --max-services"), "{err}");
    }

    #[test]
    fn groups_must_list_planned_peers_and_activate_a_member() {
        use fabedge_common::GroupEntry;
        let mut plan = edge_plan();
        let (&a, _) = plan.peers.iter().next().expect("edge-1 has peers");
        let mut members = [0; fabedge_common::MAX_GROUP_MEMBERS];
        members[0] = a;
        let fine = GroupEntry { active: a, members };
        plan.groups.insert(1, fine);
        precheck(&plan, &Capacity::default(), &edge_host()).unwrap();
        let err = |plan: &Plan| {
            precheck(plan, &Capacity::default(), &edge_host())
                .unwrap_err()
                .to_string()
        };
        let mut stranger = plan.clone();
        stranger.groups.get_mut(&1).unwrap().members[1] = 4000;
        assert_eq!(
            err(&stranger),
            "group 1 lists peer 4000, which the plan has no peer for: nothing was applied"
        );
        let mut inactive = plan.clone();
        inactive.groups.get_mut(&1).unwrap().active = 4000;
        assert_eq!(
            err(&inactive),
            format!(
                "group 1 makes peer 4000 active, which is not one of its members [{a}]: nothing \
                 was applied"
            )
        );
        let mut out_of_range = plan.clone();
        out_of_range.groups.insert(16, fine);
        assert_eq!(
            err(&out_of_range),
            "group id 16 is outside FE_GROUPS (1..16): nothing was applied"
        );
        let mut vteps = plan;
        vteps.vtep_addrs = (0..65).map(|i| Ipv4Addr::new(10, 9, 0, i)).collect();
        assert_eq!(
            err(&vteps),
            "the plan has 65 shared VTEP addresses but FE_VTEP_ADDRS holds 64: nothing was applied"
        );
    }
}
