//! `cargo xtask image`: the agent as an OCI image, written as an `oci-archive`
//! tar (what `podman load`, `skopeo copy oci-archive:` and
//! `ctr images import` read).
//!
//! No base image: nothing can be pulled here, and the agent needs nothing but
//! itself at run time (a static musl binary with the eBPF object embedded; CNI
//! plugins are the host's, the DaemonSet mounts what the agent writes). The
//! one layer holds `/usr/local/bin/fabedge-agent`, the entrypoint.
//!
//! Every byte is ours and fixed by the binary alone (tar headers with mtime 0
//! and uid 0, JSON without timestamps), so the same binary gives the same
//! image digest, and an unchanged binary skips the assembly.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::build;

/// The Rust target of the image's binary: musl links statically by default.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// OCI's name for the architecture of [`TARGET`].
const ARCH: &str = "amd64";
/// Where the binary sits in the image (the entrypoint).
pub const BINARY_IN_IMAGE: &str = "usr/local/bin/fabedge-agent";
/// The image whose name `deploy/kustomization.yaml` maps to the real one.
const KUSTOMIZE_IMAGE: &str = "fabedge-agent";
/// Bump when the layout below changes, so cached archives are rebuilt.
const LAYOUT_VERSION: &str = "1";

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The default archive path (where `tests/tests/image.rs` looks for it).
pub fn default_out(workspace: &Path) -> PathBuf {
    target_dir(workspace).join("image/fabedge-agent.oci.tar")
}

fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
}

/// What [`build`] made.
pub struct Built {
    /// The image reference the archive carries.
    pub reference: String,
    /// The static release agent put in the image (in a cache outside the
    /// work tree; the VM boots run it too).
    pub agent: PathBuf,
}

/// Builds the static agent and the archive at `out`.
pub fn build(workspace: &Path, out: &Path) -> Result<Built> {
    build::build_ebpf(workspace)?;
    let binary = build_static_agent(workspace)?;
    let reference = image_reference(workspace)?;
    let bytes = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    check_static(&binary, &bytes)?;

    // The archive is a function of these alone.
    let inputs = hex(&Sha256::new()
        .chain_update(LAYOUT_VERSION)
        .chain_update(&reference)
        .chain_update(&bytes)
        .finalize());
    let stamp = out.with_extension("tar.inputs");
    if out.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == inputs) {
        eprintln!(
            "image: {reference} is up to date in {} (binary unchanged)",
            out.display()
        );
        return Ok(Built {
            reference,
            agent: binary,
        });
    }
    eprintln!(
        "image: assembling {reference} ({} MiB static agent) into {}",
        bytes.len() >> 20,
        out.display()
    );
    let archive = oci_archive(&reference, &bytes)?;
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(out, archive).with_context(|| format!("writing {}", out.display()))?;
    fs::write(&stamp, format!("{inputs}\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    Ok(Built {
        reference,
        agent: binary,
    })
}

/// `cargo build --release --target x86_64-unknown-linux-musl -p fabedge-agent`, stripped.
fn build_static_agent(workspace: &Path) -> Result<PathBuf> {
    // A release build for another target is slow to start from nothing: it
    // is cached outside the work tree, shared by every clone (CI included).
    let cache = crate::kube::cache_root()?.join("image-target");
    eprintln!(
        "image: building fabedge-agent for {TARGET} (release, static) in {}",
        cache.display()
    );
    let status = Command::new("cargo")
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "-p",
            "fabedge-agent",
        ])
        // ring compiles C; Debian's musl-tools names its compiler musl-gcc.
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_TARGET_DIR", &cache)
        .status()
        .context("running cargo build for the image's agent")?;
    if !status.success() {
        bail!(
            "building fabedge-agent for {TARGET} failed (see above); \
             `cargo xtask setup` installs the target and musl-gcc"
        );
    }
    Ok(cache.join(TARGET).join("release/fabedge-agent"))
}

/// An ELF with a program interpreter needs a loader and libc the image lacks.
fn check_static(path: &Path, elf: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    let le_u16 = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let le_u32 = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let le_u64 = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF",
        path.display()
    );
    let headers = (|| {
        let offset = usize::try_from(le_u64(0x20)?).ok()?;
        let size = usize::from(le_u16(0x36)?);
        let count = usize::from(le_u16(0x38)?);
        (0..count)
            .map(|i| le_u32(offset + i * size))
            .collect::<Option<Vec<u32>>>()
    })()
    .with_context(|| format!("{}: truncated ELF program headers", path.display()))?;
    ensure!(
        !headers.contains(&PT_INTERP),
        "{} is dynamically linked (it names a program interpreter); the image has no libc: \
         build it for {TARGET}",
        path.display()
    );
    Ok(())
}

