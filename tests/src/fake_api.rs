//! An in-test Kubernetes API server: enough of the list/watch protocol for
//! kube-rs's watcher and client, over plain HTTP/1.1 on a loopback port.
//!
//! - `GET` a collection: a `…List` with `metadata.resourceVersion`.
//! - `GET …?watch=true&resourceVersion=N`: a chunked stream of JSON lines
//!   (`ADDED`/`MODIFIED`/`DELETED` since N, then a `BOOKMARK`, then live
//!   changes); a watch from a version older than the last
//!   [`FakeApi::expire_watches`] gets an `ERROR` event carrying a 410 Status,
//!   which is how the API server says "relist".
//! - `GET`/`POST`/`PUT` of single objects with optimistic concurrency (`PUT`
//!   with a stale `metadata.resourceVersion` is a 409), `PATCH` with
//!   `application/merge-patch+json` (anything else is a 415), `DELETE`.
//! - [`FakeApi::set_down`]: every connection is dropped at once, open watches end.
//!
//! Every request is recorded ([`FakeApi::requests`]) so tests can assert on
//! what the agent sent. One request per connection (`Connection: close`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::netns::Netns;

/// A collection: API group ("" for core), version, plural resource name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource {
    pub group: String,
    pub version: String,
    pub plural: String,
}

impl Resource {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn kind(&self) -> &'static str {
        match self.plural.as_str() {
            "nodes" => "Node",
            "services" => "Service",
            "endpointslices" => "EndpointSlice",
            "communities" => "Community",
            "leases" => "Lease",
            "events" => "Event",
            _ => "Unknown",
        }
    }

    /// The collection an object of `apiVersion`/`kind` lives in.
    pub fn of(api_version: &str, kind: &str) -> Result<Resource> {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let plural = match kind {
            "Node" => "nodes",
            "Service" => "services",
            "EndpointSlice" => "endpointslices",
            "Community" => "communities",
            "Lease" => "leases",
            "Event" => "events",
            other => bail!("the fake API server does not serve kind {other}"),
        };
        Ok(Resource {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
        })
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
    /// Parsed from the path.
    pub resource: Option<Resource>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Request {
    /// The RBAC verb this request needs.
    pub fn verb(&self) -> &'static str {
        match (self.method.as_str(), self.name.is_some()) {
            ("GET", false)
                if self
                    .query
                    .get("watch")
                    .is_some_and(|w| w == "true" || w == "1") =>
            {
                "watch"
            }
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => "unknown",
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Resource, BTreeMap<String, Value>>,
    /// (resourceVersion, collection, event type, object), oldest first.
    history: Vec<(u64, Resource, &'static str, Value)>,
    /// Watches from a version below this get 410 Gone.
    oldest_watchable: u64,
    down: bool,
    /// Bumped to end every open watch.
    generation: u64,
    requests: Vec<Request>,
}

/// The running fake API server (its own thread and runtime); stops when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<watch::Sender<u64>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or_default())
}

impl FakeApi {
    /// Listens on 127.0.0.1 in the test's own network namespace.
    pub fn start() -> Result<FakeApi> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the fake API server")?;
        Self::serve(listener)
    }

    /// Listens on 127.0.0.1 inside `netns`, for an agent running there.
    pub fn start_in(netns: &Netns) -> Result<FakeApi> {
        netns.ip(&["link", "set", "lo", "up"])?;
        let listener = netns.enter(|| {
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the fake API server")
        })?;
        Self::serve(listener)
    }

    fn serve(listener: std::net::TcpListener) -> Result<FakeApi> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            ..State::default()
        }));
        let (changed, _) = watch::channel(0u64);
        let changed = Arc::new(changed);
        let (shutdown, mut stop) = tokio::sync::oneshot::channel::<()>();
        let (st, ch) = (state.clone(), changed.clone());
        let thread = thread::Builder::new()
            .name("fake-api".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                runtime.block_on(async move {
                    let listener =
                        TcpListener::from_std(listener).expect("registering the listener");
                    loop {
                        tokio::select! {
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let (st, ch) = (st.clone(), ch.clone());
                                tokio::spawn(async move {
                                    let _ = handle(stream, st, ch).await;
                                });
                            }
                            _ = &mut stop => break,
                        }
                    }
                });
            })
            .context("starting the fake API server thread")?;
        Ok(FakeApi {
            addr,
            state,
            changed,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig naming this server, for `fabedge-agent run --kubeconfig`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates or replaces an object (found by its apiVersion, kind,
    /// namespace and name), as a controller would; watchers see it.
    pub fn apply(&self, object: &Value) -> Result<()> {
        let resource = Resource::of(
            object["apiVersion"]
                .as_str()
                .context("object without apiVersion")?,
            object["kind"].as_str().context("object without kind")?,
        )?;
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?
            .to_owned();
        let mut state = self.lock();
        store(
            &mut state,
            &resource,
            namespace.as_deref(),
            &name,
            object.clone(),
        );
        drop(state);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Deletes an object; watchers see a DELETED event.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<()> {
        let resource = Resource::of(api_version, kind)?;
        let mut state = self.lock();
        remove(&mut state, &resource, namespace, name)
            .with_context(|| format!("no {kind} {name} to delete"))?;
        drop(state);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The object as stored now.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let resource = Resource::of(api_version, kind).ok()?;
        self.lock()
            .objects
            .get(&resource)?
            .get(&key(namespace, name))
            .cloned()
    }

    /// Every object of a kind.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Ok(resource) = Resource::of(api_version, kind) else {
            return Vec::new();
        };
        self.lock()
            .objects
            .get(&resource)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Ends every open watch and makes the versions they knew too old: their
    /// next watch gets 410 Gone and they must relist.
    pub fn expire_watches(&self) {
        let mut state = self.lock();
        state.oldest_watchable = state.rv + 1;
        state.rv += 1;
        state.generation += 1;
        drop(state);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Unreachable (`true`): connections are dropped unanswered and open watches end.
    pub fn set_down(&self, down: bool) {
        let mut state = self.lock();
        state.down = down;
        state.generation += 1;
        drop(state);
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Waits until `check` holds for the recorded requests.
    pub fn wait_for_requests(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Request]) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check(&self.lock().requests) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("the fake API server did not see {what} within {timeout:?}")
    }
}

fn store(
    state: &mut State,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
    mut object: Value,
) -> Value {
    state.rv += 1;
    let rv = state.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    if object["metadata"]["uid"].is_null() {
        object["metadata"]["uid"] = json!(format!("uid-{rv}"));
    }
    object["apiVersion"] = json!(resource.api_version());
    object["kind"] = json!(resource.kind());
    let existed = state
        .objects
        .entry(resource.clone())
        .or_default()
        .insert(key(namespace, name), object.clone())
        .is_some();
    state.history.push((
        rv,
        resource.clone(),
        if existed { "MODIFIED" } else { "ADDED" },
        object.clone(),
    ));
    object
}

fn remove(
    state: &mut State,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
) -> Option<Value> {
    let mut object = state
        .objects
        .get_mut(resource)?
        .remove(&key(namespace, name))?;
    state.rv += 1;
    object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
    state
        .history
        .push((state.rv, resource.clone(), "DELETED", object.clone()));
    Some(object)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("made an object");
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// Splits `/api/v1/...` or `/apis/G/V/...` into collection, namespace and name.
fn route(path: &str) -> Option<(Resource, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some(name.to_string())),
        _ => return None,
    };
    Some((
        Resource {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
        },
        namespace,
        name,
    ))
}

async fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = serde_json::to_vec(body).expect("JSON values serialise");
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if code < 300 { "OK" } else { "Error" },
        text.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&text).await?;
    stream.flush().await
}

async fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(line).expect("JSON values serialise");
    text.push(b'\n');
    stream
        .write_all(format!("{:x}\r\n", text.len()).as_bytes())
        .await?;
    stream.write_all(&text).await?;
    stream.write_all(b"\r\n").await?;
    stream.flush().await
}

async fn read_request(
    stream: &mut TcpStream,
) -> std::io::Result<Option<(String, String, Vec<(String, String)>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&byte[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_owned();
    let target = first.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&byte[..n]);
    }
    Ok(Some((method, target, headers, body)))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    mut stream: TcpStream,
    state: Arc<Mutex<State>>,
    changed: Arc<watch::Sender<u64>>,
) -> std::io::Result<()> {
    if state.lock().unwrap_or_else(PoisonError::into_inner).down {
        return Ok(()); // dropped unanswered
    }
    let Some((method, target, headers, body)) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let (path, query_text) = target.split_once('?').unwrap_or((&target, ""));
    let query: BTreeMap<String, String> = query_text
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone());
    let body_json: Option<Value> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).ok()
    };
    let routed = route(path);
    let request = Request {
        method: method.clone(),
        path: path.to_owned(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: body_json.clone(),
        resource: routed.as_ref().map(|r| r.0.clone()),
        namespace: routed.as_ref().and_then(|r| r.1.clone()),
        name: routed.as_ref().and_then(|r| r.2.clone()),
    };
    let verb = request.verb();
    state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .requests
        .push(request);
    let Some((resource, namespace, name)) = routed else {
        return respond(
            &mut stream,
            404,
            &status(404, "NotFound", &format!("no route {path}")),
        )
        .await;
    };
    let ns = namespace.as_deref();

    if verb == "watch" {
        return watch_stream(
            stream,
            state,
            changed,
            resource,
            ns.map(str::to_owned),
            &query,
        )
        .await;
    }
    let (code, reply) = {
        let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
        let st = &mut *st;
        match (verb, name.as_deref()) {
            ("list", _) => {
                let items: Vec<Value> = st
                    .objects
                    .get(&resource)
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| ns.is_none_or(|ns| k.starts_with(&format!("{ns}/"))))
                            .map(|(_, v)| v.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    200,
                    json!({"apiVersion": resource.api_version(), "kind": format!("{}List", resource.kind()),
                           "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                )
            }
            ("get", Some(name)) => match st
                .objects
                .get(&resource)
                .and_then(|m| m.get(&key(ns, name)))
            {
                Some(object) => (200, object.clone()),
                None => (
                    404,
                    status(
                        404,
                        "NotFound",
                        &format!("{} {name} not found", resource.plural),
                    ),
                ),
            },
            ("create", None) => {
                let mut object = body_json.unwrap_or(json!({}));
                let name = match object["metadata"]["name"].as_str() {
                    Some(n) => n.to_owned(),
                    None => {
                        let prefix = object["metadata"]["generateName"]
                            .as_str()
                            .unwrap_or("object-")
                            .to_owned();
                        let generated = format!("{prefix}{}", st.rv + 1);
                        object["metadata"]["name"] = json!(generated.clone());
                        generated
                    }
                };
                if let Some(ns) = ns {
                    object["metadata"]["namespace"] = json!(ns);
                }
                if st
                    .objects
                    .get(&resource)
                    .is_some_and(|m| m.contains_key(&key(ns, &name)))
                {
                    (
                        409,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("{} {name} already exists", resource.plural),
                        ),
                    )
                } else {
                    (201, store(st, &resource, ns, &name, object))
                }
            }
            ("update", Some(name)) => {
                let object = body_json.unwrap_or(json!({}));
                let current = st
                    .objects
                    .get(&resource)
                    .and_then(|m| m.get(&key(ns, name)))
                    .cloned();
                match current {
                    None => (
                        404,
                        status(
                            404,
                            "NotFound",
                            &format!("{} {name} not found", resource.plural),
                        ),
                    ),
                    Some(current)
                        if object["metadata"]["resourceVersion"].is_string()
                            && object["metadata"]["resourceVersion"]
                                != current["metadata"]["resourceVersion"] =>
                    {
                        (
                            409,
                            status(
                                409,
                                "Conflict",
                                "the object has been modified; please apply your changes to the latest version",
                            ),
                        )
                    }
                    Some(_) => (200, store(st, &resource, ns, name, object)),
                }
            }
            ("patch", Some(name)) => {
                if content_type.as_deref() != Some("application/merge-patch+json") {
                    (
                        415,
                        status(
                            415,
                            "UnsupportedMediaType",
                            "the fake API server takes merge patches only",
                        ),
                    )
                } else {
                    match st
                        .objects
                        .get(&resource)
                        .and_then(|m| m.get(&key(ns, name)))
                        .cloned()
                    {
                        None => (
                            404,
                            status(
                                404,
                                "NotFound",
                                &format!("{} {name} not found", resource.plural),
                            ),
                        ),
                        Some(mut object) => {
                            merge(&mut object, &body_json.unwrap_or(json!({})));
                            (200, store(st, &resource, ns, name, object))
                        }
                    }
                }
            }
            ("delete", Some(name)) => match remove(st, &resource, ns, name) {
                Some(object) => (200, object),
                None => (
                    404,
                    status(
                        404,
                        "NotFound",
                        &format!("{} {name} not found", resource.plural),
                    ),
                ),
            },
            _ => (
                405,
                status(405, "MethodNotAllowed", &format!("{method} {path}")),
            ),
        }
    };
    if code < 300 && verb != "list" && verb != "get" {
        changed.send_modify(|n| *n += 1);
    }
    respond(&mut stream, code, &reply).await
}

async fn watch_stream(
    mut stream: TcpStream,
    state: Arc<Mutex<State>>,
    changed: Arc<watch::Sender<u64>>,
    resource: Resource,
    namespace: Option<String>,
    query: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut notified = changed.subscribe();
    let (generation, expired) = {
        let st = state.lock().unwrap_or_else(PoisonError::into_inner);
        (st.generation, from < st.oldest_watchable)
    };
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await?;
    if expired {
        let gone = status(410, "Expired", &format!("too old resource version: {from}"));
        chunk(&mut stream, &json!({"type": "ERROR", "object": gone})).await?;
        return stream.write_all(b"0\r\n\r\n").await;
    }
    let mut bookmarked = false;
    loop {
        let (events, current_rv, ended) = {
            let st = state.lock().unwrap_or_else(PoisonError::into_inner);
            let events: Vec<(u64, &'static str, Value)> = st
                .history
                .iter()
                .filter(|(rv, r, _, o)| {
                    *rv > from
                        && *r == resource
                        && namespace
                            .as_deref()
                            .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
                })
                .map(|(rv, _, t, o)| (*rv, *t, o.clone()))
                .collect();
            (events, st.rv, st.generation != generation || st.down)
        };
        if ended {
            return stream.write_all(b"0\r\n\r\n").await;
        }
        for (rv, kind, object) in events {
            chunk(&mut stream, &json!({"type": kind, "object": object})).await?;
            from = rv;
        }
        if !bookmarked {
            from = from.max(current_rv);
            let mark = json!({"type": "BOOKMARK", "object": {"apiVersion": resource.api_version(),
                              "kind": resource.kind(), "metadata": {"resourceVersion": from.to_string()}}});
            chunk(&mut stream, &mark).await?;
            bookmarked = true;
        }
        if notified.changed().await.is_err() {
            return Ok(());
        }
    }
}
