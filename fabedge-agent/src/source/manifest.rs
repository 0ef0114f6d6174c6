//! Standalone mode: the cluster described by a multi-document YAML file of
//! ordinary Kubernetes manifests (what `kubectl get -o yaml` prints, `List`
//! documents included). Used by the demo, the network-namespace tests and
//! clusters run without an API server.
//!
//! Read: `v1` Node, `fabedge.io/v1alpha1` Community, `v1` Service and
//! `discovery.k8s.io/v1` EndpointSlice. Other kinds are ignored (debug log),
//! except one of these four under another apiVersion or spelling (`kind:
//! node`): that is a typo, reported. A document that cannot be read is left
//! out and reported; the rest applies ([`checked`]).
//! Errors name the document (numbered from 1, in file order), its first line,
//! the object and the field:
//! `manifest doc 3 (Node edge-1) at line 40: spec.podCIDR "10.0.0.0/33" is not an IPv4 CIDR ...`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt, fs,
    path::Path,
};

use anyhow::Context;
use k8s_openapi::{
    Resource,
    api::{core::v1 as core, discovery::v1 as discovery},
};
use log::debug;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::{Checked, CommunityObject, Objects};
use crate::model::{self, DEFAULT_NAMESPACE, Snapshot, checks::Problem};

mod fingerprint;

use fingerprint::SliceName;
pub use fingerprint::{Fingerprint, LoneSlices, PageHashes, SliceEdits, TextHash};

/// The example cluster (two cloud nodes, three edge nodes, one community, a
/// DNS Service): the demo's and the network-namespace tests' default.
pub const EXAMPLE_CLUSTER: &str = include_str!("../../../tests/fixtures/mini-cluster.yaml");

/// Where in the manifest something is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// 1-based document number, in file order.
    pub doc: usize,
    /// 1-based position inside a `List` document's `items`.
    pub item: Option<usize>,
    /// 1-based line on which the document starts.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "doc {}", self.doc)?;
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        Ok(())
    }
}

/// A manifest that cannot be read as a cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// `None` for problems with the file as a whole.
    pub location: Option<Location>,
    /// The object, as `Kind name` or `Kind namespace/name`, when known.
    pub object: Option<String>,
    pub detail: String,
}

