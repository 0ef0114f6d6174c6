//! The cluster as fabedge sees it: a snapshot of Nodes, Communities, Services
//! and EndpointSlices, validated and reduced to what planning needs.
//!
//! Every source (the manifest file, the Kubernetes watches) delivers the same
//! Kubernetes objects ([`crate::source::Objects`]); this module is the one
//! place they become model values, so both sources yield identical snapshots
//! and identical plans. Bad input is an error naming the object, the field,
//! the bad value and what was expected; nothing here panics on input.

pub mod checks;
pub mod crd;
mod names;

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
};
use serde::{Deserialize, Serialize};

use self::crd::CommunityObject;
pub use self::names::{Addresses, node_name};

/// Node labels that choose a node's role.
pub mod label {
    pub const EDGE: &str = "node-role.kubernetes.io/edge";
    pub const CONNECTOR: &str = "node-role.kubernetes.io/connector";
    /// On an EndpointSlice: the Service it belongs to.
    pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
}

/// Annotations fabedge reads (and, for Flannel's, writes).
pub mod annotation {
    /// Where our tunnel reaches a node, when neither its ExternalIP nor its
    /// InternalIP is that address (e.g. a NAT gateway's public address).
    pub const TUNNEL_ENDPOINT: &str = "fabedge.io/tunnel-endpoint";
    /// An edge node's pod CIDR allocated by the leading connector (see
    /// `ipam`), used when the node has no `spec.podCIDR`.
    pub const POD_CIDR: &str = "fabedge.io/pod-cidr";
    /// On a connector, set by the operator: the address on the cloud
    /// network that cloud nodes' Flannel sends its edges' traffic to. The
    /// connector holds it while alive; its successor takes it over (with
    /// gratuitous ARP) when it dies, so Flannel never has to notice.
    pub const VTEP_ADDRESS: &str = "fabedge.io/vtep-address";
    /// Flannel's lease, as its kube subnet manager stores it on the Node.
    pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
    pub const FLANNEL_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
    pub const FLANNEL_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
    pub const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
    /// The four annotations that make up a Flannel lease, in the order above.
    pub const FLANNEL_LEASE: [&str; 4] = [
        FLANNEL_BACKEND_DATA,
        FLANNEL_BACKEND_TYPE,
        FLANNEL_KUBE_SUBNET_MANAGER,
        FLANNEL_PUBLIC_IP,
    ];
}

/// The only Flannel backend whose VTEPs the connector can stand in for.
pub const FLANNEL_VXLAN_BACKEND: &str = "vxlan";

/// Namespace of a namespaced object whose manifest names none (as kubectl does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Which Kubernetes object an error or a model value comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub kind: &'static str,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    pub fn cluster(kind: &'static str, name: impl Into<String>) -> Self {
        ObjectRef {
            kind,
            namespace: None,
            name: name.into(),
        }
    }
    pub fn namespaced(
        kind: &'static str,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        ObjectRef {
            kind,
            namespace: Some(namespace.into()),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Why a set of objects cannot become a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// One field of one object is unusable. `field` names it the way
    /// `kubectl explain` would (`spec.podCIDR`, `annotation fabedge.io/...`);
    /// `problem` holds the bad value, what was expected and the fix.
    #[error("{object}: {field} {problem}")]
    Invalid {
        object: ObjectRef,
        field: String,
        problem: String,
    },
    #[error("{object} is given more than once; object names must be unique")]
    Duplicate { object: ObjectRef },
}

impl ModelError {
    pub fn object(&self) -> &ObjectRef {
        match self {
            ModelError::Invalid { object, .. } | ModelError::Duplicate { object } => object,
        }
    }

    /// The message without the object's name, for callers that name the
    /// object themselves (the manifest source adds the document number).
    pub fn detail(&self) -> String {
        match self {
            ModelError::Invalid { field, problem, .. } => format!("{field} {problem}"),
            ModelError::Duplicate { .. } => {
                "is given more than once; object names must be unique".into()
            }
        }
    }
}

fn invalid(object: &ObjectRef, field: impl Into<String>, problem: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        object: object.clone(),
        field: field.into(),
        problem: problem.into(),
    }
}

/// A node's part in fabedge, from its labels.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Behind NAT at an edge site: pod bridge, tunnels to the connector and community peers.
    Edge,
    /// A cloud node terminating the edge tunnels and standing in for edge VTEPs.
    Connector,
    /// Any other node: runs Flannel; fabedge only adds routes to edge node IPs.
    Cloud,
}

impl Role {
    /// The value of `DatapathConfig::role`.
    pub const fn datapath_role(self) -> u8 {
        match self {
            Role::Edge => fabedge_common::role::EDGE,
            Role::Connector => fabedge_common::role::CONNECTOR,
            Role::Cloud => fabedge_common::role::CLOUD,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Edge => "edge",
            Role::Connector => "connector",
            Role::Cloud => "cloud",
        })
    }
}

/// A node's Flannel VXLAN lease: where Flannel on other nodes sends VXLAN
/// for this node's pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlannelLease {
    /// MAC of the node's `flannel.1`, the inner destination MAC of its VXLAN frames.
    #[serde(serialize_with = "serialize_mac")]
    pub vtep_mac: [u8; 6],
    /// The outer destination address of VXLAN sent to this node.
    pub public_ip: Ipv4Addr,
    /// Always [`FLANNEL_VXLAN_BACKEND`] today; kept so messages can show it.
    pub backend_type: String,
}

