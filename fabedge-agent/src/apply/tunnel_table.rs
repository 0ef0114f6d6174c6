//! Policy routing for what the datapath already sent to a tunnel: a packet
//! the TC programs marked `to-tunnel` (and handed to the kernel's slow
//! path: ESP mode always, VXLAN mode for what the fast path punts) is
//! routed by the table [`TABLE`], where every tunnel prefix goes to
//! `fe-tunnel`, not by the main table.
//!
//! Why: the main table is shared. On a connector, Flannel owns a route to
//! every edge's pod CIDR (`via flannel.1` to the edge's connector VTEP
//! address, from the lease); on the edge's own connector that address is
//! its own, but a standby connector that took over a dead one's edges
//! would send the edges' traffic back into Flannel, not to the tunnel.
//! Apply never replaces a route it did not create, so the datapath's
//! decision must not depend on the main table. Packets without our mark
//! (locally originated, Flannel's, everyone else's) never see the table.
//!
//! The table holds only tunnel prefixes, never a default route: an
//! encrypted or encapsulated packet that still carries the mark and is
//! routed again (netfilter rerouting) finds its outer destination missing
//! here and falls through to the main table, as before this table existed.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use fabedge_common::{TUNNEL_DEV, mark};
use ipnet::Ipv4Net;

use super::{
    net::RTPROT_FABEDGE,
    rtnl::{RouteSpec, Rtnl, RuleSpec},
};
use crate::plan::KernelRoute;

/// Our routing table and our rule's priority (0xfab): ahead of the main
/// table's rule (32766), behind the local table's (0).
pub const TABLE: u32 = 0xfab;
pub const RULE_PRIORITY: u32 = 0xfab;

/// The one rule: `fwmark 0xe00/0xf00 lookup 4011`.
pub const RULE: RuleSpec = RuleSpec {
    priority: RULE_PRIORITY,
    fwmark: mark::MAGIC_TO_TUNNEL,
    fwmask: mark::MAGIC_MASK,
    table: TABLE,
    protocol: RTPROT_FABEDGE,
};

/// The table's routes for a plan: its routes through `fe-tunnel`, each one
/// whether or not the main table could take it.
pub fn wanted(kernel_routes: &[KernelRoute]) -> BTreeSet<Ipv4Net> {
    kernel_routes
        .iter()
        .filter(|r| r.dev.as_deref() == Some(TUNNEL_DEV) && r.via.is_none())
        .map(|r| r.dst)
        .collect()
}

/// What the node holds now: the table's routes and whether our rule is in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelTable {
    pub prefixes: BTreeSet<Ipv4Net>,
    pub rule: bool,
}

impl TunnelTable {
    pub fn read() -> Result<TunnelTable> {
        let mut nl = Rtnl::open()?;
        let prefixes = nl
            .routes()?
            .into_iter()
            .filter(|r| r.table == TABLE && r.protocol == RTPROT_FABEDGE)
            .map(|r| r.dst)
            .collect();
        let rule = nl.rules()?.iter().any(is_ours);
        Ok(TunnelTable { prefixes, rule })
    }
}

/// Ours, whoever added it: the same match, the same table. A rule with our
/// table but another priority or mark is ours too (an older agent's), and
/// goes when the table goes.
fn is_ours(rule: &RuleSpec) -> bool {
    rule.table == TABLE && rule.protocol == RTPROT_FABEDGE
}

