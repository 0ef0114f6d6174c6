//! Where the cluster's objects come from. Every source delivers the same
//! Kubernetes objects ([`Objects`]) — k8s-openapi types, plus our Community
//! custom resource — and [`Objects::snapshot`] turns them into the model, so
//! a manifest file and the API server give identical snapshots. The kube
//! caches make the model of each Service and EndpointSlice as it arrives
//! and keep that instead of the object ([`ObjectRefs`]): the same
//! conversion, done once per change rather than per pass.

#[cfg(test)]
mod checked_tests;
pub mod kube;
pub mod last_good;
pub mod manifest;
pub mod watch;

use ipnet::Ipv4Net;
use k8s_openapi::{
    Metadata,
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub use crate::model::crd::{CommunityObject, CommunitySpec};
use crate::model::{
    ModelError, ObjectRef, ServiceInput, SliceInput, Snapshot,
    checks::{Age, Ages, Problem, drop_conflicts},
};

/// The objects one source delivered, as Kubernetes shapes them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    pub nodes: Vec<core::Node>,
    pub communities: Vec<CommunityObject>,
    pub services: Vec<core::Service>,
    pub endpoint_slices: Vec<discovery::EndpointSlice>,
}

/// [`Objects`] borrowed where they are kept (the kube caches): a pass
/// reads them without copying them first. The kube caches keep most
/// EndpointSlices as their model already ([`SliceInput::Model`]).
#[derive(Debug, Clone, Default)]
pub struct ObjectRefs<'a> {
    pub nodes: Vec<&'a core::Node>,
    pub communities: Vec<&'a CommunityObject>,
    pub services: Vec<ServiceInput<'a>>,
    pub endpoint_slices: Vec<SliceInput<'a>>,
}

impl Objects {
    pub fn snapshot(&self) -> Result<Snapshot, ModelError> {
        self.refs().snapshot()
    }

    /// The snapshot of everything usable: invalid objects, duplicates and
    /// the newer side of every conflict are left out and come back as
    /// problems. What planning reads in both modes.
    pub fn checked(&self, service_cidr: Ipv4Net) -> Checked {
        self.refs().checked(service_cidr)
    }

    pub fn refs(&self) -> ObjectRefs<'_> {
        ObjectRefs {
            nodes: self.nodes.iter().collect(),
            communities: self.communities.iter().collect(),
            services: self.services.iter().map(ServiceInput::Object).collect(),
            endpoint_slices: self
                .endpoint_slices
                .iter()
                .map(SliceInput::Object)
                .collect(),
        }
    }
}

impl ObjectRefs<'_> {
    pub fn snapshot(&self) -> Result<Snapshot, ModelError> {
        Snapshot::from_objects(
            self.nodes.iter().copied(),
            self.communities.iter().copied(),
            self.services.iter().copied(),
            self.endpoint_slices.iter().copied(),
        )
    }

    /// See [`Objects::checked`].
    pub fn checked(&self, service_cidr: Ipv4Net) -> Checked {
        let (mut snapshot, errors) = Snapshot::from_objects_skipping(
            self.nodes.iter().copied(),
            self.communities.iter().copied(),
            self.services.iter().copied(),
            self.endpoint_slices.iter().copied(),
        );
        let mut problems: Vec<Problem> = errors
            .iter()
            .map(|e| Problem::new(e.object(), e.detail()))
            .collect();
        problems.extend(drop_conflicts(&mut snapshot, &self.ages(), service_cidr));
        Checked { snapshot, problems }
    }

    /// Every object's age, for [`drop_conflicts`]: its creationTimestamp,
    /// then its place in this source.
    fn ages(&self) -> Ages {
        fn age(meta: &ObjectMeta, position: usize) -> Age {
            Age {
                created: meta.creation_timestamp.as_ref().map(|t| t.0.to_string()),
                position,
            }
        }
        let name = |meta: &ObjectMeta| meta.name.clone().unwrap_or_default();
        let mut ages = Ages::new();
        for (position, node) in self.nodes.iter().enumerate() {
            let meta = node.metadata();
            ages.insert(ObjectRef::cluster("Node", name(meta)), age(meta, position));
        }
        for (position, service) in self.services.iter().enumerate() {
            let (namespace, name, created) = service.identity();
            let object = ObjectRef::namespaced("Service", namespace, name);
            let created = created.map(|t| t.0.to_string());
            ages.insert(object, Age { created, position });
        }
        ages
    }
}

/// A snapshot and the objects left out of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checked {
    pub snapshot: Snapshot,
    pub problems: Vec<Problem>,
}