/// A Kubernetes Node, reduced to what fabedge plans with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub role: Role,
    pub internal_ip: Ipv4Addr,
    pub external_ip: Option<Ipv4Addr>,
    /// The node's IPv4 pod CIDR (`spec.podCIDR`, or the IPv4 one of `spec.podCIDRs`).
    pub pod_cidr: Option<Ipv4Net>,
    /// Where our tunnel reaches this node: the `fabedge.io/tunnel-endpoint`
    /// annotation if set, else the ExternalIP, else the InternalIP.
    pub tunnel_endpoint: Ipv4Addr,
    pub flannel: Option<FlannelLease>,
    /// Connector: its shared VTEP address (`fabedge.io/vtep-address`).
    pub vtep_address: Option<Ipv4Addr>,
    pub annotations: BTreeMap<String, String>,
}

/// A group of edge nodes that talk to each other over direct tunnels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Community {
    pub name: String,
    pub members: BTreeSet<String>,
}

/// Name of a namespaced object; sorts by namespace, then name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        NamespacedName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An L4 protocol a Service port or an endpoint port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number, as the datapath matches it.
    pub const fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Kubernetes spelling.
    pub const fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Kubernetes spelling; absent means TCP.
    fn parse(value: Option<&str>) -> Result<Protocol, String> {
        match value {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(format!(
                "{other:?} is not a protocol Kubernetes knows; use TCP, UDP or SCTP"
            )),
        }
    }
}

/// Where a Service port sends traffic on its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A named container port; EndpointSlices carry the resolved number.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Empty for the single unnamed port a Service may have.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum SessionAffinity {
    None,
    /// Keep a client IP on one backend for `timeout_seconds` after its last packet.
    ClientIp {
        timeout_seconds: u32,
    },
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// Kubernetes' upper bound for that timeout (one day).
const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

/// `spec.internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster.
    Cluster,
    /// Only endpoints on the client's own node.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The IPv4 cluster IPs (`spec.clusterIPs`, else `spec.clusterIP`);
    /// empty for headless and ExternalName Services and before allocation.
    pub cluster_ips: Vec<Ipv4Addr>,
    /// `clusterIP: None`: DNS names the endpoints directly; nothing to translate.
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub session_affinity: SessionAffinity,
    pub internal_traffic_policy: TrafficPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointPort {
    /// Matches `ServicePort::name`; empty when unnamed.
    pub name: String,
    /// `None`: the slice's endpoints accept every port.
    pub port: Option<u16>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addresses: Addresses,
    /// Absent conditions read as Kubernetes documents them: ready and
    /// serving default to true, terminating to false.
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node the endpoint runs on (for `internalTrafficPolicy: Local`),
    /// shared by every endpoint on that node ([`node_name`]).
    pub node_name: Option<Arc<str>>,
}

/// An IPv4 EndpointSlice. Slices of other address types are not in the
/// model: the datapath translates IPv4 only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The owning Service (label `kubernetes.io/service-name`).
    pub service_name: Option<String>,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    /// The owning Service's name in this slice's namespace.
    pub fn service(&self) -> Option<NamespacedName> {
        self.service_name
            .as_ref()
            .map(|s| NamespacedName::new(&self.namespace, s))
    }
}

/// Annotation changes to make on one Node (only real changes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnnotationPatch {
    pub node: String,
    pub set: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

/// The cluster at one moment: the input of [`crate::plan::plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub nodes: BTreeMap<String, Node>,
    pub communities: BTreeMap<String, Community>,
    /// Shared with the kube caches, as the EndpointSlices are.
    pub services: BTreeMap<NamespacedName, Arc<Service>>,
    /// Shared with the kube caches, which keep slices in this form.
    pub endpoint_slices: BTreeMap<NamespacedName, Arc<EndpointSlice>>,
}

