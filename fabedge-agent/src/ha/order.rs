//! Which connector serves an edge, and who takes over when it dies.
//!
//! Rendezvous (highest random weight) hashing: every (key, connector) pair
//! gets a score and the highest score wins. Adding a connector moves only
//! the edges it now wins; removing one moves only the edges it had. Every
//! node computes the same answer on its own, so the hash must not change
//! between Rust releases or platforms: it is FNV-1a 64 over both names
//! with a NUL between them (never in a Kubernetes name), finished with
//! the splitmix64 mix so that names differing in one byte land far apart.
//!
//! Failover uses the *primary connector's* name as the key for the rest of
//! the order ([`successor_order`]): all edges of a connector fail over to
//! the same successor, which is also the connector that takes over the dead
//! one's shared VTEP address, so cloud traffic and edge traffic meet at the
//! same place.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The rendezvous score of `member` for `key`. Part of the cluster's wire
/// contract: every agent must compute the same value, so never change it.
pub fn score(key: &str, member: &str) -> u64 {
    let mut hash = FNV_OFFSET;
    for byte in key.bytes().chain([0u8]).chain(member.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    mix64(hash)
}

/// splitmix64's finalizer: FNV alone leaves its high bits poorly mixed for
/// names that differ only at the end (`edge-1`, `edge-2`).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The connector `edge` is assigned to while all are alive. Ties (never
/// seen in practice) go to the greater name, so the answer is still the
/// same everywhere.
pub fn primary<'a>(edge: &str, connectors: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    connectors
        .into_iter()
        .max_by_key(|connector| (score(edge, connector), *connector))
}

/// `others` ranked as successors of `connector` (best first): the order in
/// which they take over its edges and its shared VTEP address. `connector`
/// itself and repeated names are left out.
pub fn successor_order(connector: &str, others: &[&str]) -> Vec<String> {
    let mut ranked: Vec<&str> = others
        .iter()
        .copied()
        .filter(|other| *other != connector)
        .collect();
    ranked.sort_unstable_by_key(|other| std::cmp::Reverse((score(connector, other), *other)));
    ranked.dedup();
    ranked.into_iter().map(str::to_owned).collect()
}

