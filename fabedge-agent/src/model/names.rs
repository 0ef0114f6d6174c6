//! Compact shapes for what a large cluster holds by the hundred thousand:
//! an endpoint's addresses (almost always one) and the name of the node it
//! runs on (one of a few, repeated on every endpoint).

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    ops::Deref,
    sync::{Arc, Mutex, PoisonError},
};

use serde::{Serialize, Serializer};

/// An endpoint's addresses. The EndpointSlice controller writes exactly
/// one, kept inline; more (allowed, up to 100) go to the heap.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Addresses {
    One(Ipv4Addr),
    Many(Box<[Ipv4Addr]>),
}

impl Deref for Addresses {
    type Target = [Ipv4Addr];

    fn deref(&self) -> &[Ipv4Addr] {
        match self {
            Addresses::One(address) => std::slice::from_ref(address),
            Addresses::Many(addresses) => addresses,
        }
    }
}

impl From<Vec<Ipv4Addr>> for Addresses {
    fn from(addresses: Vec<Ipv4Addr>) -> Addresses {
        match addresses[..] {
            [one] => Addresses::One(one),
            _ => Addresses::Many(addresses.into_boxed_slice()),
        }
    }
}

impl From<Ipv4Addr> for Addresses {
    fn from(address: Ipv4Addr) -> Addresses {
        Addresses::One(address)
    }
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Addresses {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// The names given out so far, each held once however many endpoints
/// name it.
static NAMES: Mutex<Names> = Mutex::new(Names::new());

struct Names {
    set: Option<HashSet<Arc<str>>>,
    /// How many names were left after the last prune.
    pruned_at: usize,
}

impl Names {
    const fn new() -> Names {
        Names {
            set: None,
            pruned_at: 0,
        }
    }

    /// Names no endpoint holds any more are let go when the set has doubled
    /// since they were last looked at, so a cluster whose nodes come and go
    /// does not grow it for ever.
    fn get(&mut self, name: &str) -> Arc<str> {
        let set = self.set.get_or_insert_with(HashSet::new);
        if let Some(known) = set.get(name) {
            return known.clone();
        }
        if set.len() >= 2 * self.pruned_at.max(64) {
            set.retain(|name| Arc::strong_count(name) > 1);
            self.pruned_at = set.len();
        }
        let name: Arc<str> = Arc::from(name);
        set.insert(name.clone());
        name
    }
}

/// `name` as an endpoint's node, shared with every other endpoint on it.
pub fn node_name(name: &str) -> Arc<str> {
    NAMES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_is_inline_and_more_keep_their_order() {
        let a: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let b: Ipv4Addr = "10.0.0.2".parse().unwrap();
        assert_eq!(Addresses::from(vec![a]), Addresses::One(a));
        assert_eq!(&*Addresses::from(vec![b, a]), &[b, a]);
        assert!(Addresses::from(Vec::new()).is_empty());
        assert_eq!(
            serde_json::to_string(&Addresses::from(a)).unwrap(),
            r#"["10.0.0.1"]"#
        );
        assert!(std::mem::size_of::<Addresses>() <= 24);
    }

    #[test]
    fn a_node_name_is_held_once_and_let_go_when_unused() {
        let mut names = Names::new();
        let first = names.get("edge-1");
        let second = names.get("edge-1");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(&*first, "edge-1");
        drop((first, second));
        let held: Vec<_> = (0..127).map(|n| names.get(&format!("fill-{n}"))).collect();
        assert!(
            names.set.as_ref().unwrap().contains("edge-1"),
            "not pruned yet"
        );
        // The 129th name finds 128: the unused one goes, the held ones stay.
        let _last = names.get("edge-2");
        let set = names.set.as_ref().unwrap();
        assert!(!set.contains("edge-1"));
        assert!(held.iter().all(|name| set.contains(&**name)));
        assert_eq!(names.pruned_at, 127);
    }

    #[test]
    fn node_names_are_shared_across_callers() {
        assert!(Arc::ptr_eq(
            &node_name("edge-shared"),
            &node_name("edge-shared")
        ));
    }
}