impl Snapshot {
    /// Convert what a source delivered, rejecting invalid objects and
    /// duplicate names: the first problem is the error. Non-IPv4
    /// EndpointSlices are left out. Each argument is anything that yields
    /// references (a `Vec`, a slice, a reflector store's `Arc`s mapped
    /// through `as_ref`).
    pub fn from_objects<'o>(
        nodes: impl IntoIterator<Item = &'o core::Node>,
        communities: impl IntoIterator<Item = &'o CommunityObject>,
        services: impl IntoIterator<Item = ServiceInput<'o>>,
        endpoint_slices: impl IntoIterator<Item = SliceInput<'o>>,
    ) -> Result<Snapshot, ModelError> {
        let (snapshot, mut errors) =
            Snapshot::from_objects_skipping(nodes, communities, services, endpoint_slices);
        match errors.is_empty() {
            true => Ok(snapshot),
            false => Err(errors.swap_remove(0)),
        }
    }

    /// Like [`Snapshot::from_objects`], but an invalid object or a second
    /// object of the same name is left out and reported, and the rest is
    /// the snapshot: one bad object never stops a node.
    pub fn from_objects_skipping<'o>(
        nodes: impl IntoIterator<Item = &'o core::Node>,
        communities: impl IntoIterator<Item = &'o CommunityObject>,
        services: impl IntoIterator<Item = ServiceInput<'o>>,
        endpoint_slices: impl IntoIterator<Item = SliceInput<'o>>,
    ) -> (Snapshot, Vec<ModelError>) {
        let mut snapshot = Snapshot::default();
        let mut errors = Vec::new();
        for object in nodes {
            match Node::from_k8s(object) {
                Ok(node) if snapshot.nodes.contains_key(&node.name) => {
                    let object = ObjectRef::cluster("Node", &node.name);
                    errors.push(ModelError::Duplicate { object });
                }
                Ok(node) => {
                    snapshot.nodes.insert(node.name.clone(), node);
                }
                Err(e) => errors.push(e),
            }
        }
        for object in communities {
            match Community::from_k8s(object) {
                Ok(community) if snapshot.communities.contains_key(&community.name) => {
                    let object = ObjectRef::cluster("Community", &community.name);
                    errors.push(ModelError::Duplicate { object });
                }
                Ok(community) => {
                    snapshot
                        .communities
                        .insert(community.name.clone(), community);
                }
                Err(e) => errors.push(e),
            }
        }
        for object in services {
            match object.model() {
                Ok(service) => {
                    let key = NamespacedName::new(&service.namespace, &service.name);
                    if snapshot.services.contains_key(&key) {
                        let object = ObjectRef::namespaced("Service", &key.namespace, &key.name);
                        errors.push(ModelError::Duplicate { object });
                    } else {
                        snapshot.services.insert(key, service);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        for object in endpoint_slices {
            match object.model() {
                Ok(None) => {}
                Ok(Some(slice)) => {
                    let key = NamespacedName::new(&slice.namespace, &slice.name);
                    if snapshot.endpoint_slices.contains_key(&key) {
                        let object =
                            ObjectRef::namespaced("EndpointSlice", &key.namespace, &key.name);
                        errors.push(ModelError::Duplicate { object });
                    } else {
                        snapshot.endpoint_slices.insert(key, slice);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        (snapshot, errors)
    }

    /// A copy that shares no Service or EndpointSlice with `self` (a
    /// clone shares them): made on the calling thread, all of it is in that
    /// thread's arena, and none of it keeps the arena it was parsed in
    /// (`sys::apart`) from being freed as a whole.
    pub fn unshared(&self) -> Snapshot {
        fn copied<K: Clone + Ord, V: Clone>(map: &BTreeMap<K, Arc<V>>) -> BTreeMap<K, Arc<V>> {
            map.iter()
                .map(|(key, value)| (key.clone(), Arc::new(V::clone(value))))
                .collect()
        }
        Snapshot {
            nodes: self.nodes.clone(),
            communities: self.communities.clone(),
            services: copied(&self.services),
            endpoint_slices: copied(&self.endpoint_slices),
        }
    }

    /// Nodes with role `role`, by name.
    pub fn nodes_with_role(&self, role: Role) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(move |n| n.role == role)
    }
}

/// `metadata.name`, required on every object we read.
fn object_name(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<String, ModelError> {
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Ok(name.to_owned()),
        _ => Err(invalid(
            &ObjectRef::cluster(kind, "<unnamed>"),
            "metadata.name",
            "is missing; every object needs a name",
        )),
    }
}

impl Node {
    pub fn from_k8s(node: &core::Node) -> Result<Node, ModelError> {
        let name = object_name("Node", &node.metadata)?;
        let object = ObjectRef::cluster("Node", &name);
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let annotations = node.metadata.annotations.clone().unwrap_or_default();

        let role = match (
            labels.contains_key(label::EDGE),
            labels.contains_key(label::CONNECTOR),
        ) {
            (true, true) => {
                return Err(invalid(
                    &object,
                    "metadata.labels",
                    format!(
                        "carry both {} and {}; a node is an edge node or a connector, not both: remove one",
                        label::EDGE,
                        label::CONNECTOR
                    ),
                ));
            }
            (true, false) => Role::Edge,
            (false, true) => Role::Connector,
            (false, false) => Role::Cloud,
        };

        let (internal_ip, external_ip) = node_addresses(&object, node)?;
        let internal_ip = internal_ip.ok_or_else(|| {
            invalid(
                &object,
                "status.addresses",
                "has no IPv4 InternalIP; the kubelet reports one once the node registers \
                 (in a manifest add `{type: InternalIP, address: <node IPv4>}`)",
            )
        })?;
        let pod_cidr = node_pod_cidr(&object, node)?;

        let tunnel_endpoint = match annotations.get(annotation::TUNNEL_ENDPOINT) {
            Some(value) => value.trim().parse::<Ipv4Addr>().map_err(|_| {
                invalid(
                    &object,
                    format!("annotation {}", annotation::TUNNEL_ENDPOINT),
                    format!(
                        "{value:?} is not an IPv4 address; set it to the address peers reach this \
                         node's tunnel at (e.g. 198.18.0.11) or remove it to use the node's ExternalIP"
                    ),
                )
            })?,
            None => external_ip.unwrap_or(internal_ip),
        };

        let flannel = FlannelLease::from_annotations(&annotations)
            .map_err(|(field, problem)| invalid(&object, format!("annotation {field}"), problem))?;

        let vtep_address = match (role, annotations.get(annotation::VTEP_ADDRESS)) {
            (_, None) => None,
            (Role::Connector, Some(value)) => Some(
                value
                    .trim()
                    .parse::<Ipv4Addr>()
                    .ok()
                    .filter(|ip| !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast())
                    .ok_or_else(|| {
                        invalid(
                            &object,
                            format!("annotation {}", annotation::VTEP_ADDRESS),
                            format!(
                                "{value:?} is not a unicast IPv4 address; set it to a free address on the \
                                 cloud network (e.g. 10.1.0.201) or remove it"
                            ),
                        )
                    })?,
            ),
            // Only a connector holds a VTEP address; elsewhere it means nothing.
            (_, Some(_)) => None,
        };

        Ok(Node {
            name,
            role,
            internal_ip,
            external_ip,
            pod_cidr,
            tunnel_endpoint,
            flannel,
            vtep_address,
            annotations,
        })
    }
}

/// The first IPv4 InternalIP and ExternalIP; IPv6 addresses are skipped,
/// unparsable ones are errors (a typo should not silently pick another address).
fn node_addresses(
    object: &ObjectRef,
    node: &core::Node,
) -> Result<(Option<Ipv4Addr>, Option<Ipv4Addr>), ModelError> {
    let mut internal = None;
    let mut external = None;
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    for (index, address) in addresses.iter().enumerate() {
        let slot = match address.type_.as_str() {
            "InternalIP" => &mut internal,
            "ExternalIP" => &mut external,
            _ => continue,
        };
        let parsed = address.address.trim().parse::<IpAddr>().map_err(|_| {
            invalid(
                object,
                format!("status.addresses[{index}].address"),
                format!(
                    "{:?} ({}) is not an IP address",
                    address.address, address.type_
                ),
            )
        })?;
        if let (IpAddr::V4(v4), None) = (parsed, &slot) {
            *slot = Some(v4);
        }
    }
    Ok((internal, external))
}

/// The node's IPv4 pod CIDR from `spec.podCIDR` / `spec.podCIDRs`. IPv6
/// CIDRs (dual-stack clusters) are skipped; malformed ones are errors.
fn node_pod_cidr(object: &ObjectRef, node: &core::Node) -> Result<Option<Ipv4Net>, ModelError> {
    let spec = node.spec.as_ref();
    let single = spec
        .and_then(|s| s.pod_cidr.as_ref())
        .map(|c| ("spec.podCIDR".to_owned(), c));
    let listed = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c));
    for (field, value) in single.into_iter().chain(listed) {
        match parse_ipv4_cidr(value) {
            Ok(Some(net)) => return Ok(Some(net)),
            Ok(None) => {}
            Err(problem) => return Err(invalid(object, field, problem)),
        }
    }
    // spec.podCIDR wins; without it, the CIDR fabedge's IPAM allocated.
    if let Some(value) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation::POD_CIDR))
    {
        return parse_ipv4_cidr(value).map_err(|problem| {
            invalid(
                object,
                format!("annotation {}", annotation::POD_CIDR),
                problem,
            )
        });
    }
    Ok(None)
}

/// `Ok(None)` for a valid IPv6 CIDR; an error text for anything malformed or
/// with host bits set.
fn parse_ipv4_cidr(value: &str) -> Result<Option<Ipv4Net>, String> {
    match value.trim().parse::<IpNet>() {
        Ok(IpNet::V4(net)) if net == net.trunc() => Ok(Some(net)),
        Ok(IpNet::V4(net)) => Err(format!(
            "{value:?} has host bits set; a CIDR names a network: did you mean {}?",
            net.trunc()
        )),
        Ok(IpNet::V6(_)) => Ok(None),
        Err(_) => Err(format!(
            "{value:?} is not an IPv4 CIDR (expected e.g. 10.234.1.0/24)"
        )),
    }
}

/// Flannel's `backend-data` for the vxlan backend. Newer Flannel also writes
/// `VNI`; we need only the MAC.
#[derive(Deserialize)]
struct VxlanBackendData {
    #[serde(rename = "VtepMAC")]
    vtep_mac: String,
}

impl FlannelLease {
    /// `Ok(None)` when the node carries no Flannel annotations at all; an
    /// error (field, problem) when they are incomplete or malformed.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<FlannelLease>, (String, String)> {
        let get = |key: &str| annotations.get(key).map(String::as_str);
        let (Some(backend_type), public_ip, backend_data) = (
            get(annotation::FLANNEL_BACKEND_TYPE),
            get(annotation::FLANNEL_PUBLIC_IP),
            get(annotation::FLANNEL_BACKEND_DATA),
        ) else {
            if let Some(present) = [
                annotation::FLANNEL_PUBLIC_IP,
                annotation::FLANNEL_BACKEND_DATA,
            ]
            .into_iter()
            .find(|k| get(k).is_some())
            {
                return Err((
                    annotation::FLANNEL_BACKEND_TYPE.into(),
                    format!(
                        "is missing while {present} is set; Flannel writes all of its lease annotations \
                         together: remove the partial lease and let Flannel (or the fabedge connector) rewrite it"
                    ),
                ));
            }
            return Ok(None);
        };
        if backend_type != FLANNEL_VXLAN_BACKEND {
            return Err((
                annotation::FLANNEL_BACKEND_TYPE.into(),
                format!(
                    "is {backend_type:?}; fabedge's connector stands in for Flannel's {FLANNEL_VXLAN_BACKEND:?} \
                     backend only: configure Flannel with `\"Backend\": {{\"Type\": \"vxlan\"}}`"
                ),
            ));
        }
        let public_ip = public_ip.ok_or_else(|| {
            (
                annotation::FLANNEL_PUBLIC_IP.to_owned(),
                "is missing from a vxlan lease".to_owned(),
            )
        })?;
        let public_ip = public_ip.trim().parse::<Ipv4Addr>().map_err(|_| {
            (
                annotation::FLANNEL_PUBLIC_IP.to_owned(),
                format!("{public_ip:?} is not an IPv4 address"),
            )
        })?;
        let backend_data = backend_data.ok_or_else(|| {
            (
                annotation::FLANNEL_BACKEND_DATA.to_owned(),
                "is missing from a vxlan lease".to_owned(),
            )
        })?;
        let expected = r#"Flannel's vxlan backend data, e.g. {"VtepMAC":"ce:0c:01:00:00:01"}"#;
        let data: VxlanBackendData = serde_json::from_str(backend_data).map_err(|_| {
            (
                annotation::FLANNEL_BACKEND_DATA.to_owned(),
                format!("{backend_data:?} is not {expected}"),
            )
        })?;
        let vtep_mac = parse_mac(&data.vtep_mac).ok_or_else(|| {
            (
                annotation::FLANNEL_BACKEND_DATA.to_owned(),
                format!(
                    "VtepMAC {:?} is not a MAC address like ce:0c:01:00:00:01",
                    data.vtep_mac
                ),
            )
        })?;
        Ok(Some(FlannelLease {
            vtep_mac,
            public_ip,
            backend_type: backend_type.to_owned(),
        }))
    }
}

/// Parse `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Lowercase, colon-separated: how Flannel writes `VtepMAC`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

fn serialize_mac<S: serde::Serializer>(mac: &[u8; 6], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_mac(*mac))
}

