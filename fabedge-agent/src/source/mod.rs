//! Where the cluster's objects come from. Every source delivers the same
//! Kubernetes objects ([`Objects`]) — k8s-openapi types, plus our Community
//! custom resource — and [`Objects::snapshot`] turns them into the model, so
//! a manifest file and the API server give identical snapshots.

pub mod kube;
pub mod manifest;

use k8s_openapi::{
    ClusterResourceScope, ListableResource, Metadata, Resource,
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Serialize, ser::SerializeStruct};

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

/// The `Community` custom resource (`fabedge.io/v1alpha1`, cluster-scoped):
/// edge nodes listed together in `spec.members` get direct tunnels.
///
/// It implements k8s-openapi's `Resource` and `Metadata`, which is all
/// kube-rs needs to list and watch it (`Api<CommunityObject>`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CommunityObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: CommunitySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommunitySpec {
    /// Node names.
    #[serde(default)]
    pub members: Vec<String>,
}

impl Resource for CommunityObject {
    const API_VERSION: &'static str = "fabedge.io/v1alpha1";
    const GROUP: &'static str = "fabedge.io";
    const KIND: &'static str = "Community";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "communities";
    type Scope = ClusterResourceScope;
}

impl ListableResource for CommunityObject {
    const LIST_KIND: &'static str = "CommunityList";
}

impl Metadata for CommunityObject {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Written by hand so the object carries its `apiVersion` and `kind`, as
/// k8s-openapi's own types do.
impl Serialize for CommunityObject {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut state = serializer.serialize_struct(Self::KIND, 4)?;
        state.serialize_field("apiVersion", Self::API_VERSION)?;
        state.serialize_field("kind", Self::KIND)?;
        state.serialize_field("metadata", &self.metadata)?;
        state.serialize_field("spec", &self.spec)?;
        state.end()
    }
}
