//! Edge pod CIDRs for edge Nodes that have no `spec.podCIDR` (clusters whose
//! controller manager does not allocate them, or allocates from a range edge
//! sites cannot use). The leading connector allocates blocks of a configured
//! pool and records each in the Node's `fabedge.io/pod-cidr` annotation.
//!
//! There is no other state: every pass rebuilds "what is taken" from all
//! Nodes' `spec.podCIDR(s)` and annotations, so an agent restart (or a new
//! leader) continues where the last one stopped. Allocation is
//! deterministic — nodes by name, blocks lowest first — and never hands out
//! a block overlapping anything taken, so two nodes never share a CIDR.

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1 as core;

use crate::model::{annotation, label};

/// `--edge-pod-cidr-pool` split into `/--edge-pod-cidr-size` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub cidr: Ipv4Net,
    pub block_prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("edge pod CIDR pool {cidr}: block size /{prefix} must be between /{} and /30", cidr.prefix_len())]
    BlockSize { cidr: Ipv4Net, prefix: u8 },
    #[error("edge pod CIDR pool {cidr} has host bits set; did you mean {}?", cidr.trunc())]
    HostBits { cidr: Ipv4Net },
}

impl Pool {
    pub fn new(cidr: Ipv4Net, block_prefix: u8) -> Result<Pool, PoolError> {
        if cidr != cidr.trunc() {
            return Err(PoolError::HostBits { cidr });
        }
        if block_prefix < cidr.prefix_len() || block_prefix > 30 {
            return Err(PoolError::BlockSize {
                cidr,
                prefix: block_prefix,
            });
        }
        Ok(Pool { cidr, block_prefix })
    }

    fn blocks(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.cidr
            .subnets(self.block_prefix)
            .expect("checked in Pool::new")
    }
}

/// The outcome of one allocation pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Node → newly allocated block: write it as `fabedge.io/pod-cidr`.
    pub assigned: BTreeMap<String, Ipv4Net>,
    /// Edge nodes that need a block but the pool has none left.
    pub exhausted: Vec<String>,
    /// Annotations that were ignored (malformed, or overlapping another
    /// node's CIDR), each naming the node; those nodes get a new block.
    pub problems: Vec<String>,
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn ipv4(value: &str) -> Option<Ipv4Net> {
    match value.trim().parse::<IpNet>() {
        Ok(IpNet::V4(net)) if net == net.trunc() => Some(net),
        _ => None,
    }
}

fn spec_cidrs(node: &core::Node) -> Vec<Ipv4Net> {
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.pod_cidr.as_deref())
        .into_iter()
        .chain(
            spec.and_then(|s| s.pod_cidrs.as_deref())
                .unwrap_or_default()
                .iter()
                .map(String::as_str),
        )
        .filter_map(ipv4)
        .collect()
}

fn is_edge(node: &core::Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(label::EDGE))
}

/// Allocates blocks of `pool` to edge nodes in `nodes` that have neither a
/// `spec.podCIDR` nor a valid, unique `fabedge.io/pod-cidr`.
pub fn allocate(nodes: &[core::Node], pool: &Pool) -> Allocation {
    let mut nodes: Vec<&core::Node> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let name = |n: &core::Node| n.metadata.name.clone().unwrap_or_default();

    // spec.podCIDRs come from the controller manager and are never moved.
    let mut taken: Vec<Ipv4Net> = nodes.iter().flat_map(|n| spec_cidrs(n)).collect();
    let mut allocation = Allocation::default();
    let mut needing = Vec::new();
    for node in &nodes {
        if !spec_cidrs(node).is_empty() {
            continue;
        }
        let annotated = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation::POD_CIDR));
        match annotated.map(|v| (v, ipv4(v))) {
            Some((_, Some(cidr))) if !taken.iter().any(|t| overlaps(*t, cidr)) => taken.push(cidr),
            Some((value, parsed)) => {
                let why = if parsed.is_some() {
                    "overlaps another node's pod CIDR"
                } else {
                    "is not an IPv4 CIDR"
                };
                allocation.problems.push(format!(
                    "node {}: annotation {} {value:?} {why}",
                    name(node),
                    annotation::POD_CIDR
                ));
                if is_edge(node) {
                    needing.push(name(node));
                }
            }
            None if is_edge(node) => needing.push(name(node)),
            None => {}
        }
    }

    let mut free = pool
        .blocks()
        .filter(|b| !taken.iter().any(|t| overlaps(*t, *b)));
    for node in needing {
        match free.next() {
            Some(block) => {
                allocation.assigned.insert(node, block);
            }
            None => allocation.exhausted.push(node),
        }
    }
    allocation
}