impl Community {
    pub fn from_k8s(community: &CommunityObject) -> Result<Community, ModelError> {
        let name = object_name("Community", &community.metadata)?;
        let object = ObjectRef::cluster("Community", &name);
        let mut members = BTreeSet::new();
        for (index, member) in community.spec.members.iter().enumerate() {
            if member.trim().is_empty() {
                return Err(invalid(
                    &object,
                    format!("spec.members[{index}]"),
                    "is empty; list node names",
                ));
            }
            members.insert(member.trim().to_owned());
        }
        Ok(Community { name, members })
    }
}

/// A port number from Kubernetes' `int32`.
fn port_number(value: i32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is not a port number (1-65535)"))
}

impl Service {
    pub fn from_k8s(service: &core::Service) -> Result<Service, ModelError> {
        let name = object_name("Service", &service.metadata)?;
        let namespace = service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let object = ObjectRef::namespaced("Service", &namespace, &name);
        let spec = service.spec.clone().unwrap_or_default();

        // `clusterIPs` supersedes `clusterIP` (its first entry equals it).
        let (field, ips): (&str, Vec<String>) = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ("spec.clusterIPs", ips.clone()),
            (_, Some(ip)) => ("spec.clusterIP", vec![ip.clone()]),
            _ => ("spec.clusterIP", Vec::new()),
        };
        let mut cluster_ips = Vec::new();
        let mut headless = false;
        for (index, ip) in ips.iter().enumerate() {
            let field = if field == "spec.clusterIPs" {
                format!("{field}[{index}]")
            } else {
                field.to_owned()
            };
            match ip.trim() {
                "None" => headless = true,
                // Not allocated yet: the API server fills it in.
                "" => {}
                text => match text.parse::<IpAddr>() {
                    Ok(IpAddr::V4(v4)) => cluster_ips.push(v4),
                    Ok(IpAddr::V6(_)) => {}
                    Err(_) => {
                        return Err(invalid(
                            &object,
                            field,
                            format!(
                                "{ip:?} is not an IP address (or \"None\" for a headless Service)"
                            ),
                        ));
                    }
                },
            }
        }