impl ManifestError {
    /// Where the problem is, without the detail: `manifest doc 3 (Node
    /// edge-1) at line 40`.
    pub fn place(&self) -> String {
        let full = self.to_string();
        let detail = format!(": {}", self.detail);
        full.strip_suffix(&detail).unwrap_or(&full).to_owned()
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("manifest")?;
        if let Some(location) = &self.location {
            write!(f, " {location}")?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if let Some(location) = &self.location {
            write!(f, " at line {}", location.line)?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Parse a manifest into Kubernetes objects, validating each object against
/// the model as it goes so that errors carry their document number. The
/// first problem is the error.
pub fn parse(text: &str) -> Result<Objects, ManifestError> {
    let (objects, mut problems) = parse_skipping(text);
    match problems.is_empty() {
        true => Ok(objects),
        false => Err(problems.swap_remove(0)),
    }
}

/// Like [`parse`], but a document (or `List` item) that cannot be read is
/// left out and reported, and everything else is returned.
pub fn parse_skipping(text: &str) -> (Objects, Vec<ManifestError>) {
    parse_documents(text, |_, _| {})
}

/// [`parse_skipping`], telling `noted` of each document (every chunk of
/// [`split_documents`], in order) the EndpointSlice it holds, if that is
/// all it holds and it reads cleanly in the whole text (not a second
/// object of that name).
fn parse_documents(
    text: &str,
    mut noted: impl FnMut(&RawDocument<'_>, Option<SliceName>),
) -> (Objects, Vec<ManifestError>) {
    let mut parser = Parser::default();
    let mut problems = Vec::new();
    for doc in split_documents(text) {
        let lone_slice = parser.document(&doc, &mut problems);
        noted(&doc, lone_slice);
    }
    (parser.objects, problems)
}

/// Parse a manifest into what planning reads: the usable objects' snapshot
/// and every document or object left out, with why. A file with no objects
/// at all is an error (an empty or truncated file is not an empty cluster).
pub fn checked(text: &str, service_cidr: ipnet::Ipv4Net) -> Result<Checked, ManifestError> {
    let (objects, problems) = parse_skipping(text);
    check(objects, problems, service_cidr)
}

/// [`checked`], and per document the EndpointSlice it holds alone, of
/// which the caller makes the text's [`Fingerprint`] (on its own thread:
/// this runs on a parsing thread, [`crate::sys::apart`]).
pub fn checked_noting_slices(
    text: &str,
    service_cidr: ipnet::Ipv4Net,
) -> Result<(Checked, LoneSlices), ManifestError> {
    let mut lone_slices = LoneSlices::default();
    let (objects, problems) = parse_documents(text, |_, slice| lone_slices.push(slice));
    Ok((check(objects, problems, service_cidr)?, lone_slices))
}

/// The checks over a parse, its problems first.
fn check(
    objects: Objects,
    problems: Vec<ManifestError>,
    service_cidr: ipnet::Ipv4Net,
) -> Result<Checked, ManifestError> {
    if objects == Objects::default() && problems.is_empty() {
        return Err(ManifestError {
            location: None,
            object: None,
            detail:
                "holds no objects (empty, or only comments); an empty cluster is never assumed: \
                     the last applied state is kept"
                    .into(),
        });
    }
    let mut checked = objects.checked(service_cidr);
    let mut manifest_problems: Vec<Problem> = problems
        .iter()
        .map(|e| Problem::new(e.place(), e.detail.clone()))
        .collect();
    manifest_problems.append(&mut checked.problems);
    checked.problems = manifest_problems;
    Ok(checked)
}

/// Whether `line` (without its newline) is a document marker.
fn is_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// The one EndpointSlice a document holds, read as a whole parse reads it;
/// `None` if it holds anything else, or a problem.
fn only_slice(doc: &RawDocument<'_>) -> Option<discovery::EndpointSlice> {
    // Locations only name errors, and an error refuses the edit anyway.
    let location = Location {
        doc: 0,
        item: None,
        line: doc.first_line,
    };
    let value = parse_yaml(doc, location).ok()?;
    let mut parser = Parser::default();
    parser.object(value, location).ok()?;
    let Objects {
        nodes,
        communities,
        services,
        mut endpoint_slices,
    } = parser.objects;
    let alone = parser.problems.is_empty()
        && nodes.is_empty()
        && communities.is_empty()
        && services.is_empty()
        && endpoint_slices.len() == 1;
    alone.then(|| endpoint_slices.pop()).flatten()
}

/// Parse a manifest into a snapshot.
pub fn snapshot(text: &str) -> Result<Snapshot, ManifestError> {
    let objects = parse(text)?;
    // Per-object problems and duplicates were reported by `parse` with their
    // location; what is left here has none to give.
    objects.snapshot().map_err(|e| ManifestError {
        location: None,
        object: Some(e.object().to_string()),
        detail: e.detail(),
    })
}

/// Read and parse a manifest file.
pub fn load(path: &Path) -> anyhow::Result<Snapshot> {
    let text =
        fs::read_to_string(path).with_context(|| format!("reading manifest {}", path.display()))?;
    snapshot(&text).with_context(|| format!("in {}", path.display()))
}

#[derive(Default)]
struct Parser {
    objects: Objects,
    /// Problems of `List` items, which do not stop the other items.
    problems: Vec<ManifestError>,
    /// Where each object was first seen, to report duplicates with both places.
    seen: HashMap<model::ObjectRef, Location>,
}

impl Parser {
    /// Read one document, its problems into `problems`. The EndpointSlice
    /// it holds when that is all it holds and nothing of it was refused.
    fn document(
        &mut self,
        doc: &RawDocument<'_>,
        problems: &mut Vec<ManifestError>,
    ) -> Option<SliceName> {
        let location = Location {
            doc: doc.number?,
            item: None,
            line: doc.first_line,
        };
        let value = match parse_yaml(doc, location) {
            Ok(value) => value,
            Err(e) => {
                problems.push(e);
                return None;
            }
        };
        if value.is_null() {
            return None;
        }
        let counts = |objects: &Objects| {
            [
                objects.nodes.len(),
                objects.communities.len(),
                objects.services.len(),
                objects.endpoint_slices.len(),
            ]
        };
        let [nodes, communities, services, slices] = counts(&self.objects);
        self.problems = Vec::new();
        if let Err(e) = self.object(value, location) {
            self.problems.push(e);
        }
        let lone_slice = self.problems.is_empty()
            && counts(&self.objects) == [nodes, communities, services, slices + 1];
        problems.append(&mut self.problems);
        match lone_slice {
            true => self.objects.endpoint_slices.last().map(SliceName::of),
            false => None,
        }
    }

    fn object(&mut self, value: Value, location: Location) -> Result<(), ManifestError> {
        let fail = |object: Option<String>, detail: String| ManifestError {
            location: Some(location),
            object,
            detail,
        };
        let Value::Mapping(mapping) = &value else {
            return Err(fail(
                None,
                "is not a Kubernetes object (expected a mapping with apiVersion, kind and metadata)".into(),
            ));
        };
        let text_field = |key: &str| mapping.get(key).and_then(Value::as_str).map(str::to_owned);
        let (Some(api_version), Some(kind)) = (text_field("apiVersion"), text_field("kind")) else {
            return Err(fail(
                None,
                "has no apiVersion or no kind; every Kubernetes object names both".into(),
            ));
        };
        let metadata = mapping.get("metadata");
        let name = metadata
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>")
            .to_owned();
        let namespace = metadata
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned();

        if location.item.is_none()
            && kind.ends_with("List")
            && let Some(Value::Sequence(items)) = mapping.get("items")
        {
            for (index, item) in items.iter().enumerate() {
                let item_location = Location {
                    item: Some(index + 1),
                    ..location
                };
                if let Err(e) = self.object(item.clone(), item_location) {
                    self.problems.push(e);
                }
            }
            return Ok(());
        }

        let object_ref = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Node") => model::ObjectRef::cluster("Node", &name),
            (CommunityObject::API_VERSION, CommunityObject::KIND) => {
                model::ObjectRef::cluster("Community", &name)
            }
            ("v1", "Service") => model::ObjectRef::namespaced("Service", &namespace, &name),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                model::ObjectRef::namespaced("EndpointSlice", &namespace, &name)
            }
            _ => {
                // A kind we read under another spelling or apiVersion is a
                // typo that would silently drop the object: say so.
                if let Some((want_api, want_kind)) = READ_KINDS
                    .iter()
                    .find(|(_, read)| read.eq_ignore_ascii_case(&kind))
                {
                    return Err(fail(
                        Some(format!("{kind} {name}")),
                        format!(
                            "apiVersion {api_version}, kind {kind} is not read by fabedge; \
                             did you mean apiVersion {want_api}, kind {want_kind}?"
                        ),
                    ));
                }
                debug!(
                    "manifest {location}: {api_version} {kind} {name} is not used by fabedge; ignored"
                );
                return Ok(());
            }
        };
        if let Some(first) = self.seen.get(&object_ref) {
            return Err(fail(
                Some(object_ref.to_string()),
                format!(
                    "is given twice (first in {first} at line {}); object names must be unique",
                    first.line
                ),
            ));
        }
        match object_ref.kind {
            "Node" => {
                let node: core::Node = typed(value, location, "Node", &name)?;
                model::Node::from_k8s(&node).map_err(|e| model_error(e, location))?;
                self.objects.nodes.push(node);
            }
            "Community" => {
                let community: CommunityObject = typed(value, location, "Community", &name)?;
                model::Community::from_k8s(&community).map_err(|e| model_error(e, location))?;
                self.objects.communities.push(community);
            }
            "Service" => {
                let service: core::Service = typed(value, location, "Service", &name)?;
                model::Service::from_k8s(&service).map_err(|e| model_error(e, location))?;
                self.objects.services.push(service);
            }
            _ => {
                let slice: discovery::EndpointSlice =
                    typed(value, location, "EndpointSlice", &name)?;
                model::EndpointSlice::from_k8s(&slice).map_err(|e| model_error(e, location))?;
                self.objects.endpoint_slices.push(slice);
            }
        }
        self.seen.insert(object_ref, location);
        Ok(())
    }
}

/// The kinds fabedge reads, with their one apiVersion.
const READ_KINDS: &[(&str, &str)] = &[
    ("v1", "Node"),
    (CommunityObject::API_VERSION, CommunityObject::KIND),
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
];

/// Deserialize into a k8s type; the error names the offending field path.
fn typed<T: DeserializeOwned>(
    value: Value,
    location: Location,
    kind: &str,
    name: &str,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let detail = if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        };
        ManifestError {
            location: Some(location),
            object: Some(format!("{kind} {name}")),
            detail,
        }
    })
}

