//! A real Kubernetes control plane for tests: etcd and kube-apiserver on
//! loopback, with RBAC and Node authorization, service-account tokens
//! (TokenRequest) and the default admission plugins. No controller manager
//! and no kubelet: objects are stored and served, nothing reconciles them.
//!
//! The binaries and certificates come from `cargo xtask setup`
//! (`xtask/src/kube.rs`, a cache outside the work tree); when they are
//! missing, [`ApiServer::start`] fails naming that command.
//!
//! Each server has its own data folder and free ports; dropping it (also
//! while a test panics) kills both processes and removes the folder. The
//! processes also die with the test process (`PR_SET_PDEATHSIG`): start and
//! drop a server on the same thread, as a test naturally does.
//!
//! The methods are synchronous; [`ApiServer::block_on`] runs async kube-rs
//! code on the server's own runtime, with [`ApiServer::client`] as admin.

#[path = "../../xtask/src/kube.rs"]
#[allow(dead_code)]
mod tools;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    core::GroupVersionKind,
    discovery::{self, Scope},
};
use serde_json::{Value, json};

use crate::netns::Netns;

pub use tools::Tools;

/// The Service ClusterIP range (the mini cluster's fixture uses 10.96.0.10).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Field manager of the objects the tests apply.
const MANAGER: &str = "fabedge-test";
/// A busy 2-core machine starts kube-apiserver in 5-20 s.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Who a kubeconfig speaks as.
pub enum User<'a> {
    /// The `system:masters` client certificate.
    Admin,
    /// A bearer token (e.g. from [`ApiServer::token`]).
    Token(&'a str),
}

pub struct ApiServer {
    tools: Tools,
    dir: PathBuf,
    port: u16,
    etcd_url: String,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    runtime: tokio::runtime::Runtime,
    client: Client,
}