        let mut ports = Vec::new();
        for (index, port) in spec.ports.iter().flatten().enumerate() {
            let at = |what: &str| format!("spec.ports[{index}].{what}");
            let number = port_number(port.port).map_err(|p| invalid(&object, at("port"), p))?;
            let protocol = Protocol::parse(port.protocol.as_deref())
                .map_err(|p| invalid(&object, at("protocol"), p))?;
            let target_port = match &port.target_port {
                None => TargetPort::Number(number),
                Some(IntOrString::Int(n)) => TargetPort::Number(
                    port_number(*n).map_err(|p| invalid(&object, at("targetPort"), p))?,
                ),
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    Ok(n) => TargetPort::Number(
                        port_number(n).map_err(|p| invalid(&object, at("targetPort"), p))?,
                    ),
                    Err(_) if !s.is_empty() => TargetPort::Name(s.clone()),
                    Err(_) => TargetPort::Number(number),
                },
            };
            ports.push(ServicePort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                protocol,
                target_port,
            });
        }

        let session_affinity = match spec.session_affinity.as_deref() {
            None | Some("None") => SessionAffinity::None,
            Some("ClientIP") => {
                let configured = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                let timeout_seconds = match configured {
                    None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
                    Some(t) => u32::try_from(t)
                        .ok()
                        .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(t))
                        .ok_or_else(|| {
                            invalid(
                                &object,
                                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                format!(
                                    "{t} is outside 1..={MAX_AFFINITY_TIMEOUT_SECONDS} seconds"
                                ),
                            )
                        })?,
                };
                SessionAffinity::ClientIp { timeout_seconds }
            }
            Some(other) => {
                return Err(invalid(
                    &object,
                    "spec.sessionAffinity",
                    format!("{other:?} is not None or ClientIP"),
                ));
            }
        };

        let internal_traffic_policy = match spec.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => TrafficPolicy::Cluster,
            Some("Local") => TrafficPolicy::Local,
            Some(other) => {
                return Err(invalid(
                    &object,
                    "spec.internalTrafficPolicy",
                    format!("{other:?} is not Cluster or Local"),
                ));
            }
        };

        Ok(Service {
            namespace,
            name,
            cluster_ips,
            headless,
            ports,
            session_affinity,
            internal_traffic_policy,
        })
    }

    /// The Kubernetes object this Service reads from, created at `created`:
    /// what [`Service::from_k8s`] turns back into this Service (IPv6
    /// cluster IPs, which the model leaves out, are not in it).
    pub fn to_k8s(&self, created: Option<&Time>) -> core::Service {
        let none = self.headless.then(|| "None".to_owned());
        let cluster_ips: Vec<String> = none
            .into_iter()
            .chain(self.cluster_ips.iter().map(Ipv4Addr::to_string))
            .collect();
        let ports = self
            .ports
            .iter()
            .map(|port| core::ServicePort {
                name: Some(port.name.clone()).filter(|name| !name.is_empty()),
                port: i32::from(port.port),
                protocol: Some(port.protocol.as_k8s().to_owned()),
                target_port: Some(match &port.target_port {
                    TargetPort::Number(number) => IntOrString::Int(i32::from(*number)),
                    TargetPort::Name(name) => IntOrString::String(name.clone()),
                }),
                ..Default::default()
            })
            .collect();
        let (affinity, affinity_config) = match self.session_affinity {
            SessionAffinity::None => ("None", None),
            SessionAffinity::ClientIp { timeout_seconds } => (
                "ClientIP",
                Some(core::SessionAffinityConfig {
                    client_ip: Some(core::ClientIPConfig {
                        timeout_seconds: i32::try_from(timeout_seconds).ok(),
                    }),
                }),
            ),
        };
        let policy = match self.internal_traffic_policy {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        };
        core::Service {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                creation_timestamp: created.cloned(),
                ..Default::default()
            },
            spec: Some(core::ServiceSpec {
                cluster_ip: cluster_ips.first().cloned(),
                cluster_ips: Some(cluster_ips).filter(|ips| !ips.is_empty()),
                ports: Some(ports),
                session_affinity: Some(affinity.to_owned()),
                session_affinity_config: affinity_config,
                internal_traffic_policy: Some(policy.to_owned()),
                ..Default::default()
            }),
            status: None,
        }
    }
}

