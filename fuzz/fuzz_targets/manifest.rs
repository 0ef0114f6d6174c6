//! The manifest source end to end: YAML text → Kubernetes objects → model
//! snapshot → a plan for each node. Nothing may panic or hang, and every
//! error names where it is (document, object) or which object it is about.

#![no_main]

use fabedge_agent::{
    plan::{self, PeerIds, PlanError, Settings},
    source::manifest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let objects = match manifest::parse(text) {
        Ok(objects) => objects,
        Err(e) => {
            assert!(
                !e.detail.is_empty() && (e.location.is_some() || e.object.is_some()),
                "a manifest error names neither its place nor its object: {e}"
            );
            return;
        }
    };
    let snapshot = match objects.snapshot() {
        Ok(snapshot) => snapshot,
        Err(e) => {
            assert!(
                e.to_string().contains(e.object().kind),
                "a model error names no object: {e}"
            );
            return;
        }
    };
    // Plan a few nodes as the agent would: connector settings complete, so
    // errors come from the objects, not from missing flags.
    let settings = Settings {
        uplink: Some("eth0".into()),
        flannel_mac: Some([0x66, 0x66, 0, 0, 0, 1]),
        ..Settings::default()
    };
    for me in snapshot.nodes.keys().take(4) {
        match plan::plan(&snapshot, me, &settings, &PeerIds::default()) {
            Ok(_) => {}
            Err(e) => {
                let named = |node: &str| snapshot.nodes.contains_key(node);
                let ok = match &e {
                    PlanError::UnknownNode { .. } => false,
                    PlanError::MissingPodCidr { node }
                    | PlanError::PodCidrTooSmall { node, .. }
                    | PlanError::ServiceCidrOverlap { node, .. } => named(node),
                    PlanError::PodCidrOverlap { first, second, .. } => {
                        named(first) && named(second)
                    }
                    PlanError::RouteConflict { first, second, .. } => {
                        !first.is_empty() && !second.is_empty()
                    }
                    PlanError::TunnelLoop { owner, peer, .. } => named(peer) && !owner.is_empty(),
                    PlanError::TooManyPeers { .. } | PlanError::Setting { .. } => true,
                };
                assert!(
                    ok,
                    "planning {me}: the error does not name an object of the snapshot: {e}"
                );
            }
        }
    }
});
