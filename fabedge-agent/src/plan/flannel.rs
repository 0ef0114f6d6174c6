//! The annotation trick (DESIGN.md §1): every edge Node carries the
//! connector's Flannel lease, so Flannel on each cloud node sends VXLAN for
//! edge pod CIDRs to the connector's VTEP. Written by the active connector.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;

use super::connectors::Connectors;
use crate::model::AnnotationPatch;
use crate::model::{FLANNEL_VXLAN_BACKEND, Node, Role, Snapshot, annotation, format_mac};

/// Flannel's `backend-data` JSON, written exactly as the article shows it.
#[derive(Serialize)]
struct VxlanBackendData {
    #[serde(rename = "VtepMAC")]
    vtep_mac: String,
}

/// The four annotations, with the connector's VTEP in them.
pub fn masquerade_lease(vtep_mac: [u8; 6], public_ip: Ipv4Addr) -> BTreeMap<String, String> {
    let backend_data = serde_json::to_string(&VxlanBackendData {
        vtep_mac: format_mac(vtep_mac),
    })
    .expect("a struct of one string always serialises");
    BTreeMap::from([
        (annotation::FLANNEL_BACKEND_DATA.to_owned(), backend_data),
        (
            annotation::FLANNEL_BACKEND_TYPE.to_owned(),
            FLANNEL_VXLAN_BACKEND.to_owned(),
        ),
        (
            annotation::FLANNEL_KUBE_SUBNET_MANAGER.to_owned(),
            "true".to_owned(),
        ),
        (
            annotation::FLANNEL_PUBLIC_IP.to_owned(),
            public_ip.to_string(),
        ),
    ])
}

/// Changes that make every edge Node carry the lease of its first
/// connector (that connector's flannel.1 MAC, and its shared VTEP address
/// as `public-ip`), and take a connector's lease off Nodes that are no
/// longer edge nodes (never off a connector itself, whose lease is its
/// own). Every connector computes the same patches from the same snapshot,
/// so they never fight. `me`'s MAC comes from `own_mac` until Flannel has
/// written its lease; an edge whose connector has no MAC yet is skipped.
pub fn annotation_patches(
    snapshot: &Snapshot,
    connectors: &Connectors<'_>,
    me: &str,
    own_mac: Option<[u8; 6]>,
) -> Vec<AnnotationPatch> {
    let mac_of = |connector: &Node| {
        connector
            .flannel
            .as_ref()
            .map(|lease| lease.vtep_mac)
            .or(own_mac.filter(|_| connector.name == me))
    };
    let masquerades: Vec<([u8; 6], Ipv4Addr)> = connectors
        .nodes
        .iter()
        .filter_map(|c| Some((mac_of(c)?, connectors.cloud_address(c))))
        .collect();
    let mut patches = Vec::new();
    for node in snapshot
        .nodes
        .values()
        .filter(|n| n.role != Role::Connector)
    {
        let patch = if node.role == Role::Edge {
            let Some(primary) = connectors.primary(&node.name) else {
                continue;
            };
            let Some(mac) = mac_of(primary) else { continue };
            let wanted = masquerade_lease(mac, connectors.cloud_address(primary));
            let set: BTreeMap<String, String> = wanted
                .iter()
                .filter(|(key, value)| node.annotations.get(*key) != Some(value))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            AnnotationPatch {
                node: node.name.clone(),
                set,
                remove: Vec::new(),
            }
        } else {
            let ours = node
                .flannel
                .as_ref()
                .is_some_and(|l| masquerades.contains(&(l.vtep_mac, l.public_ip)));
            let remove = if ours {
                annotation::FLANNEL_LEASE
                    .iter()
                    .filter(|key| node.annotations.contains_key(**key))
                    .map(|key| (*key).to_owned())
                    .collect()
            } else {
                Vec::new()
            };
            AnnotationPatch {
                node: node.name.clone(),
                set: BTreeMap::new(),
                remove,
            }
        };
        if !patch.set.is_empty() || !patch.remove.is_empty() {
            patches.push(patch);
        }
    }
    patches
}