/// The connectors `edge` may use, preferred first: its primary, then the
/// primary's successors. Empty when there is no connector.
pub fn failover_order(edge: &str, connectors: &[&str]) -> Vec<String> {
    let Some(first) = primary(edge, connectors.iter().copied()) else {
        return Vec::new();
    };
    let mut order = vec![first.to_owned()];
    order.extend(successor_order(first, connectors));
    order
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Names like a cluster's, drawn from a fixed-seed generator so the
    /// property tests are reproducible.
    fn names(prefix: &str, count: usize, seed: u64) -> Vec<String> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                format!("{prefix}-{:x}", mix64(state) % 0xff_ffff)
            })
            .collect()
    }

    fn refs(names: &[String]) -> Vec<&str> {
        names.iter().map(String::as_str).collect()
    }

    /// Pinned outputs: if these change, agents of two versions disagree on
    /// who serves an edge during a rolling upgrade.
    /// Values computed independently (a few lines of Python) when pinned.
    #[test]
    fn scores_are_stable_across_builds() {
        assert_eq!(score("", ""), 0x25fc_6dd3_6ce0_4b20);
        assert_eq!(score("edge-1", "connector-a"), 0x1cc5_7359_6650_178c);
        assert_eq!(score("edge-1", "connector-b"), 0xb88d_b9ca_85ca_0838);
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }

    #[test]
    fn pinned_assignments() {
        let connectors = ["connector-a", "connector-b", "connector-c"];
        let got: Vec<(&str, Option<&str>)> = ["edge-1", "edge-2", "edge-3", "edge-4"]
            .into_iter()
            .map(|edge| (edge, primary(edge, connectors)))
            .collect();
        assert_eq!(
            got,
            [
                ("edge-1", Some("connector-b")),
                ("edge-2", Some("connector-a")),
                ("edge-3", Some("connector-c")),
                ("edge-4", Some("connector-c")),
            ]
        );
        // Computed independently (a few lines of Python) when pinned.
        assert_eq!(
            failover_order("edge-1", &connectors),
            ["connector-b", "connector-c", "connector-a"]
        );
    }

    #[test]
    fn no_connector_no_primary() {
        assert_eq!(primary("edge-1", []), None);
        assert!(failover_order("edge-1", &[]).is_empty());
    }

    #[test]
    fn order_does_not_depend_on_input_order() {
        let connectors = names("connector", 5, 1);
        let mut shuffled = refs(&connectors);
        shuffled.reverse();
        shuffled.swap(0, 2);
        for edge in names("edge", 50, 2) {
            assert_eq!(
                failover_order(&edge, &refs(&connectors)),
                failover_order(&edge, &shuffled)
            );
        }
    }

    #[test]
    fn failover_order_lists_each_connector_once_primary_first() {
        let connectors = names("connector", 4, 3);
        let all = refs(&connectors);
        for edge in names("edge", 100, 4) {
            let order = failover_order(&edge, &all);
            assert_eq!(order[0], primary(&edge, all.iter().copied()).unwrap());
            let mut sorted = order.clone();
            sorted.sort();
            let mut expected = connectors.clone();
            expected.sort();
            assert_eq!(sorted, expected);
        }
    }

    /// Every edge of one connector has the same successor: the one that
    /// also takes over the connector's VTEP address.
    #[test]
    fn edges_of_a_connector_share_one_successor() {
        let connectors = names("connector", 5, 5);
        let all = refs(&connectors);
        let mut successors: BTreeMap<String, String> = BTreeMap::new();
        for edge in names("edge", 500, 6) {
            let order = failover_order(&edge, &all);
            let successor = successors
                .entry(order[0].clone())
                .or_insert_with(|| order[1].clone());
            assert_eq!(&order[1], successor, "edge {edge}");
            assert_eq!(order[1..], successor_order(&order[0], &all));
        }
    }

    #[test]
    fn adding_a_connector_moves_edges_only_to_it() {
        for seed in 0..20 {
            let connectors = names("connector", 1 + (seed as usize % 5), seed);
            let added = format!("connector-new-{seed}");
            let before = refs(&connectors);
            let mut after = before.clone();
            after.push(&added);
            let mut moved = 0;
            for edge in names("edge", 300, seed + 100) {
                let old = primary(&edge, before.iter().copied()).unwrap();
                let new = primary(&edge, after.iter().copied()).unwrap();
                if old != new {
                    assert_eq!(new, added, "edge {edge} moved from {old} to {new}");
                    moved += 1;
                }
            }
            assert!(moved > 0, "the new connector got no edge (seed {seed})");
        }
    }

    #[test]
    fn removing_a_connector_moves_only_its_edges() {
        for seed in 0..20 {
            let connectors = names("connector", 2 + (seed as usize % 5), seed + 1000);
            let before = refs(&connectors);
            let removed = before[seed as usize % before.len()];
            let after: Vec<&str> = before.iter().copied().filter(|c| *c != removed).collect();
            for edge in names("edge", 300, seed + 2000) {
                let old = primary(&edge, before.iter().copied()).unwrap();
                let new = primary(&edge, after.iter().copied()).unwrap();
                if old != removed {
                    assert_eq!(
                        old, new,
                        "edge {edge} moved though {removed} was not its connector"
                    );
                }
            }
        }
    }

    #[test]
    fn two_connectors_split_a_thousand_edges_evenly() {
        let connectors = ["connector-a", "connector-b"];
        let on_a = (0..1000)
            .filter(|i| primary(&format!("edge-{i}"), connectors) == Some("connector-a"))
            .count();
        assert!(
            (400..=600).contains(&on_a),
            "{on_a} of 1000 edges on connector-a"
        );
    }
}