/// One Service as a source hands it to [`Snapshot::from_objects`]: the
/// Kubernetes object, or the model of it a kube cache already made.
#[derive(Debug, Clone, Copy)]
pub enum ServiceInput<'o> {
    Object(&'o core::Service),
    Model {
        service: &'o Arc<Service>,
        created: Option<&'o Time>,
    },
}

impl<'o> ServiceInput<'o> {
    /// What [`Service::from_k8s`] makes of it, shared.
    pub fn model(self) -> Result<Arc<Service>, ModelError> {
        match self {
            ServiceInput::Object(object) => Service::from_k8s(object).map(Arc::new),
            ServiceInput::Model { service, .. } => Ok(service.clone()),
        }
    }

    /// The Kubernetes object it is, or reads as ([`Service::to_k8s`]).
    pub fn object(self) -> Cow<'o, core::Service> {
        match self {
            ServiceInput::Object(object) => Cow::Borrowed(object),
            ServiceInput::Model { service, created } => Cow::Owned(service.to_k8s(created)),
        }
    }

    /// Its namespace, name and creationTimestamp, as the checks age it.
    pub fn identity(self) -> (String, String, Option<&'o Time>) {
        match self {
            ServiceInput::Object(object) => {
                let meta = &object.metadata;
                (
                    meta.namespace
                        .clone()
                        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
                    meta.name.clone().unwrap_or_default(),
                    meta.creation_timestamp.as_ref(),
                )
            }
            ServiceInput::Model { service, created } => {
                (service.namespace.clone(), service.name.clone(), created)
            }
        }
    }
}

