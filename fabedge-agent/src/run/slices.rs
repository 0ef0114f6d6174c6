//! The EndpointSlice shortcut, in both modes: when only EndpointSlices
//! changed since the last full pass, the Services they belong to are
//! planned again and their changed frontends and slots written; nothing
//! else is read, planned or compared. A change the checks would report
//! (an invalid slice, a slice of no Service, a name given twice) or maps too
//! small for every Service take the full pass, which reports them.

use std::{collections::BTreeSet, sync::Arc};

use log::warn;

use crate::{
    apply::Applier,
    maps::Maps,
    model::{EndpointSlice, NamespacedName, Snapshot},
    services::plan::{ServicePlan, replan_services},
};

/// What the last full pass applied, kept to patch.
#[derive(Debug, Clone)]
pub(super) struct Applied {
    /// The checked snapshot.
    pub snapshot: Snapshot,
    /// The Service part of its plan.
    pub services: ServicePlan,
}

/// One slice change: the slice of that name now (`None`: gone, or not an
/// IPv4 slice).
pub(super) type SliceChange = (NamespacedName, Option<Arc<EndpointSlice>>);

impl Applied {
    /// Apply `changes`, in order. False when only a full pass may apply
    /// them; then `self` no longer matches the maps (it may be patched
    /// halfway) and must be dropped.
    pub fn patch(
        &mut self,
        applier: &mut Applier,
        maps: &mut Maps,
        changes: Vec<SliceChange>,
    ) -> bool {
        // The Services concerned: old and new owner of every slice. A slice
        // of no Service is reported by the checks, before and after.
        let mut owners = BTreeSet::new();
        for (key, slice) in &changes {
            for owner in [self.snapshot.endpoint_slices.get(key), slice.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|slice| slice.service())
            {
                if !self.snapshot.services.contains_key(&owner) {
                    return false;
                }
                owners.insert(owner);
            }
        }
        for (key, slice) in changes {
            match slice {
                Some(slice) => self.snapshot.endpoint_slices.insert(key, slice),
                None => self.snapshot.endpoint_slices.remove(&key),
            };
        }
        // `None`: the maps cannot hold every Service; the full pass decides
        // which, and reports the others.
        let Some(changed) = replan_services(&mut self.services, &self.snapshot, &owners) else {
            return false;
        };
        if changed.is_empty() {
            return true;
        }
        match applier.apply_services(maps, &self.services, &changed) {
            Ok(_) => true,
            Err(e) => {
                warn!("EndpointSlice change: {e:#}; planning the whole node instead");
                false
            }
        }
    }
}
