//! Edge autonomy: the last [`Objects`] the agent planned and applied
//! successfully, kept in the state dir. An agent that starts while the API
//! server is unreachable applies this instead of waiting (or worse, planning
//! from nothing), so the node comes back with the datapath it had.

use std::{
    borrow::Cow,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    model::{ServiceInput, SliceInput},
    source::{CommunityObject, ObjectRefs, Objects},
    sys::write_if_changed,
};

/// File name inside the state dir.
pub const FILE_NAME: &str = "last-good-objects.json";

/// The file's shape; versioned so a future agent can refuse an old layout
/// instead of misreading it.
#[derive(Deserialize)]
struct Stored {
    version: u32,
    nodes: Vec<k8s_openapi::api::core::v1::Node>,
    communities: Vec<CommunityObject>,
    services: Vec<k8s_openapi::api::core::v1::Service>,
    endpoint_slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
}

/// [`Stored`] as written: borrowed, so saving a large cluster does not
/// hold a second copy of every object.
#[derive(Serialize)]
struct StoredRef<'a, 'o> {
    version: u32,
    nodes: &'a [&'o k8s_openapi::api::core::v1::Node],
    communities: &'a [&'o CommunityObject],
    services: SavedAsObjects<'a, 'o, ServiceInput<'o>, k8s_openapi::api::core::v1::Service>,
    endpoint_slices:
        SavedAsObjects<'a, 'o, SliceInput<'o>, k8s_openapi::api::discovery::v1::EndpointSlice>,
}

/// Services and EndpointSlices saved as Kubernetes objects, whichever way
/// they are kept: one the kube cache keeps as its model is written as the
/// object the model reads (`to_k8s`), one at a time.
struct SavedAsObjects<'a, 'o, T, O: Clone>(&'a [T], fn(T) -> Cow<'o, O>);

impl<T: Copy, O: Clone + Serialize> Serialize for SavedAsObjects<'_, '_, T, O> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|item| (self.1)(*item)))
    }
}

const VERSION: u32 = 1;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Writes `objects` atomically (temp file + rename, see `write_if_changed`),
/// mode 0600: nothing in it is secret today, but node keys may join it.
pub fn save(state_dir: &Path, objects: &Objects) -> Result<()> {
    save_refs(state_dir, &objects.refs())
}

/// [`save`] of borrowed objects (the kube caches, under their lock).
pub fn save_refs(state_dir: &Path, objects: &ObjectRefs<'_>) -> Result<()> {
    let stored = StoredRef {
        version: VERSION,
        nodes: &objects.nodes,
        communities: &objects.communities,
        services: SavedAsObjects(&objects.services, ServiceInput::object),
        endpoint_slices: SavedAsObjects(&objects.endpoint_slices, SliceInput::object),
    };
    let json = serde_json::to_vec(&stored).context("serialising the last good objects")?;
    write_if_changed(&path(state_dir), &json, 0o600)
}

/// The saved objects, `None` when there are none yet. A file that cannot be
/// read back is an error naming it (and the fix: delete it).
pub fn load(state_dir: &Path) -> Result<Option<Objects>> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let stored: Stored = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a snapshot this agent wrote; delete it (the agent rewrites it once online)",
            path.display()
        )
    })?;
    if stored.version != VERSION {
        anyhow::bail!(
            "{} has layout version {}, this agent reads {VERSION}; delete it (the agent rewrites it once online)",
            path.display(),
            stored.version
        );
    }
    Ok(Some(Objects {
        nodes: stored.nodes,
        communities: stored.communities,
        services: stored.services,
        endpoint_slices: stored.endpoint_slices,
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::source::manifest;

    #[test]
    fn saved_objects_load_back_identical_and_private() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/mini-cluster.yaml"
        ))
        .expect("fixture");
        let objects = manifest::parse(&text).expect("fixture parses");
        let dir =
            std::env::temp_dir().join(format!("fabedge-snapshot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(load(&dir).unwrap().is_none());
        save(&dir, &objects).unwrap();
        let loaded = load(&dir).unwrap().expect("saved");
        assert_eq!(loaded, objects);
        assert_eq!(loaded.snapshot().unwrap(), objects.snapshot().unwrap());
        let mode = std::fs::metadata(path(&dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Slices kept as their model are saved as objects that read the same.
        let models: Vec<_> = objects
            .endpoint_slices
            .iter()
            .map(|slice| {
                std::sync::Arc::new(
                    crate::model::EndpointSlice::from_k8s(slice)
                        .unwrap()
                        .unwrap(),
                )
            })
            .collect();
        let mut refs = objects.refs();
        refs.endpoint_slices = models.iter().map(SliceInput::Model).collect();
        save_refs(&dir, &refs).unwrap();
        let loaded = load(&dir).unwrap().expect("saved");
        assert_eq!(loaded.snapshot().unwrap(), objects.snapshot().unwrap());
        assert_eq!(loaded.endpoint_slices.len(), objects.endpoint_slices.len());
        std::fs::write(path(&dir), b"{not json").unwrap();
        let error = format!("{:#}", load(&dir).unwrap_err());
        assert!(error.contains("delete it"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