/// The pool as logs name it.
pub fn describe(pool: &Pool) -> String {
    let blocks = 1u64 << (pool.block_prefix - pool.cidr.prefix_len());
    format!(
        "{} in /{} blocks ({blocks} blocks)",
        pool.cidr, pool.block_prefix
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn node(
        name: &str,
        edge: bool,
        spec_cidr: Option<&str>,
        annotated: Option<&str>,
    ) -> core::Node {
        core::Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: edge.then(|| BTreeMap::from([(label::EDGE.to_owned(), String::new())])),
                annotations: annotated
                    .map(|c| BTreeMap::from([(annotation::POD_CIDR.to_owned(), c.to_owned())])),
                ..Default::default()
            },
            spec: Some(core::NodeSpec {
                pod_cidr: spec_cidr.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pool(cidr: &str, prefix: u8) -> Pool {
        Pool::new(cidr.parse().unwrap(), prefix).unwrap()
    }

    /// Writes the allocation into the nodes, as the leader's PATCH would.
    fn record(nodes: &mut [core::Node], allocation: &Allocation) {
        for node in nodes {
            if let Some(cidr) = allocation
                .assigned
                .get(node.metadata.name.as_deref().unwrap())
            {
                node.metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(annotation::POD_CIDR.into(), cidr.to_string());
            }
        }
    }

    fn all_cidrs(nodes: &[core::Node]) -> Vec<Ipv4Net> {
        nodes
            .iter()
            .filter_map(|n| {
                spec_cidrs(n).first().copied().or_else(|| {
                    n.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(annotation::POD_CIDR))
                        .and_then(|v| ipv4(v))
                })
            })
            .collect()
    }

    fn assert_disjoint(cidrs: &[Ipv4Net]) {
        for (i, a) in cidrs.iter().enumerate() {
            for b in &cidrs[i + 1..] {
                assert!(!overlaps(*a, *b), "{a} and {b} overlap");
            }
        }
    }

    #[test]
    fn five_hundred_edge_nodes_never_share_a_cidr_and_a_restart_allocates_nothing_new() {
        let pool = pool("10.234.0.0/15", 24);
        // Every 7th node already has a spec.podCIDR inside the pool: those
        // blocks must be skipped, never reallocated.
        let mut nodes: Vec<core::Node> = (0..500)
            .map(|i| {
                let spec = (i % 7 == 0).then(|| format!("10.234.{}.0/24", i / 7 * 3));
                node(&format!("edge-{i:03}"), true, spec.as_deref(), None)
            })
            .collect();
        nodes.push(node("cloud-1", false, Some("10.235.255.0/24"), None));
        let first = allocate(&nodes, &pool);
        assert!(
            first.exhausted.is_empty() && first.problems.is_empty(),
            "{first:?}"
        );
        assert_eq!(first.assigned.len(), 500 - 500usize.div_ceil(7));
        record(&mut nodes, &first);
        let cidrs = all_cidrs(&nodes);
        assert_eq!(cidrs.len(), 501);
        assert_disjoint(&cidrs);
        assert!(
            first
                .assigned
                .values()
                .all(|c| pool.cidr.contains(c) && c.prefix_len() == 24)
        );

        // A restart (or another leader) rebuilds from the annotations alone.
        assert_eq!(allocate(&nodes, &pool), Allocation::default());

        // Nodes joining later get blocks nobody holds; the same input gives the same answer.
        nodes.extend((0..5).map(|i| node(&format!("late-{i}"), true, None, None)));
        let later = allocate(&nodes, &pool);
        assert_eq!(later, allocate(&nodes, &pool));
        assert_eq!(later.assigned.len(), 5);
        record(&mut nodes, &later);
        assert_disjoint(&all_cidrs(&nodes));
    }

    #[test]
    fn exhausted_pool_names_the_nodes_left_without_a_cidr() {
        let pool = pool("10.234.0.0/23", 24);
        let nodes: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| node(n, true, None, None))
            .collect();
        let allocation = allocate(&nodes, &pool);
        assert_eq!(allocation.assigned.len(), 2);
        assert_eq!(allocation.exhausted, ["c"]);
    }

    #[test]
    fn duplicate_or_malformed_annotations_are_reallocated_not_shared() {
        let pool = pool("10.234.0.0/16", 24);
        let nodes = vec![
            node("a", true, None, Some("10.234.0.0/24")),
            node("b", true, None, Some("10.234.0.0/24")),
            node("c", true, None, Some("banana")),
            node("d", false, Some("10.234.1.0/24"), None),
        ];
        let allocation = allocate(&nodes, &pool);
        assert_eq!(
            allocation.assigned,
            BTreeMap::from([
                ("b".to_owned(), "10.234.2.0/24".parse().unwrap()),
                ("c".to_owned(), "10.234.3.0/24".parse().unwrap())
            ])
        );
        assert_eq!(allocation.problems.len(), 2, "{:?}", allocation.problems);
        assert!(
            allocation.problems[0].contains("node b")
                && allocation.problems[0].contains("overlaps")
        );
        let unique: BTreeSet<_> = allocation.assigned.values().collect();
        assert_eq!(unique.len(), 2);
    }

    #[test]
    fn cloud_nodes_get_nothing_and_bad_pools_are_refused() {
        let nodes = vec![node("cloud", false, None, None)];
        assert_eq!(
            allocate(&nodes, &pool("10.234.0.0/16", 24)),
            Allocation::default()
        );
        assert!(Pool::new("10.234.0.1/16".parse().unwrap(), 24).is_err());
        assert!(Pool::new("10.234.0.0/16".parse().unwrap(), 8).is_err());
        assert!(Pool::new("10.234.0.0/16".parse().unwrap(), 31).is_err());
    }
}