/// A child process that dies with the thread that started it: no
/// etcd or kube-apiserver outlives a killed test run.
fn spawn(mut cmd: Command, log: &Path) -> Result<Child> {
    // Appended across restarts, so a failure shows the whole story.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// A loopback TCP port nothing listens on, below the kernel's ephemeral
/// range (32768 and up): a free ephemeral port can become some connection's
/// source port before the server binds it (seen with parallel tests:
/// kube-apiserver "bind: address already in use").
fn free_port() -> Result<u16> {
    static PICKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761) ^ nanos;
    for _ in 0..500 {
        let pick = PICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(pick.wrapping_mul(7_919)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback TCP port between 20000 and 32000 after 500 tries")
}

/// The last `lines` lines of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn stop(child: &mut Option<Child>, grace: Duration) {
    let Some(mut process) = child.take() else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(process.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = process.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = process.kill();
    let _ = process.wait();
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and waits until `/readyz` says ready.
    pub fn start() -> Result<ApiServer> {
        let started = Instant::now();
        let tools = tools::installed()?;
        // Unique per server within this process.
        static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fabedge-apiserver-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let port = free_port()?;
        let config = kubeconfig_value(&tools, port, &User::Admin, "admin");
        let client = client_for(&runtime, config.clone())?;
        let etcd_url = format!("http://127.0.0.1:{}", free_port()?);
        // From here on, dropping `server` cleans up whatever was started.
        let mut server = ApiServer {
            tools,
            dir,
            port,
            etcd_url,
            etcd: None,
            apiserver: None,
            runtime,
            client,
        };
        let dir = server.dir.clone();
        std::fs::write(
            dir.join("admin.kubeconfig"),
            serde_json::to_string_pretty(&config)?,
        )?;
        // Every request's metadata (who, verb, object, status) in audit.log.
        std::fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n",
        )?;
        let etcd_url = &server.etcd_url;
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let mut etcd = Command::new(&server.tools.etcd);
        etcd.arg("--name=fabedge-test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=fabedge-test={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        server.etcd = Some(spawn(etcd, &dir.join("etcd.log"))?);
        server.wait_for_etcd()?;
        server.start_apiserver()?;
        eprintln!(
            "apiserver: etcd and kube-apiserver {} ready at {} in {:.1?}",
            server.tools.version,
            server.url(),
            started.elapsed()
        );
        Ok(server)
    }

    /// etcd answers `/health` (a plain HTTP GET on loopback).
    fn wait_for_etcd(&mut self) -> Result<()> {
        let address = self.etcd_url.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let healthy = TcpStream::connect(&address)
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
                    let mut reply = String::new();
                    s.read_to_string(&mut reply)?;
                    Ok(reply.contains("\"health\":\"true\""))
                })
                .unwrap_or(false);
            if healthy {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.etcd.as_mut().map(Child::try_wait) {
                bail!(
                    "etcd exited ({status}):\n{}",
                    tail(&self.dir.join("etcd.log"), 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd was not healthy within {READY_TIMEOUT:?}:\n{}",
                    tail(&self.dir.join("etcd.log"), 30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts kube-apiserver (again, on the same port and etcd) and waits
    /// for `/readyz`.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            bail!("kube-apiserver is already running");
        }
        let t = &self.tools;
        let mut cmd = Command::new(&t.kube_apiserver);
        cmd.arg(format!("--etcd-servers={}", self.etcd_url))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--cert-dir={}", self.dir.join("certs").display()))
            .arg(format!("--tls-cert-file={}", t.serving_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                t.serving_key.display()
            ))
            .arg(format!("--client-ca-file={}", t.ca_cert.display()))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", t.sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                t.sa_key.display()
            ))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            // The DaemonSets in deploy/ are privileged.
            .arg("--allow-privileged=true")
            // A loopback address cannot be the `kubernetes` Service's endpoint.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!(
                "--audit-policy-file={}",
                self.dir.join("audit-policy.yaml").display()
            ))
            .arg(format!(
                "--audit-log-path={}",
                self.dir.join("audit.log").display()
            ))
            .arg("--profiling=false");
        let log = self.dir.join("kube-apiserver.log");
        let mut child = spawn(cmd, &log)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            let request = http::Request::get("/readyz").body(Vec::new())?;
            match self.block_on(self.client.request_text(request)) {
                Ok(body) if body.trim() == "ok" => break,
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("kube-apiserver exited ({status}):\n{}", tail(&log, 40));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "kube-apiserver was not ready within {READY_TIMEOUT:?} (last /readyz: {last}):\n{}",
                    tail(&log, 40)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.apiserver = Some(child);
        Ok(())
    }

    /// Stops kube-apiserver the way a node's shutdown does (SIGTERM); etcd
    /// keeps the data.
    pub fn stop_apiserver(&mut self) {
        stop(&mut self.apiserver, Duration::from_secs(20));
    }

    /// Stops and starts kube-apiserver: every watch breaks.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver();
        self.start_apiserver()
    }

    /// Every audit event so far (one per request and stage, across
    /// restarts): `user.username`, `verb`, `objectRef`, `responseStatus`...
    pub fn audit(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).context("an audit.log line"))
            .collect()
    }

    /// Writes a key of its own into etcd (through etcd's JSON gateway), so
    /// etcd's revision moves past every resource version clients hold. Done
    /// while kube-apiserver is down, the restarted server's watch cache
    /// starts after those versions: clients' watches get 410 and relist.
    pub fn bump_etcd_revision(&self) -> Result<()> {
        let address = self.etcd_url.trim_start_matches("http://");
        // base64 of "/fabedge-test/bump" and of "1".
        let body = r#"{"key":"L2ZhYmVkZ2UtdGVzdC9idW1w","value":"MQ=="}"#;
        let mut stream = TcpStream::connect(address).context("connecting to etcd")?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "POST /v3/kv/put HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        if !reply.starts_with("HTTP/1.0 200") && !reply.starts_with("HTTP/1.1 200") {
            bail!("etcd refused the put: {reply}");
        }
        Ok(())
    }

    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The server's data folder (logs, kubeconfigs); removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kube-apiserver.log")).unwrap_or_default()
    }

    /// A kube-rs client speaking as admin (use it inside [`Self::block_on`]).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A client with the server's CA speaking as `user`.
    pub fn client_as(&self, user: &User) -> Result<Client> {
        client_for(
            &self.runtime,
            kubeconfig_value(&self.tools, self.port, user, "user"),
        )
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// Writes a kubeconfig for `user` to `path`. `port` is where the server
    /// is reached from (see [`Self::expose_in`]); `None`: its own port.
    pub fn write_kubeconfig(&self, path: &Path, user: &User, port: Option<u16>) -> Result<()> {
        let value = kubeconfig_value(&self.tools, port.unwrap_or(self.port), user, "user");
        std::fs::write(path, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// `kubectl ARGS` as admin; the output whatever the exit status.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_as(&self.admin_kubeconfig(), args)
    }

    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<Output> {
        Command::new(&self.tools.kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running kubectl {}", args.join(" ")))
    }

    /// A token of ServiceAccount `namespace/name` from the TokenRequest API,
    /// valid for an hour; with `node`, bound to that Node object (the token
    /// dies with the Node, and carries its name and uid: the server puts the
    /// name in the user's extra `authentication.kubernetes.io/node-name`).
    pub fn token(&self, namespace: &str, name: &str, node: Option<&str>) -> Result<String> {
        match node {
            Some(node) => self.bound_token(namespace, name, "Node", node),
            None => self.token_request(namespace, name, None),
        }
    }

    /// A token of ServiceAccount `namespace/name` bound to the Pod
    /// `namespace/pod`, as the kubelet's projected token of a Pod is: the
    /// server adds the Pod's node (its `spec.nodeName`) to the token, and
    /// to the user's extra as `authentication.kubernetes.io/node-name`.
    pub fn pod_token(&self, namespace: &str, name: &str, pod: &str) -> Result<String> {
        self.bound_token(namespace, name, "Pod", pod)
    }

    /// A token bound to the object `kind` `object` (a Node, or a Pod in `namespace`).
    fn bound_token(&self, namespace: &str, name: &str, kind: &str, object: &str) -> Result<String> {
        let namespaced = kind != "Node";
        let found = self
            .get("v1", kind, namespaced.then_some(namespace), object)?
            .with_context(|| format!("{kind} {object} to bind a token to"))?;
        let reference = BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some(kind.into()),
            name: Some(object.into()),
            uid: found["metadata"]["uid"].as_str().map(String::from),
        };
        self.token_request(namespace, name, Some(reference))
    }

    fn token_request(
        &self,
        namespace: &str,
        name: &str,
        bound_object_ref: Option<BoundObjectReference>,
    ) -> Result<String> {
        let client = self.client();
        self.block_on(async move {
            let request = TokenRequest {
                spec: Some(TokenRequestSpec {
                    bound_object_ref,
                    expiration_seconds: Some(3600),
                    ..TokenRequestSpec::default()
                }),
                ..TokenRequest::default()
            };
            let response = Api::<ServiceAccount>::namespaced(client, namespace)
                .create_token_request(name, &PostParams::default(), &request)
                .await
                .with_context(|| format!("TokenRequest for ServiceAccount {namespace}/{name}"))?;
            response
                .status
                .and_then(|s| s.token)
                .with_context(|| format!("TokenRequest for {namespace}/{name} returned no token"))
        })
    }

    async fn api_for(&self, value: &Value) -> Result<Api<DynamicObject>> {
        let (group, version) = match value["apiVersion"].as_str().unwrap_or("").split_once('/') {
            Some((group, version)) => (group.to_owned(), version.to_owned()),
            None => (
                String::new(),
                value["apiVersion"].as_str().unwrap_or("").to_owned(),
            ),
        };
        let kind = value["kind"].as_str().unwrap_or("");
        let gvk = GroupVersionKind::gvk(&group, &version, kind);
        let (resource, caps) = discovery::pinned_kind(&self.client, &gvk)
            .await
            .with_context(|| format!("the server does not serve {group}/{version} {kind}"))?;
        Ok(
            match (&caps.scope, value["metadata"]["namespace"].as_str()) {
                (Scope::Namespaced, Some(ns)) => {
                    Api::namespaced_with(self.client.clone(), ns, &resource)
                }
                (Scope::Namespaced, None) => {
                    Api::default_namespaced_with(self.client.clone(), &resource)
                }
                (Scope::Cluster, _) => Api::all_with(self.client.clone(), &resource),
            },
        )
    }

    /// Creates or updates `object` (server-side apply, as admin), then its
    /// `status` when it has one: Node addresses live there.
    pub fn apply(&self, object: &Value) -> Result<()> {
        let name = object["metadata"]["name"]
            .as_str()
            .context("an object without metadata.name")?
            .to_owned();
        self.block_on(async {
            let api = self.api_for(object).await?;
            let params = PatchParams::apply(MANAGER).force();
            api.patch(&name, &params, &Patch::Apply(object))
                .await
                .with_context(|| format!("applying {} {name}", object["kind"]))?;
            if let Some(status) = object.get("status") {
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await
                .with_context(|| format!("writing the status of {} {name}", object["kind"]))?;
            }
            Ok(())
        })
    }

    /// Applies every document of the YAML stream `text` (see [`Self::apply`]).
    pub fn apply_yaml(&self, text: &str) -> Result<()> {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let object = <Value as serde::Deserialize>::deserialize(doc)?;
            if !object.is_null() {
                self.apply(&object)?;
            }
        }
        Ok(())
    }

    /// Deletes an object (as admin).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<()> {
        let mut value =
            json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}});
        if let Some(ns) = namespace {
            value["metadata"]["namespace"] = json!(ns);
        }
        self.block_on(async {
            self.api_for(&value)
                .await?
                .delete(name, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting {kind} {name}"))?;
            Ok(())
        })
    }

    /// The object as JSON, `None` when it does not exist.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>> {
        let mut value =
            json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}});
        if let Some(ns) = namespace {
            value["metadata"]["namespace"] = json!(ns);
        }
        self.block_on(async {
            let object = self.api_for(&value).await?.get_opt(name).await?;
            Ok(object.map(serde_json::to_value).transpose()?)
        })
    }

    /// Makes the server reachable as `127.0.0.1:PORT` inside `netns` (the
    /// agents under test live there): a listener in the namespace whose
    /// connections are relayed to the server. Returns PORT; relaying stops
    /// when the returned guard drops.
    pub fn expose_in(&self, netns: &Netns) -> Result<Relay> {
        netns.ip(&["link", "set", "lo", "up"])?;
        let listener = netns.enter(|| {
            TcpListener::bind("127.0.0.1:0").context("binding the relay in the namespace")
        })?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let target = SocketAddr::from(([127, 0, 0, 1], self.port));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Spawned from a host-namespace thread: the outgoing connections
        // reach the host's loopback, where the server listens.
        thread::Builder::new()
            .name("apiserver-relay".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((inbound, _)) => {
                            let _ = inbound.set_nonblocking(false);
                            // A refused connection (server restarting) just
                            // closes the client's: it retries as it would.
                            if let Ok(outbound) = TcpStream::connect(target) {
                                pipe(inbound, outbound);
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(Relay { port, stop })
    }
}

/// Creates `objects` through `api` with up to `in_flight` requests at a
/// time (a Node's status included: on create the API server keeps it).
pub async fn create_all<K>(
    api: &Api<K>,
    objects: impl IntoIterator<Item = K>,
    in_flight: usize,
) -> Result<()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(objects)
        .map(|object| async move {
            api.create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("creating {} {}", K::kind(&()), object.name_any()))?;
            anyhow::Ok(())
        })
        .buffer_unordered(in_flight)
        .try_collect::<()>()
        .await
}

