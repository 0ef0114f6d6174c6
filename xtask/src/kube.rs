//! The real control plane the API-server tests run against
//! (`tests/src/apiserver.rs`): kube-apiserver and kubectl built from the Go
//! module `k8s.io/kubernetes` at the version `xtask/k8s/go.mod` pins, etcd
//! from Debian's `etcd-server`, and test certificates.
//!
//! Built once into a cache outside the work tree, one folder per version
//! (`$XDG_CACHE_HOME/fabedge/k8s-<version>`, else `~/.cache/fabedge/...`),
//! and reused: when everything is there, [`ensure`] only checks files.
//!
//! The tests' harness includes this file too (`#[path]`), to find the
//! cache and to fail naming `cargo xtask setup` when it is incomplete.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// Where Debian's `etcd-server` puts etcd.
pub const ETCD: &str = "/usr/bin/etcd";

/// The files the harness needs, all under one cache folder.
#[derive(Debug, Clone)]
pub struct Tools {
    pub version: String,
    pub dir: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
    /// CA of the serving and client certificates.
    pub ca_cert: PathBuf,
    /// The API server's serving certificate (IP 127.0.0.1, DNS localhost).
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// A client certificate in `system:masters` (the admin kubeconfig).
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// Service-account token signing key and its public half.
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

/// The `xtask/k8s` folder: our go.mod pinning `k8s.io/kubernetes`.
pub fn module_dir() -> PathBuf {
    // Resolved at run time when cargo says where we are (see xtask's
    // `workspace()`): a build copied from another checkout uses this one.
    // The tests crate includes this file: its manifest dir is `tests/`.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.join("..").join("xtask/k8s")
}

/// The pinned Kubernetes version, read from `xtask/k8s/go.mod` (the one
/// place it is written).
pub fn pinned_version() -> Result<String> {
    let go_mod = module_dir().join("go.mod");
    let text = std::fs::read_to_string(&go_mod)
        .with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("k8s.io/kubernetes v"))
        .find_map(|rest| rest.split_whitespace().next())
        .map(|v| format!("v{v}"))
        .with_context(|| format!("{} does not require k8s.io/kubernetes", go_mod.display()))
}

pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("fabedge"));
    }
    let home = std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/fabedge"))
}

/// Where the tools of the pinned version live (present or not).
pub fn tools() -> Result<Tools> {
    let version = pinned_version()?;
    let dir = cache_root()?.join(format!("k8s-{version}"));
    let pki = dir.join("pki");
    Ok(Tools {
        kube_apiserver: dir.join("bin/kube-apiserver"),
        kubectl: dir.join("bin/kubectl"),
        etcd: PathBuf::from(ETCD),
        ca_cert: pki.join("ca.crt"),
        serving_cert: pki.join("apiserver.crt"),
        serving_key: pki.join("apiserver.key"),
        admin_cert: pki.join("admin.crt"),
        admin_key: pki.join("admin.key"),
        sa_key: pki.join("sa.key"),
        sa_pub: pki.join("sa.pub"),
        version,
        dir,
    })
}

impl Tools {
    fn missing(&self) -> Vec<&Path> {
        [
            &self.kube_apiserver,
            &self.kubectl,
            &self.etcd,
            &self.ca_cert,
            &self.serving_cert,
            &self.serving_key,
            &self.admin_cert,
            &self.admin_key,
            &self.sa_key,
            &self.sa_pub,
        ]
        .into_iter()
        .map(PathBuf::as_path)
        .filter(|p| !p.exists())
        .collect()
    }
}

/// The tools, or an error naming what is missing and the command that
/// installs it (for the tests: they never build Kubernetes themselves).
pub fn installed() -> Result<Tools> {
    let tools = tools()?;
    let missing = tools.missing();
    if !missing.is_empty() {
        bail!(
            "the API-server tests need kube-apiserver, kubectl ({}), etcd and test certificates; \
             missing: {}. Run `cargo xtask setup` (builds Kubernetes once into {}, about 12 \
             minutes on an idle 2-core machine, then cached)",
            tools.version,
            missing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            tools.dir.display()
        );
    }
    Ok(tools)
}

