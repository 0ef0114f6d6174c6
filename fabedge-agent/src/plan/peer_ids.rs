//! Peer ids: the index of a peer in `FE_PEERS`, also carried in skb marks and
//! used by per-peer statistics. Stable across replans, so a replan never
//! renumbers a peer that is still there.

use std::collections::{BTreeMap, BTreeSet};

use fabedge_common::MAX_PEERS;
use serde::{Deserialize, Serialize};

use super::error::PlanError;

/// Node name → peer id (`1..MAX_PEERS`). Serialises as a plain JSON object
/// so the agent can persist it between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerIds(BTreeMap<String, u16>);

impl PeerIds {
    pub fn new() -> Self {
        PeerIds::default()
    }

    pub fn get(&self, node: &str) -> Option<u16> {
        self.0.get(node).copied()
    }

    /// The node holding `id`.
    pub fn node(&self, id: u16) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| k.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u16)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Ids for exactly the peers in `wanted`: a peer keeps its id from `self`,
    /// a new peer gets the lowest free id, a vanished peer's id is freed.
    /// Ids from `self` that are out of range or held twice (a damaged state
    /// file) are not trusted: those peers are numbered afresh.
    pub fn assign<'n>(
        &self,
        wanted: impl IntoIterator<Item = &'n str>,
    ) -> Result<PeerIds, PlanError> {
        let wanted: BTreeSet<&str> = wanted.into_iter().collect();
        let max_id = MAX_PEERS - 1;
        if wanted.len() > max_id as usize {
            return Err(PlanError::TooManyPeers {
                wanted: wanted.len(),
                max: max_id,
            });
        }
        let mut assigned = BTreeMap::new();
        let mut used = BTreeSet::new();
        for (name, id) in &self.0 {
            let valid = *id != 0 && u32::from(*id) <= max_id;
            if valid && wanted.contains(name.as_str()) && used.insert(*id) {
                assigned.insert(name.clone(), *id);
            }
        }
        let mut free = (1..=max_id as u16).filter(|id| !used.contains(id));
        for name in wanted {
            if !assigned.contains_key(name) {
                let id = free.next().ok_or(PlanError::TooManyPeers {
                    wanted: assigned.len() + 1,
                    max: max_id,
                })?;
                assigned.insert(name.to_owned(), id);
            }
        }
        Ok(PeerIds(assigned))
    }
}

impl FromIterator<(String, u16)> for PeerIds {
    fn from_iter<I: IntoIterator<Item = (String, u16)>>(iter: I) -> Self {
        PeerIds(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(pairs: &[(&str, u16)]) -> PeerIds {
        pairs.iter().map(|(n, i)| (n.to_string(), *i)).collect()
    }

    #[test]
    fn kept_ids_stay_and_new_peers_fill_the_lowest_gap() {
        let previous = ids(&[("a", 1), ("b", 2), ("c", 3)]);
        let next = previous.assign(["a", "c", "d", "e"]).unwrap();
        assert_eq!(next, ids(&[("a", 1), ("c", 3), ("d", 2), ("e", 4)]));
    }

    #[test]
    fn damaged_state_is_renumbered_not_trusted() {
        let previous = ids(&[("a", 0), ("b", 7), ("c", 7), ("d", u16::MAX)]);
        let next = previous.assign(["a", "b", "c", "d"]).unwrap();
        assert_eq!(next, ids(&[("a", 1), ("b", 7), ("c", 2), ("d", 3)]));
    }

    #[test]
    fn more_peers_than_ids_is_an_error() {
        let names: Vec<String> = (0..MAX_PEERS).map(|i| format!("n{i}")).collect();
        let err = PeerIds::new()
            .assign(names.iter().map(String::as_str))
            .unwrap_err();
        assert_eq!(
            err,
            PlanError::TooManyPeers {
                wanted: MAX_PEERS as usize,
                max: MAX_PEERS - 1
            }
        );
    }

    #[test]
    fn persists_as_a_plain_json_object() {
        let original = ids(&[("edge-1", 2), ("edge-2", 1)]);
        let json = serde_json::to_string(&original).unwrap();
        assert_eq!(json, r#"{"edge-1":2,"edge-2":1}"#);
        assert_eq!(serde_json::from_str::<PeerIds>(&json).unwrap(), original);
    }
}