fn model_error(error: model::ModelError, location: Location) -> ManifestError {
    ManifestError {
        location: Some(location),
        object: Some(error.object().to_string()),
        detail: error.detail(),
    }
}

/// One document's text, exactly as it appears in the file.
struct RawDocument<'a> {
    text: &'a str,
    /// 1-based line of its first line.
    first_line: usize,
    /// Whether its first line is a `---` marker.
    starts_with_marker: bool,
    /// `None` for text before the first `---` that holds no content (comments,
    /// directives): YAML does not count it as a document.
    number: Option<usize>,
}

/// Split at `---` lines. YAML forbids a `---` at column 0 inside any scalar,
/// so this split is exact, and it lets the writer keep untouched documents
/// byte for byte.
fn split_documents(text: &str) -> Vec<RawDocument<'_>> {
    let mut starts = vec![(0usize, 1usize)];
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if is_marker(line) && offset != 0 {
            starts.push((offset, index + 1));
        }
        offset += line.len();
    }
    let mut docs = Vec::new();
    let mut number = 0;
    for (i, &(start, first_line)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |&(next, _)| next);
        let chunk = &text[start..end];
        let starts_with_marker = is_marker(chunk.lines().next().unwrap_or(""));
        let preamble = i == 0
            && !starts_with_marker
            && chunk.lines().all(|l| {
                let l = l.trim();
                l.is_empty() || l.starts_with('#') || l.starts_with('%')
            });
        let doc_number = if preamble {
            None
        } else {
            number += 1;
            Some(number)
        };
        docs.push(RawDocument {
            text: chunk,
            first_line,
            starts_with_marker,
            number: doc_number,
        });
    }
    docs
}