/// Builds or generates whatever of [`tools`] is missing, saying what and how
/// long it took. etcd itself comes with the apt packages of `setup`.
pub fn ensure() -> Result<Tools> {
    let tools = tools()?;
    if !tools.kube_apiserver.exists() || !tools.kubectl.exists() {
        build_kubernetes(&tools)?;
    }
    if !tools.sa_pub.exists() || !tools.admin_key.exists() || !tools.serving_key.exists() {
        generate_certificates(&tools)?;
    }
    installed()
}

fn build_kubernetes(tools: &Tools) -> Result<()> {
    let started = Instant::now();
    eprintln!(
        "setup: building kube-apiserver and kubectl {} from the Go module k8s.io/kubernetes \
         (xtask/k8s/go.mod) into {}; the first build takes about 11 CPU-minutes (12+ minutes on 2 cores)",
        tools.version,
        tools.dir.display()
    );
    let go = Command::new("go").arg("version").output();
    if !go.is_ok_and(|o| o.status.success()) {
        bail!("`go` is not installed: the API-server tests need Go 1.26 to build kube-apiserver");
    }
    let bin = tools.dir.join("bin");
    // Built beside the final folder and renamed into place, so an
    // interrupted build never leaves half a tool behind.
    let partial = tools
        .dir
        .join(format!("bin.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let minor = tools
        .version
        .split('.')
        .nth(1)
        .context("a version like v1.37.2")?;
    // What Kubernetes' own build stamps in, so `kubectl version` and the
    // server's /version tell the truth.
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={v} \
         -X k8s.io/component-base/version.gitMajor=1 \
         -X k8s.io/component-base/version.gitMinor={minor} \
         -X k8s.io/component-base/version.gitTreeState=clean",
        v = tools.version
    );
    let status = Command::new("go")
        .current_dir(module_dir())
        .args([
            "build",
            "-trimpath",
            "-buildvcs=false",
            "-ldflags",
            &ldflags,
            "-o",
        ])
        .arg(format!("{}/", partial.display()))
        .args([
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kubectl",
        ])
        // Use the installed Go, never download another toolchain.
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .status()
        .context("running go build")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        bail!(
            "go build of kube-apiserver and kubectl {} failed",
            tools.version
        );
    }
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::rename(&partial, &bin)
        .with_context(|| format!("moving the build into {}", bin.display()))?;
    eprintln!(
        "setup: built kube-apiserver and kubectl {} in {:.0?}",
        tools.version,
        started.elapsed()
    );
    Ok(())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A test CA; the API server's serving certificate for 127.0.0.1; an admin
/// client certificate in `system:masters`; an RSA service-account key.
/// Valid for ten years: they only ever sign for loopback in tests.
fn generate_certificates(tools: &Tools) -> Result<()> {
    let started = Instant::now();
    let pki = tools.ca_cert.parent().context("pki folder")?.to_path_buf();
    eprintln!("setup: generating test certificates into {}", pki.display());
    let partial = tools
        .dir
        .join(format!("pki.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "3650"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=fabedge-test-ca",
    ]);
    openssl(&partial, &ca)?;
    let leaves = [
        (
            "apiserver",
            "2",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "admin",
            "3",
            "/O=system:masters/CN=fabedge-test-admin",
            "extendedKeyUsage=clientAuth\n",
        ),
    ];
    for (name, serial, subject, extensions) in leaves {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(
            partial.join(&ext),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{extensions}"),
        )?;
        let mut req = vec!["req", "-nodes"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(&partial, &req)?;
        openssl(
            &partial,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                serial,
                "-days",
                "3650",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        )?;
    }
    openssl(
        &partial,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(
        &partial,
        &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
    )?;
    let _ = std::fs::remove_dir_all(&pki);
    std::fs::rename(&partial, &pki).with_context(|| format!("moving into {}", pki.display()))?;
    eprintln!(
        "setup: test certificates ready in {:.1?}",
        started.elapsed()
    );
    Ok(())
}