/// `newName:newTag` of the `fabedge-agent` entry of `deploy/kustomization.yaml`:
/// the name the DaemonSets pull, so a loaded image is the one they run.
pub fn image_reference(workspace: &Path) -> Result<String> {
    let path = workspace.join("deploy/kustomization.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let entry = doc["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|image| image["name"].as_str() == Some(KUSTOMIZE_IMAGE))
        .with_context(|| {
            format!(
                "{} has no `images:` entry named {KUSTOMIZE_IMAGE}: add one with newName and newTag",
                path.display()
            )
        })?;
    let field = |key: &str| {
        entry[key].as_str().with_context(|| {
            format!(
                "{}: the {KUSTOMIZE_IMAGE} image entry has no string `{key}`",
                path.display()
            )
        })
    };
    Ok(format!("{}:{}", field("newName")?, field("newTag")?))
}

/// One blob of the layout: its bytes, digest and media type.
struct Blob {
    bytes: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        let digest = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
        Blob { bytes, digest }
    }

    fn json(value: &serde_json::Value) -> Blob {
        Blob::new(serde_json::to_vec(value).expect("JSON values serialize"))
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.bytes.len() })
    }

    fn path(&self) -> String {
        format!("blobs/{}", self.digest.replacen(':', "/", 1))
    }
}

/// The OCI layout (oci-layout, index.json, blobs) of the image, as one tar.
fn oci_archive(reference: &str, binary: &[u8]) -> Result<Vec<u8>> {
    let mut layer = Tar::default();
    for dir in ["usr/", "usr/local/", "usr/local/bin/"] {
        layer.dir(dir, 0o755)?;
    }
    layer.file(BINARY_IN_IMAGE, 0o755, binary)?;
    let layer = Blob::new(layer.finish());

    let config = Blob::json(&json!({
        "architecture": ARCH,
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{BINARY_IN_IMAGE}")],
            "Env": ["PATH=/usr/local/bin"],
            "Labels": {
                "org.opencontainers.image.title": "fabedge-agent",
                "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        "history": [{ "created_by": "cargo xtask image" }],
    }));
    let manifest = Blob::json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(MEDIA_CONFIG),
        "layers": [layer.descriptor(MEDIA_LAYER)],
    }));
    let mut manifest_descriptor = manifest.descriptor(MEDIA_MANIFEST);
    manifest_descriptor["platform"] = json!({ "architecture": ARCH, "os": "linux" });
    // podman and skopeo read the name from ref.name, containerd from its own key.
    manifest_descriptor["annotations"] = json!({
        "org.opencontainers.image.ref.name": reference,
        "io.containerd.image.name": reference,
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [manifest_descriptor],
    });

    let mut archive = Tar::default();
    archive.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    archive.file("index.json", 0o644, &serde_json::to_vec(&index)?)?;
    for dir in ["blobs/", "blobs/sha256/"] {
        archive.dir(dir, 0o755)?;
    }
    for blob in [&layer, &config, &manifest] {
        archive.file(&blob.path(), 0o644, &blob.bytes)?;
    }
    Ok(archive.finish())
}

/// A ustar writer for the few short names above: owner root, mtime 0.
#[derive(Default)]
struct Tar {
    bytes: Vec<u8>,
}

impl Tar {
    fn dir(&mut self, name: &str, mode: u32) -> Result<()> {
        self.entry(name, mode, b'5', &[])
    }

    fn file(&mut self, name: &str, mode: u32, contents: &[u8]) -> Result<()> {
        self.entry(name, mode, b'0', contents)
    }

    fn entry(&mut self, name: &str, mode: u32, kind: u8, contents: &[u8]) -> Result<()> {
        ensure!(
            name.len() < 100,
            "tar entry name {name:?} is too long for a ustar header"
        );
        let mut header = [0u8; 512];
        let mut put = |at: usize, field: &[u8]| header[at..at + field.len()].copy_from_slice(field);
        put(0, name.as_bytes());
        put(100, format!("{mode:07o}\0").as_bytes());
        put(108, b"0000000\0"); // uid
        put(116, b"0000000\0"); // gid
        put(124, format!("{:011o}\0", contents.len()).as_bytes());
        put(136, b"00000000000\0"); // mtime
        put(148, b"        "); // checksum, counted as spaces
        put(156, &[kind]);
        put(257, b"ustar\0");
        put(263, b"00");
        put(265, b"root");
        put(297, b"root");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(contents);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        let rest = self.bytes.len() % 512;
        if rest != 0 {
            self.bytes.resize(self.bytes.len() + 512 - rest, 0);
        }
    }

    /// Two zero blocks end the archive.
    fn finish(mut self) -> Vec<u8> {
        self.bytes.resize(self.bytes.len() + 1024, 0);
        self.bytes
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_binary_gives_the_same_archive_and_a_valid_tar() {
        let a = oci_archive("example.org/agent:1", b"\x7fELF binary").unwrap();
        let b = oci_archive("example.org/agent:1", b"\x7fELF binary").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len() % 512, 0);
        // GNU tar lists what we wrote.
        let dir = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.tar");
        fs::write(&path, &a).unwrap();
        let out = Command::new("tar").arg("-tf").arg(&path).output().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names = String::from_utf8(out.stdout).unwrap();
        assert!(
            names.starts_with("oci-layout\nindex.json\nblobs/\nblobs/sha256/\n"),
            "{names}"
        );
        assert_eq!(
            names
                .lines()
                .filter(|l| l.starts_with("blobs/sha256/") && l.len() > 20)
                .count(),
            3
        );
    }
}
