//! Pods attached by the real CNI plugins, with a Flannel-like CNI configuration.

use std::{
    fs,
    io::Write,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, mpsc},
    thread,
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_agent::plan::CNI_FILE_NAME;
use ipnet::Ipv4Net;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::Netns;

use super::fixture::NodeRole;
use super::traffic::Endpoint;
use super::{CLOUD_POD_BRIDGE, CNI_PLUGIN_DIR, CNI_TIMEOUT, Cluster, FLANNEL_MTU};

impl Cluster {
    /// Another pod on `node`, `<node>-<name>`, attached like the node's own
    /// (the same CNI, an address of the node's pod CIDR) and answering on
    /// the echo port. Dropping it deletes its namespace (and its veth).
    pub fn add_pod(&self, node: &str, name: &str) -> Result<Endpoint> {
        self.start_pod(node, name)
    }

    fn start_pod(&self, name: &str, pod: &str) -> Result<Endpoint> {
        let node = self.cluster_node(name)?;
        let pod_netns = Arc::new(Netns::new(&format!("{name}-{pod}"))?);
        let plugin = match node.spec.role {
            NodeRole::Edge => {
                let path = node.files.cni_conf_dir.join(CNI_FILE_NAME);
                first_plugin_of(&path)
                    .with_context(|| format!("reading the CNI config the agent of {name} wrote"))?
            }
            NodeRole::Connector | NodeRole::Cloud => flannel_like_cni_config(node.spec.pod_cidr),
        };
        let pod_ip = cni_add(
            &node.netns,
            &pod_netns,
            &format!("{name}-{pod}"),
            plugin,
            &node.files.ipam_dir,
        )
        .with_context(|| format!("attaching the {pod} of {name}"))?;
        ensure!(
            node.spec.pod_cidr.contains(&pod_ip),
            "the {pod} of {name} got {pod_ip}, outside the node's pod CIDR {}",
            node.spec.pod_cidr
        );
        Endpoint::start(format!("{name} {pod}"), pod_netns, pod_ip)
    }

    /// Attaches the node's pod with the real CNI plugins — on edge nodes with
    /// the conflist the agent wrote, on cloud nodes with a Flannel-like
    /// configuration — and starts the pod's and the node's echo servers.
    pub(super) fn attach_pod(&mut self, name: &str) -> Result<()> {
        let pod = self.start_pod(name, "pod")?;
        let node = self.cluster_node(name)?;
        let host = Endpoint::start(
            format!("{name} node"),
            Arc::clone(&node.netns),
            node.spec.internal_ip,
        )?;
        let node = self
            .nodes
            .get_mut(name)
            .with_context(|| format!("no node {name}"))?;
        node.pod = Some(pod);
        node.host = Some(host);
        Ok(())
    }
}

/// What Flannel's CNI plugin hands to `bridge`: pods on `cni0` with the
/// node's pod CIDR, the bridge as their gateway, Flannel's MTU.
fn flannel_like_cni_config(pod_cidr: Ipv4Net) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "cbr0",
        "type": "bridge",
        "bridge": CLOUD_POD_BRIDGE,
        "isGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "mtu": FLANNEL_MTU,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": pod_cidr.to_string() }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
        },
    })
}

/// The first plugin of a conflist, as a runtime hands it to the plugin: with
/// the list's `cniVersion` and `name` copied in.
fn first_plugin_of(conflist: &Path) -> Result<serde_json::Value> {
    let text =
        fs::read_to_string(conflist).with_context(|| format!("reading {}", conflist.display()))?;
    let list: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", conflist.display()))?;
    let mut plugin = list
        .get("plugins")
        .and_then(|p| p.get(0))
        .cloned()
        .with_context(|| format!("{} has no plugins", conflist.display()))?;
    let object = plugin
        .as_object_mut()
        .with_context(|| format!("{}: plugins[0] is not an object", conflist.display()))?;
    for key in ["cniVersion", "name"] {
        let value = list
            .get(key)
            .cloned()
            .with_context(|| format!("{} has no {key}", conflist.display()))?;
        object.insert(key.to_owned(), value);
    }
    Ok(plugin)
}

/// `CNI_COMMAND=ADD` of `plugin`'s type, run in the node's namespace for a pod
/// namespace, with host-local's store in `ipam_dir`. Returns the pod's address.
fn cni_add(
    node: &Netns,
    pod: &Netns,
    container_id: &str,
    mut plugin: serde_json::Value,
    ipam_dir: &Path,
) -> Result<Ipv4Addr> {
    let plugin_type = plugin
        .get("type")
        .and_then(|t| t.as_str())
        .context("CNI config without a type")?
        .to_owned();
    let ipam = plugin
        .get_mut("ipam")
        .and_then(|i| i.as_object_mut())
        .context("CNI config without ipam")?;
    ipam.insert("dataDir".into(), ipam_dir.display().to_string().into());
    let stdin = serde_json::to_vec(&plugin)?;

    let binary = Path::new(CNI_PLUGIN_DIR).join(&plugin_type);
    ensure!(
        binary.exists(),
        "CNI plugin {} is missing: install containernetworking-plugins",
        binary.display()
    );
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg(&binary)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PLUGIN_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(&stdin)
        .context("writing the CNI config to the plugin")?;
    let pid = child.id();
    let (done, result) = mpsc::channel();
    thread::spawn(move || done.send(child.wait_with_output()));
    let output = match result.recv_timeout(CNI_TIMEOUT) {
        Ok(output) => output.context("waiting for the CNI plugin")?,
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            bail!("CNI plugin {plugin_type} did not finish within {CNI_TIMEOUT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "CNI ADD with {plugin_type} failed ({}): {} {}",
        output.status,
        stdout.trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let result: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| format!("CNI result {stdout:?}"))?;
    let address = result
        .get("ips")
        .and_then(|ips| ips.get(0))
        .and_then(|ip| ip.get("address"))
        .and_then(|a| a.as_str())
        .with_context(|| format!("CNI result without ips[0].address: {stdout}"))?;
    let net: Ipv4Net = address
        .parse()
        .with_context(|| format!("CNI address {address:?}"))?;
    Ok(net.addr())
}
