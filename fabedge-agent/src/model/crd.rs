//! The `Community` custom resource as Kubernetes shapes it, next to the
//! k8s-openapi types the model reads; `cargo xtask gen-crd` writes its CRD.

use k8s_openapi::{
    ClusterResourceScope, ListableResource, Metadata, Resource,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Serialize, ser::SerializeStruct};

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