impl EndpointSlice {
    /// `Ok(None)` for slices of another address type (IPv6, FQDN).
    pub fn from_k8s(slice: &discovery::EndpointSlice) -> Result<Option<EndpointSlice>, ModelError> {
        let name = object_name("EndpointSlice", &slice.metadata)?;
        let namespace = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let object = ObjectRef::namespaced("EndpointSlice", &namespace, &name);
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => {
                log::debug!(
                    "{object}: addressType {} is not translated by fabedge; skipped",
                    slice.address_type
                );
                return Ok(None);
            }
            other => {
                return Err(invalid(
                    &object,
                    "addressType",
                    format!("{other:?} is not IPv4, IPv6 or FQDN"),
                ));
            }
        }
        let service_name = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(label::SERVICE_NAME))
            .cloned();

        let mut ports = Vec::new();
        for (index, port) in slice.ports.iter().flatten().enumerate() {
            let at = |what: &str| format!("ports[{index}].{what}");
            let number = port
                .port
                .map(port_number)
                .transpose()
                .map_err(|p| invalid(&object, at("port"), p))?;
            let protocol = Protocol::parse(port.protocol.as_deref())
                .map_err(|p| invalid(&object, at("protocol"), p))?;
            ports.push(EndpointPort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                protocol,
            });
        }

        let mut endpoints = Vec::new();
        for (index, endpoint) in slice.endpoints.iter().flatten().enumerate() {
            let mut addresses = Vec::new();
            for (a, address) in endpoint.addresses.iter().enumerate() {
                let parsed = address.trim().parse::<Ipv4Addr>().map_err(|_| {
                    invalid(
                        &object,
                        format!("endpoints[{index}].addresses[{a}]"),
                        format!(
                            "{address:?} is not an IPv4 address (the slice's addressType is IPv4)"
                        ),
                    )
                })?;
                addresses.push(parsed);
            }
            let conditions = endpoint.conditions.as_ref();
            let condition = |read: fn(&discovery::EndpointConditions) -> Option<bool>| {
                conditions.and_then(read)
            };
            endpoints.push(Endpoint {
                addresses: Addresses::from(addresses),
                ready: condition(|c| c.ready).unwrap_or(true),
                serving: condition(|c| c.serving).unwrap_or(true),
                terminating: condition(|c| c.terminating).unwrap_or(false),
                node_name: endpoint.node_name.as_deref().map(node_name),
            });
        }
        Ok(Some(EndpointSlice {
            namespace,
            name,
            service_name,
            ports,
            endpoints,
        }))
    }

    /// The Kubernetes object this slice reads from: what [`from_k8s`]
    /// turns back into this slice. What the model does not read (the
    /// resource version, endpoints' target references) is not in it.
    ///
    /// [`from_k8s`]: EndpointSlice::from_k8s
    pub fn to_k8s(&self) -> discovery::EndpointSlice {
        let labels = self
            .service_name
            .as_ref()
            .map(|service| BTreeMap::from([(label::SERVICE_NAME.to_owned(), service.clone())]));
        let ports = self
            .ports
            .iter()
            .map(|port| discovery::EndpointPort {
                name: Some(port.name.clone()).filter(|name| !name.is_empty()),
                port: port.port.map(i32::from),
                protocol: Some(port.protocol.as_k8s().to_owned()),
                app_protocol: None,
            })
            .collect();
        let endpoints = self
            .endpoints
            .iter()
            .map(|endpoint| discovery::Endpoint {
                addresses: endpoint.addresses.iter().map(Ipv4Addr::to_string).collect(),
                conditions: Some(discovery::EndpointConditions {
                    ready: Some(endpoint.ready),
                    serving: Some(endpoint.serving),
                    terminating: Some(endpoint.terminating),
                }),
                node_name: endpoint.node_name.as_deref().map(str::to_owned),
                ..Default::default()
            })
            .collect();
        discovery::EndpointSlice {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels,
                ..Default::default()
            },
            address_type: "IPv4".to_owned(),
            ports: Some(ports),
            endpoints: Some(endpoints),
        }
    }
}