fn parse_yaml(doc: &RawDocument<'_>, location: Location) -> Result<Value, ManifestError> {
    serde_yaml::from_str(doc.text).map_err(|e| {
        let mut message = e.to_string();
        // serde_yaml counts lines within the document; report file lines.
        if let Some(at) = e.location() {
            let relative = format!("at line {} column {}", at.line(), at.column());
            let absolute = format!(
                "at line {} column {}",
                doc.first_line + at.line() - 1,
                at.column()
            );
            message = message.replace(&relative, &absolute);
        }
        ManifestError {
            location: Some(location),
            object: None,
            detail: format!("is not valid YAML: {message}"),
        }
    })
}

/// Set and remove annotations of Node `node_name` in a manifest's text.
///
/// Only the document holding that Node is rewritten (re-serialised from its
/// parsed form: comments and formatting inside it are lost, key order is
/// kept); every other document stays byte for byte as it was. When nothing
/// changes, the text comes back unchanged. An annotation map left empty is
/// removed.
pub fn set_node_annotations(
    text: &str,
    node_name: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> Result<String, ManifestError> {
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    for doc in split_documents(text) {
        let Some(number) = doc.number else {
            out.push_str(doc.text);
            continue;
        };
        let location = Location {
            doc: number,
            item: None,
            line: doc.first_line,
        };
        let mut value = parse_yaml(&doc, location)?;
        let before = value.clone();
        if !edit_node(&mut value, node_name, set, remove) {
            out.push_str(doc.text);
            continue;
        }
        found = true;
        if value == before {
            out.push_str(doc.text);
            continue;
        }
        if doc.starts_with_marker {
            out.push_str("---\n");
        }
        let rendered = serde_yaml::to_string(&value).map_err(|e| ManifestError {
            location: Some(location),
            object: Some(format!("Node {node_name}")),
            detail: format!("cannot be written back as YAML: {e}"),
        })?;
        out.push_str(&rendered);
    }
    if !found {
        return Err(ManifestError {
            location: None,
            object: Some(format!("Node {node_name}")),
            detail: "is not in the manifest; add the Node before annotating it".into(),
        });
    }
    Ok(out)
}

/// Apply the annotation change to Node `node_name` if `value` is that Node
/// (or a `List` holding it); `true` when it was found.
fn edit_node(
    value: &mut Value,
    node_name: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> bool {
    let Value::Mapping(object) = value else {
        return false;
    };
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind.ends_with("List") {
        let Some(Value::Sequence(items)) = object.get_mut("items") else {
            return false;
        };
        let mut found = false;
        for item in items {
            found |= edit_node(item, node_name, set, remove);
        }
        return found;
    }
    let is_target = kind == "Node"
        && object.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && object
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            == Some(node_name);
    if !is_target {
        return false;
    }
    let metadata = object
        .entry("metadata".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let Value::Mapping(metadata) = metadata else {
        return false;
    };
    let annotations = metadata
        .entry("annotations".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !matches!(annotations, Value::Mapping(_)) {
        // `annotations: null` or garbage: replace with a real map.
        *annotations = Value::Mapping(Mapping::new());
    }
    let Value::Mapping(annotations) = annotations else {
        return false;
    };
    for key in remove {
        annotations.remove(key.as_str());
    }
    for (key, value) in set {
        annotations.insert(Value::String(key.clone()), Value::String(value.clone()));
    }
    if annotations.is_empty() {
        metadata.remove("annotations");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_byte_and_numbers_documents() {
        let text = "# preamble\n---\na: 1\n--- # second\nb: 2\n---\n";
        let docs = split_documents(text);
        assert_eq!(docs.iter().map(|d| d.text).collect::<String>(), text);
        assert_eq!(
            docs.iter().map(|d| d.number).collect::<Vec<_>>(),
            [None, Some(1), Some(2), Some(3)]
        );
        assert_eq!(
            docs.iter().map(|d| d.first_line).collect::<Vec<_>>(),
            [1, 2, 4, 6]
        );
        // Without a leading marker the first chunk is a document.
        assert_eq!(split_documents("a: 1\n---\nb: 2\n")[0].number, Some(1));
        // `----` and `---x` are content, not markers.
        assert_eq!(split_documents("a: |\n  x\n----\n").len(), 1);
    }

    #[test]
    fn yaml_errors_report_file_lines() {
        let err =
            parse("kind: Namespace\napiVersion: v1\n---\napiVersion: v1\nkind: [\n").unwrap_err();
        assert_eq!(err.location.map(|l| l.doc), Some(2));
        assert!(err.to_string().contains("at line 6"), "{err}");
    }

    #[test]
    fn unknown_kinds_and_empty_documents_are_ignored() {
        let objects =
            parse("---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
                .unwrap();
        assert_eq!(objects, Objects::default());
    }

    #[test]
    fn typed_errors_name_the_field_path() {
        let text = "apiVersion: v1\nkind: Node\nmetadata:\n  name: edge-1\nspec:\n  podCIDR: [1]\n";
        let err = parse(text).unwrap_err();
        let message = err.to_string();
        assert!(
            message
                .starts_with("manifest doc 1 (Node edge-1) at line 1: spec.podCIDR: invalid type"),
            "{message}"
        );
    }
}
