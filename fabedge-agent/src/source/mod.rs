//! Where the cluster's objects come from. Every source delivers the same
//! Kubernetes objects ([`Objects`]) — k8s-openapi types, plus our Community
//! custom resource — and [`Objects::snapshot`] turns them into the model, so
//! a manifest file and the API server give identical snapshots.

pub mod kube;
pub mod last_good;
pub mod manifest;

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};

pub use crate::model::crd::{CommunityObject, CommunitySpec};
use crate::model::{ModelError, Snapshot};

/// The objects one source delivered, as Kubernetes shapes them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    pub nodes: Vec<core::Node>,
    pub communities: Vec<CommunityObject>,
    pub services: Vec<core::Service>,
    pub endpoint_slices: Vec<discovery::EndpointSlice>,
}

impl Objects {
    pub fn snapshot(&self) -> Result<Snapshot, ModelError> {
        Snapshot::from_objects(
            &self.nodes,
            &self.communities,
            &self.services,
            &self.endpoint_slices,
        )
    }
}