/// One EndpointSlice as a source hands it to [`Snapshot::from_objects`]:
/// the Kubernetes object, or the model of it a kube cache already made.
#[derive(Debug, Clone, Copy)]
pub enum SliceInput<'o> {
    Object(&'o discovery::EndpointSlice),
    Model(&'o Arc<EndpointSlice>),
}

impl<'o> SliceInput<'o> {
    /// What [`EndpointSlice::from_k8s`] makes of it, shared.
    pub fn model(self) -> Result<Option<Arc<EndpointSlice>>, ModelError> {
        match self {
            SliceInput::Object(object) => Ok(EndpointSlice::from_k8s(object)?.map(Arc::new)),
            SliceInput::Model(slice) => Ok(Some(slice.clone())),
        }
    }

    /// The Kubernetes object it is, or reads as ([`EndpointSlice::to_k8s`]).
    pub fn object(self) -> Cow<'o, discovery::EndpointSlice> {
        match self {
            SliceInput::Object(object) => Cow::Borrowed(object),
            SliceInput::Model(slice) => Cow::Owned(slice.to_k8s()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unshared_copy_is_equal_and_shares_nothing() {
        let snapshot = crate::source::manifest::snapshot(crate::source::manifest::EXAMPLE_CLUSTER)
            .expect("the example cluster parses");
        let copy = snapshot.unshared();
        assert_eq!(copy, snapshot);
        assert!(!snapshot.services.is_empty() && !snapshot.endpoint_slices.is_empty());
        for (key, service) in &copy.services {
            assert!(!Arc::ptr_eq(service, &snapshot.services[key]));
        }
        for (key, slice) in &copy.endpoint_slices {
            assert!(!Arc::ptr_eq(slice, &snapshot.endpoint_slices[key]));
        }
    }

    #[test]
    fn a_service_turned_back_into_an_object_reads_as_the_same_service() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let service = Service {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec![ip("10.96.0.20")],
            headless: false,
            ports: vec![
                ServicePort {
                    name: String::new(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: TargetPort::Number(8080),
                },
                ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                    target_port: TargetPort::Name("dns".into()),
                },
            ],
            session_affinity: SessionAffinity::ClientIp {
                timeout_seconds: 600,
            },
            internal_traffic_policy: TrafficPolicy::Local,
        };
        let created = Time("2026-12-01T10:00:00Z".parse().unwrap());
        let object = service.to_k8s(Some(&created));
        assert_eq!(Service::from_k8s(&object), Ok(service.clone()));
        assert_eq!(object.metadata.creation_timestamp, Some(created));
        for other in [
            Service {
                cluster_ips: Vec::new(),
                headless: true,
                session_affinity: SessionAffinity::None,
                internal_traffic_policy: TrafficPolicy::Cluster,
                ..service.clone()
            },
            Service {
                cluster_ips: Vec::new(),
                ports: Vec::new(),
                ..service
            },
        ] {
            assert_eq!(Service::from_k8s(&other.to_k8s(None)), Ok(other));
        }
    }

    #[test]
    fn a_slice_turned_back_into_an_object_reads_as_the_same_slice() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let slice = EndpointSlice {
            namespace: "shop".into(),
            name: "web-x1".into(),
            service_name: Some("web".into()),
            ports: vec![
                EndpointPort {
                    name: String::new(),
                    port: Some(8080),
                    protocol: Protocol::Tcp,
                },
                EndpointPort {
                    name: "metrics".into(),
                    port: None,
                    protocol: Protocol::Sctp,
                },
            ],
            endpoints: vec![
                Endpoint {
                    addresses: ip("10.234.1.10").into(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some(node_name("edge-1")),
                },
                Endpoint {
                    addresses: Addresses::from(vec![ip("10.234.1.11"), ip("10.234.1.12")]),
                    ready: false,
                    serving: true,
                    terminating: true,
                    node_name: None,
                },
            ],
        };
        assert_eq!(
            EndpointSlice::from_k8s(&slice.to_k8s()),
            Ok(Some(slice.clone()))
        );
        let orphan = EndpointSlice {
            service_name: None,
            ports: Vec::new(),
            endpoints: Vec::new(),
            ..slice
        };
        assert_eq!(EndpointSlice::from_k8s(&orphan.to_k8s()), Ok(Some(orphan)));
    }

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        assert_eq!(
            parse_mac("CE:0c:01:00:00:01"),
            Some([0xce, 0x0c, 1, 0, 0, 1])
        );
        assert_eq!(format_mac([0xce, 0x0c, 1, 0, 0, 1]), "ce:0c:01:00:00:01");
        for bad in [
            "",
            "ce:0c:01:00:00",
            "ce:0c:01:00:00:01:02",
            "ce:0c:01:00:00:zz",
            "ce:0c:1:00:00:001",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pod_cidr_with_host_bits_names_the_network_meant() {
        let err = parse_ipv4_cidr("10.234.1.5/24").unwrap_err();
        assert!(err.contains("did you mean 10.234.1.0/24"), "{err}");
        assert_eq!(parse_ipv4_cidr("fd00::/64"), Ok(None));
        assert!(
            parse_ipv4_cidr("10.0.0.0/33")
                .unwrap_err()
                .contains("is not an IPv4 CIDR")
        );
    }

    #[test]
    fn allocated_pod_cidr_annotation_is_used_only_without_spec_pod_cidr() {
        let node = |spec: Option<&str>, annotated: &str| core::Node {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("edge-1".into()),
                annotations: Some(BTreeMap::from([(
                    annotation::POD_CIDR.to_owned(),
                    annotated.to_owned(),
                )])),
                ..Default::default()
            },
            spec: Some(core::NodeSpec {
                pod_cidr: spec.map(Into::into),
                ..Default::default()
            }),
            status: Some(core::NodeStatus {
                addresses: Some(vec![core::NodeAddress {
                    type_: "InternalIP".into(),
                    address: "10.2.0.11".into(),
                }]),
                ..Default::default()
            }),
        };
        let cidr = |n: core::Node| Node::from_k8s(&n).map(|n| n.pod_cidr);
        assert_eq!(
            cidr(node(None, "10.234.7.0/24")),
            Ok(Some("10.234.7.0/24".parse().unwrap()))
        );
        assert_eq!(
            cidr(node(Some("10.234.1.0/24"), "10.234.7.0/24")),
            Ok(Some("10.234.1.0/24".parse().unwrap()))
        );
        let err = cidr(node(None, "10.234.7.9/24")).unwrap_err().to_string();
        assert!(
            err.contains("annotation fabedge.io/pod-cidr") && err.contains("10.234.7.0/24"),
            "{err}"
        );
    }

    fn lease(pairs: &[(&str, &str)]) -> Result<Option<FlannelLease>, (String, String)> {
        FlannelLease::from_annotations(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn flannel_lease_reads_what_flannel_writes() {
        let parsed = lease(&[
            (
                annotation::FLANNEL_BACKEND_DATA,
                r#"{"VNI":1,"VtepMAC":"ce:0c:02:00:00:02"}"#,
            ),
            (annotation::FLANNEL_BACKEND_TYPE, "vxlan"),
            (annotation::FLANNEL_KUBE_SUBNET_MANAGER, "true"),
            (annotation::FLANNEL_PUBLIC_IP, "10.1.0.2"),
        ]);
        assert_eq!(
            parsed,
            Ok(Some(FlannelLease {
                vtep_mac: [0xce, 0x0c, 2, 0, 0, 2],
                public_ip: Ipv4Addr::new(10, 1, 0, 2),
                backend_type: "vxlan".into()
            }))
        );
        assert_eq!(lease(&[]), Ok(None));
    }

    #[test]
    fn flannel_lease_rejects_partial_and_foreign_backends() {
        let (field, problem) = lease(&[(annotation::FLANNEL_PUBLIC_IP, "10.1.0.2")]).unwrap_err();
        assert_eq!(field, annotation::FLANNEL_BACKEND_TYPE);
        assert!(problem.contains("is missing"), "{problem}");
        let (_, problem) = lease(&[(annotation::FLANNEL_BACKEND_TYPE, "host-gw")]).unwrap_err();
        assert!(problem.contains("\"host-gw\""), "{problem}");
        let (field, problem) = lease(&[
            (annotation::FLANNEL_BACKEND_TYPE, "vxlan"),
            (annotation::FLANNEL_PUBLIC_IP, "10.1.0.2"),
            (annotation::FLANNEL_BACKEND_DATA, r#"{"VtepMAC":"nope"}"#),
        ])
        .unwrap_err();
        assert_eq!(field, annotation::FLANNEL_BACKEND_DATA);
        assert!(problem.contains("\"nope\" is not a MAC"), "{problem}");
    }
}