/// Copies both ways until either side closes, then closes both.
fn pipe(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [
        (a.try_clone(), b.try_clone()),
        (b.try_clone(), a.try_clone()),
    ]
    .into_iter()
    .filter_map(|(f, t)| Some((f.ok()?, t.ok()?)))
    {
        thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// A relay into a network namespace (see [`ApiServer::expose_in`]).
pub struct Relay {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn client_for(runtime: &tokio::runtime::Runtime, kubeconfig: Value) -> Result<Client> {
    let kubeconfig: kube::config::Kubeconfig = serde_json::from_value(kubeconfig)?;
    let config = runtime.block_on(kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    ))?;
    // The client's buffer task runs on this runtime.
    let _guard = runtime.enter();
    Ok(Client::try_from(config)?)
}

fn kubeconfig_value(tools: &Tools, port: u16, user: &User, user_name: &str) -> Value {
    let credentials = match user {
        User::Admin => json!({
            "client-certificate": tools.admin_cert,
            "client-key": tools.admin_key,
        }),
        User::Token(token) => json!({"token": token}),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fabedge-test", "cluster": {
            "server": format!("https://127.0.0.1:{port}"),
            "certificate-authority": tools.ca_cert,
        }}],
        "users": [{"name": user_name, "user": credentials}],
        "contexts": [{"name": "fabedge-test", "context": {"cluster": "fabedge-test", "user": user_name}}],
        "current-context": "fabedge-test",
    })
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Killed, not stopped: nothing of it is kept.
        for child in [&mut self.apiserver, &mut self.etcd] {
            if let Some(mut process) = child.take() {
                let _ = process.kill();
                let _ = process.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