/// Make the node hold exactly `prefixes` in the table, and the rule while
/// there is any. Routes first, rule last when adding; rule first when the
/// table empties: a marked packet never meets a rule with nothing behind
/// it. Returns how many kernel objects changed.
pub fn sync(prefixes: &BTreeSet<Ipv4Net>) -> Result<usize> {
    let now = TunnelTable::read()?;
    let mut nl = Rtnl::open()?;
    let mut changed = 0;
    if prefixes.is_empty() {
        changed += remove_rules(&mut nl)?;
    }
    if prefixes.iter().any(|p| !now.prefixes.contains(p)) {
        let oif = nl
            .link(TUNNEL_DEV)?
            .with_context(|| format!("routing table {TABLE}: device {TUNNEL_DEV} does not exist"))?
            .index;
        for dst in prefixes.difference(&now.prefixes) {
            let spec = RouteSpec {
                dst: *dst,
                table: TABLE,
                protocol: RTPROT_FABEDGE,
                oif: Some(oif),
                gateway: None,
                prefsrc: None,
            };
            let what = format!("route {dst} dev {TUNNEL_DEV} table {TABLE}");
            nl.replace_route(&spec, &what)?;
            changed += 1;
        }
    }
    for dst in now.prefixes.difference(prefixes) {
        let what = format!("deleting route {dst} table {TABLE}");
        match nl.del_route(*dst, TABLE, RTPROT_FABEDGE, &what) {
            Err(e) if e.errno() == Some(libc::ESRCH) => {}
            other => other?,
        }
        changed += 1;
    }
    if !prefixes.is_empty() && !nl.rules()?.contains(&RULE) {
        // An older agent's variant of the rule makes way for this one.
        changed += remove_rules(&mut nl)?;
        let what = format!(
            "adding rule fwmark {:#x}/{:#x} lookup {TABLE} priority {RULE_PRIORITY}",
            RULE.fwmark, RULE.fwmask
        );
        match nl.add_rule(&RULE, &what) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            other => other?,
        }
        changed += 1;
    }
    Ok(changed)
}

fn remove_rules(nl: &mut Rtnl) -> Result<usize> {
    let mut removed = 0;
    for rule in nl.rules()?.into_iter().filter(is_ours) {
        let what = format!(
            "deleting rule fwmark {:#x}/{:#x} lookup {} priority {}",
            rule.fwmark, rule.fwmask, rule.table, rule.priority
        );
        match nl.del_rule(&rule, &what) {
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            other => other?,
        }
        removed += 1;
    }
    Ok(removed)
}

/// Uninstall: the rule and every route of the table, described for the report.
pub fn teardown() -> Result<Vec<String>> {
    let now = TunnelTable::read()?;
    let mut removed = Vec::new();
    if now.rule {
        removed.push(format!(
            "rule fwmark {:#x}/{:#x} lookup {TABLE}",
            RULE.fwmark, RULE.fwmask
        ));
    }
    removed.extend(
        now.prefixes
            .iter()
            .map(|p| format!("route {p} table {TABLE}")),
    );
    sync(&BTreeSet::new())?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn route(dst: &str, dev: Option<&str>, via: Option<Ipv4Addr>) -> KernelRoute {
        KernelRoute {
            dst: dst.parse().unwrap(),
            dev: dev.map(str::to_owned),
            via,
            src: None,
        }
    }

    #[test]
    fn the_table_holds_every_tunnel_prefix_and_nothing_routed_elsewhere() {
        let routes = [
            route("10.244.3.0/24", Some(TUNNEL_DEV), None),
            route("10.1.0.13/32", Some(TUNNEL_DEV), None),
            // A cloud node's route to an edge's node address via a VTEP.
            route("10.2.0.11/32", None, Some(Ipv4Addr::new(10, 1, 0, 201))),
            route("10.244.9.0/24", Some("eth0"), None),
        ];
        let wanted = wanted(&routes);
        assert_eq!(
            wanted
                .into_iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
            ["10.1.0.13/32", "10.244.3.0/24"]
        );
    }

    #[test]
    fn the_rule_matches_exactly_the_to_tunnel_magic() {
        assert_eq!(RULE.fwmark & !RULE.fwmask, 0);
        assert_eq!(RULE.fwmark, mark::MAGIC_TO_TUNNEL);
        // A from-tunnel or a foreign (kube-proxy) mark does not match.
        for other in [mark::MAGIC_FROM_TUNNEL, 0x4000, 0x8000, 0] {
            assert_ne!(other & RULE.fwmask, RULE.fwmark);
        }
        // Any peer id and generation still do.
        let marked = mark::to_tunnel(0x4000, 513) | (2 << mark::GEN_SHIFT);
        assert_eq!(marked & RULE.fwmask, RULE.fwmark);
    }
}
