//! `deploy/` and the agent against a real kube-apiserver and etcd
//! (`fabedge_tests::apiserver`; `cargo xtask setup` builds them once).
//!
//! What the in-test fake (`tests/tests/kube.rs`) cannot prove: the server
//! accepts our manifests and enforces the CRD schema, RBAC grants the agent's
//! ServiceAccount exactly what it uses, and real list/watch semantics drive
//! the agent's maps, also across an API server restart.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fabedge_agent::{
    connector::annotate::{API_CALLS, CallScope},
    model::{annotation, label},
};
use fabedge_tests::{
    apiserver::{ApiServer, User},
    kube_agent::KubeAgent,
};
use futures::StreamExt;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchParams},
    core::{ApiResource, GroupVersionKind},
    discovery,
};
use serde::Deserialize;
use serde_json::{Value, json};

const NAMESPACE: &str = "fabedge";
const SERVICE_ACCOUNT: &str = "fabedge-agent";
/// The agent's identity as the API server sees it.
const AGENT_USER: &str = "system:serviceaccount:fabedge:fabedge-agent";
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mini-cluster.yaml");

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `kubectl apply -k deploy/` as admin, then waits for the CRD to be served.
fn apply_deploy(server: &ApiServer) -> Result<String> {
    let out = server.kubectl(&["apply", "-k", &deploy_dir().display().to_string()])?;
    if !out.status.success() {
        bail!("kubectl apply -k deploy/ failed:\n{}", stderr(&out));
    }
    let established = server.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/communities.fabedge.io",
        "--timeout=60s",
    ])?;
    if !established.status.success() {
        bail!(
            "the Community CRD was not Established:\n{}",
            stderr(&established)
        );
    }
    Ok(stdout(&out))
}

/// The mini cluster's Nodes, Community, Service and EndpointSlice.
fn publish_fixture(server: &ApiServer) -> Result<()> {
    let text = std::fs::read_to_string(FIXTURE)?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let object = Value::deserialize(doc)?;
        if !object.is_null() {
            server.apply(&object)?;
        }
    }
    Ok(())
}

fn edge_node(name: &str, address: &str, pod_cidr: &str) -> Value {
    let mut node = edge_node_without_cidr(name, address);
    node["spec"] = json!({"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]});
    node
}

fn edge_node_without_cidr(name: &str, address: &str) -> Value {
    let octets: Vec<&str> = address.split('.').collect();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {label::EDGE: ""}},
        "spec": {},
        "status": {"addresses": [
            {"type": "InternalIP", "address": address},
            // A public address outside the cluster's ranges (the tunnel endpoint).
            {"type": "ExternalIP", "address": format!("198.18.{}.{}", octets[2], octets[3])},
        ]},
    })
}

fn community(members: &[&str]) -> Value {
    json!({"apiVersion": "fabedge.io/v1alpha1", "kind": "Community", "metadata": {"name": "beijing"},
           "spec": {"members": members}})
}

/// One request the agent made, from the server's audit log.
#[derive(Debug)]
struct Request {
    verb: String,
    group: String,
    resource: String,
    namespace: Option<String>,
    code: i64,
    uri: String,
}

/// The agent's requests so far (each once, whatever its stages).
fn agent_requests(server: &ApiServer) -> Result<Vec<Request>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for event in server.audit()? {
        if event["user"]["username"] != AGENT_USER
            || !seen.insert(event["auditID"].as_str().unwrap_or("").to_owned())
        {
            continue;
        }
        let object = &event["objectRef"];
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        out.push(Request {
            verb: text(&event["verb"]),
            group: text(&object["apiGroup"]),
            resource: text(&object["resource"]),
            namespace: object["namespace"].as_str().map(String::from),
            code: event["responseStatus"]["code"].as_i64().unwrap_or(0),
            uri: text(&event["requestURI"]),
        });
    }
    Ok(out)
}

/// Every request the server saw from the agent is declared in `API_CALLS`
/// (what `deploy/rbac.yaml` grants), in the namespace declared.
fn assert_agent_calls_are_declared(requests: &[Request]) {
    assert!(!requests.is_empty(), "the audit log has no agent request");
    for r in requests {
        let declared = API_CALLS.iter().any(|call| {
            call.group == r.group
                && call.resource == r.resource
                && call.verbs.contains(&r.verb.as_str())
                && namespace_of(call.scope) == r.namespace.as_deref()
        });
        assert!(
            declared,
            "the agent made {} {} ({} {:?} in {:?}), which annotate::API_CALLS does not declare",
            r.verb, r.uri, r.resource, r.group, r.namespace
        );
    }
}

#[test]
fn deploy_applies_the_crd_is_established_and_its_schema_rejects_a_malformed_community() -> Result<()>
{
    let server = ApiServer::start()?;
    let applied = apply_deploy(&server)?;
    for object in [
        "namespace/fabedge created",
        "customresourcedefinition.apiextensions.k8s.io/communities.fabedge.io created",
        "serviceaccount/fabedge-agent created",
        "clusterrole.rbac.authorization.k8s.io/fabedge-agent created",
        "clusterrolebinding.rbac.authorization.k8s.io/fabedge-agent created",
        "role.rbac.authorization.k8s.io/fabedge-agent created",
        "rolebinding.rbac.authorization.k8s.io/fabedge-agent created",
        "daemonset.apps/fabedge-agent created",
        "daemonset.apps/fabedge-connector created",
    ] {
        assert!(
            applied.contains(object),
            "{object} missing from:\n{applied}"
        );
    }
    // Applying again changes nothing.
    let again = apply_deploy(&server)?;
    assert!(
        again.lines().all(|l| l.ends_with(" unchanged")),
        "a second apply changed something:\n{again}"
    );
    // The DaemonSets keep what the agent relies on after the server's defaulting.
    let ds = server
        .get("apps/v1", "DaemonSet", Some(NAMESPACE), "fabedge-connector")?
        .context("the connector DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], SERVICE_ACCOUNT);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(
        pod["containers"][0]["image"],
        "ghcr.io/fabedge/fabedge-agent:latest"
    );

    let dir = server.dir().to_path_buf();
    let kubectl_apply = |name: &str, object: &Value| -> Result<std::process::Output> {
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_string(object)?)?;
        server.kubectl(&["apply", "-f", &file.display().to_string()])
    };

    // A valid Community is stored as written.
    let valid = kubectl_apply("valid", &community(&["edge-1", "edge-2"]))?;
    assert!(valid.status.success(), "{}", stderr(&valid));
    assert_eq!(
        stdout(&valid).trim(),
        "community.fabedge.io/beijing created"
    );
    let stored = server
        .get("fabedge.io/v1alpha1", "Community", None, "beijing")?
        .context("the Community just created")?;
    assert_eq!(stored["spec"]["members"], json!(["edge-1", "edge-2"]));

    // Malformed ones are refused by the server's schema, naming the field.
    let cases = [
        (
            "members-not-a-list",
            json!({"members": "edge-1"}),
            "spec.members: Invalid value: \"string\": spec.members in body must be of type array",
        ),
        (
            "empty-member",
            json!({"members": [""]}),
            "spec.members[0]: Invalid value: \"\": spec.members[0] in body should be at least 1 chars long",
        ),
        (
            "member-not-a-string",
            json!({"members": [7]}),
            "spec.members[0]: Invalid value: \"integer\": spec.members[0] in body must be of type string",
        ),
        (
            "misspelt-field",
            json!({"member": ["edge-1"]}),
            "unknown field \"spec.member\"",
        ),
    ];
    for (name, spec, message) in cases {
        let object = json!({"apiVersion": "fabedge.io/v1alpha1", "kind": "Community",
                            "metadata": {"name": name}, "spec": spec});
        let out = kubectl_apply(name, &object)?;
        assert!(!out.status.success(), "{name} was accepted");
        assert!(
            stderr(&out).contains(message),
            "{name}: expected {message:?} in:\n{}",
            stderr(&out)
        );
        assert!(
            server
                .get("fabedge.io/v1alpha1", "Community", None, name)?
                .is_none(),
            "{name} was stored"
        );
    }
    Ok(())
}

/// The API resource (version, kind, scope) serving `group`'s `plural`.
async fn resource_of(admin: &Client, group: &str, plural: &str) -> Result<ApiResource> {
    let group = discovery::group(admin, group)
        .await
        .with_context(|| format!("API group {group:?}"))?;
    group
        .recommended_resources()
        .into_iter()
        .find(|(r, _)| r.plural == plural)
        .map(|(r, _)| r)
        .with_context(|| format!("the server has no {plural}"))
}

/// Whether `result` was refused by authorization; anything else (success,
/// but also 404 or 422) got past RBAC.
fn forbidden<T>(result: &kube::Result<T>) -> Option<String> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => Some(status.message.clone()),
        _ => None,
    }
}

fn namespace_of(scope: CallScope) -> Option<&'static str> {
    match scope {
        CallScope::Cluster => None,
        CallScope::AgentNamespace => Some(NAMESPACE),
        CallScope::Namespace(namespace) => Some(namespace),
    }
}

/// A body the server accepts for `create` of each kind the agent creates,
/// shaped as the agent's own (an Event about a Node, a Lease).
fn sample(resource: &ApiResource, namespace: &str, name: &str) -> Result<DynamicObject> {
    let object = match resource.kind.as_str() {
        "Lease" => json!({"spec": {"holderIdentity": "cloud-1", "leaseDurationSeconds": 15}}),
        "Event" => json!({
            "involvedObject": {"kind": "Node", "name": "edge-1", "apiVersion": "v1"},
            "reason": "PodCIDRPoolExhausted", "message": "test", "type": "Warning",
        }),
        other => bail!("no sample {other} for create: add one to sample()"),
    };
    let mut value = object;
    value["apiVersion"] = json!(resource.api_version);
    value["kind"] = json!(resource.kind);
    value["metadata"] = json!({"name": name, "namespace": namespace});
    Ok(serde_json::from_value(value)?)
}

/// Makes `verb` on `resource` for real with `client`; `Err` describes a
/// failure. `name` is an existing object for get/update/patch (read by
/// `admin` for update, so that only the update itself is tested).
async fn call(
    client: &Client,
    admin: &Client,
    resource: &ApiResource,
    scope: CallScope,
    verb: &str,
    name: &str,
) -> Result<kube::Result<()>> {
    let api: Api<DynamicObject> = match namespace_of(scope) {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, resource),
        None => Api::all_with(client.clone(), resource),
    };
    let annotate = json!({"metadata": {"annotations": {"fabedge.io/rbac-test": verb}}});
    Ok(match verb {
        "list" => api.list(&ListParams::default().limit(1)).await.map(drop),
        "watch" => match api.watch(&WatchParams::default().timeout(1), "0").await {
            // The first event, or the end of the 1 s watch: either way it was served.
            Ok(stream) => {
                let mut stream = Box::pin(stream);
                match stream.next().await {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(e),
        },
        "get" => api.get(name).await.map(drop),
        "create" => api
            .create(
                &PostParams::default(),
                &sample(resource, namespace_of(scope).unwrap_or_default(), name)?,
            )
            .await
            .map(drop),
        "update" => {
            let mut object = match namespace_of(scope) {
                Some(namespace) => Api::namespaced_with(admin.clone(), namespace, resource),
                None => Api::<DynamicObject>::all_with(admin.clone(), resource),
            }
            .get(name)
            .await
            .with_context(|| format!("{} {name} to update", resource.kind))?;
            object
                .metadata
                .annotations
                .get_or_insert_default()
                .insert("fabedge.io/rbac-test".into(), verb.into());
            api.replace(name, &PostParams::default(), &object)
                .await
                .map(drop)
        }
        "patch" => api
            .patch(name, &PatchParams::default(), &Patch::Merge(annotate))
            .await
            .map(drop),
        "delete" => api.delete(name, &DeleteParams::default()).await.map(drop),
        other => bail!("no way to make a {other:?} call: add one to call()"),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    group: String,
    resource: String,
    verb: String,
}

/// What `client` may do in `namespace`, per the server's own rules review.
async fn rules_of(client: &Client, namespace: &str) -> Result<BTreeSet<Grant>> {
    let review: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "authorization.k8s.io",
            "v1",
            "SelfSubjectRulesReview",
        )),
    );
    let request: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
        "metadata": {}, "spec": {"namespace": namespace},
    }))?;
    let reply = review
        .create(&PostParams::default(), &request)
        .await
        .context("SelfSubjectRulesReview")?;
    let rules = &reply.data["status"]["resourceRules"];
    let mut out = BTreeSet::new();
    for rule in rules.as_array().into_iter().flatten() {
        let list = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    out.insert(Grant {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb,
                    });
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn the_agent_service_account_may_make_exactly_the_calls_the_agent_makes() -> Result<()> {
    let server = ApiServer::start()?;
    apply_deploy(&server)?;
    publish_fixture(&server)?;
    // A ServiceAccount bound to nothing: what every identity may do anyway.
    server.apply(&json!({"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": "nobody", "namespace": NAMESPACE}}))?;
    let token = server.token(NAMESPACE, SERVICE_ACCOUNT, None)?;
    let agent = server.client_as(&User::Token(&token))?;
    let nobody = server.client_as(&User::Token(&server.token(NAMESPACE, "nobody", None)?))?;
    let admin = server.client();

    server.block_on(async {
        // Every call of API_CALLS, made for real with the agent's token.
        // Objects for get/update/patch: edge-1 (a Node) and the Lease created first.
        let existing = |resource: &str| if resource == "nodes" { "edge-1" } else { "rbac-test" };
        let order = ["create", "get", "update", "patch", "list", "watch"];
        let mut made = 0;
        for api_call in API_CALLS {
            let resource = resource_of(&admin, api_call.group, api_call.resource).await?;
            let mut verbs: Vec<&str> = api_call.verbs.to_vec();
            verbs.sort_by_key(|v| order.iter().position(|o| o == v).unwrap_or(order.len()));
            for verb in verbs {
                let result = call(
                    &agent,
                    &admin,
                    &resource,
                    api_call.scope,
                    verb,
                    existing(api_call.resource),
                )
                .await?;
                if let Err(e) = result {
                    bail!(
                        "{verb} {} (group {:?}) with the {SERVICE_ACCOUNT} token failed: {e}",
                        api_call.resource,
                        api_call.group
                    );
                }
                made += 1;
            }
        }
        assert_eq!(
            made,
            API_CALLS.iter().map(|c| c.verbs.len()).sum::<usize>()
        );

        // The server's view of the grants, less what any identity has, is
        // exactly API_CALLS: the namespaced ones only in their namespace.
        for namespace in [NAMESPACE, "default", "kube-system"] {
            let baseline = rules_of(&nobody, namespace).await?;
            let granted: BTreeSet<Grant> = rules_of(&agent, namespace)
                .await?
                .difference(&baseline)
                .cloned()
                .collect();
            let declared: BTreeSet<Grant> = API_CALLS
                .iter()
                .filter(|c| namespace_of(c.scope).is_none_or(|ns| ns == namespace))
                .flat_map(|c| {
                    c.verbs.iter().map(|v| Grant {
                        group: c.group.into(),
                        resource: c.resource.into(),
                        verb: (*v).into(),
                    })
                })
                .collect();
            assert_eq!(granted, declared, "grants in namespace {namespace}");
        }

        // Outside the role: refused by the server, naming the identity.
        let refused = [
            ("", "nodes", "delete", CallScope::Cluster),
            ("", "nodes", "update", CallScope::Cluster),
            ("", "secrets", "get", CallScope::AgentNamespace),
            ("", "secrets", "list", CallScope::Cluster),
            ("", "pods", "patch", CallScope::AgentNamespace),
            ("apps", "daemonsets", "delete", CallScope::AgentNamespace),
            ("fabedge.io", "communities", "patch", CallScope::Cluster),
            ("coordination.k8s.io", "leases", "delete", CallScope::AgentNamespace),
            // Events only where the agent records them.
            ("", "events", "create", CallScope::AgentNamespace),
        ];
        for (group, plural, verb, scope) in refused {
            let resource = resource_of(&admin, group, plural).await?;
            let name = match plural {
                "nodes" => "edge-1",
                "daemonsets" => "fabedge-agent",
                "communities" => "beijing",
                _ => "rbac-test",
            };
            let result = call(&agent, &admin, &resource, scope, verb, name).await?;
            let message = forbidden(&result)
                .with_context(|| format!("{verb} {plural} was not refused: {result:?}"))?;
            assert!(
                message.contains(&format!(
                    "User \"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}\" cannot {verb} resource \"{plural}\""
                )),
                "{verb} {plural}: {message}"
            );
        }
        // The Lease in another namespace is out of reach too.
        let leases = resource_of(&admin, "coordination.k8s.io", "leases").await?;
        let elsewhere: Api<DynamicObject> =
            Api::namespaced_with(agent.clone(), "kube-system", &leases);
        let result = elsewhere.list(&ListParams::default()).await;
        assert!(forbidden(&result).is_some(), "{result:?}");
        Ok::<_, anyhow::Error>(())
    })?;

    // A token bound to a Node (as the agents' are) stops working when the
    // Node is deleted (after the server's short cache of valid tokens).
    let bound = server.token(NAMESPACE, SERVICE_ACCOUNT, Some("edge-3"))?;
    let bound = server.client_as(&User::Token(&bound))?;
    let list_nodes = || {
        server.block_on(
            Api::<k8s_openapi::api::core::v1::Node>::all(bound.clone())
                .list(&ListParams::default().limit(1)),
        )
    };
    list_nodes().context("listing Nodes with a token bound to edge-3")?;
    server.delete("v1", "Node", None, "edge-3")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match list_nodes() {
            Err(kube::Error::Api(status)) if status.code == 401 => break,
            other if Instant::now() > deadline => {
                bail!("the token outlived its Node: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The real agent binary on its ServiceAccount token, in a throwaway network
// namespace that reaches the server through a relay on the namespace's
// loopback; the maps are read with `fabedge-agent inspect ... --json`.

/// `node`'s agent on a token bound to that Node object, reaching the server
/// through a relay on its namespace's loopback.
fn edge_agent(name: &str, server: &ApiServer, node: &str) -> Result<KubeAgent> {
    let mut agent = KubeAgent::new(name)?;
    agent.node = node.into();
    agent.extra_args = vec!["--namespace".into(), NAMESPACE.into()];
    let relay = server.expose_in(&agent.netns)?;
    let token = server.token(NAMESPACE, SERVICE_ACCOUNT, Some(node))?;
    server.write_kubeconfig(&agent.kubeconfig(), &User::Token(&token), Some(relay.port))?;
    agent.hold(relay);
    Ok(agent)
}

/// The Service map's frontends (`ip:port/PROTO`) and their backends.
fn frontends(agent: &KubeAgent) -> Result<BTreeMap<String, Value>> {
    Ok(agent
        .inspect("services")?
        .iter()
        .map(|s| {
            (
                s["frontend"].as_str().unwrap_or("?").to_owned(),
                s["backends"].clone(),
            )
        })
        .collect())
}

#[test]
fn an_agent_on_a_node_bound_token_follows_node_community_and_service_edits() -> Result<()> {
    let server = ApiServer::start()?;
    apply_deploy(&server)?;
    publish_fixture(&server)?;
    let mut agent = edge_agent("api-edits", &server, "edge-1")?;
    agent.start()?;
    // edge-2 is a community peer: its pod CIDR goes straight to its endpoint.
    agent.wait_routes("edge-2's pod CIDR", |r| r.contains_key("10.234.2.0/24"))?;

    // Added: a new community member gets a direct tunnel route.
    server.apply(&edge_node("edge-9", "10.2.0.19", "10.234.9.0/24"))?;
    server.apply(&community(&["edge-1", "edge-2", "edge-9"]))?;
    agent.wait_routes("edge-9's pod CIDR via its endpoint", |r| {
        r.get("10.234.9.0/24")
            .is_some_and(|hop| hop.contains("198.18.0.19"))
    })?;
    // Changed: edge-9 moves to another public address (a status update).
    server.apply(&edge_node("edge-9", "10.2.0.29", "10.234.9.0/24"))?;
    agent.wait_routes("edge-9's new endpoint", |r| {
        r.get("10.234.9.0/24")
            .is_some_and(|hop| hop.contains("198.18.0.29"))
    })?;
    // Removed.
    server.delete("v1", "Node", None, "edge-9")?;
    agent.wait_routes("edge-9 gone", |r| !r.contains_key("10.234.9.0/24"))?;

    // A Service port edit reaches the Service map.
    let before = agent.wait("the dns Service frontends", |a| {
        let f = frontends(a)?;
        Ok((!f.is_empty()).then_some(f))
    })?;
    assert_eq!(
        before.get("10.96.0.10:53/UDP"),
        Some(&json!(["10.234.1.10:53"])),
        "{before:#?}"
    );
    let mut dns = server
        .get("v1", "Service", Some("kube-system"), "dns")?
        .context("the dns Service")?;
    dns["spec"]["ports"][0]["port"] = json!(5353);
    for key in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
    ] {
        dns["metadata"].as_object_mut().unwrap().remove(key);
    }
    dns.as_object_mut().unwrap().remove("status");
    server.apply(&dns)?;
    agent.wait("10.96.0.10:5353 in the Service map, :53/UDP gone", |a| {
        let f = frontends(a)?;
        Ok(
            (f.contains_key("10.96.0.10:5353/UDP") && !f.contains_key("10.96.0.10:53/UDP"))
                .then_some(()),
        )
    })?;
    assert!(
        !agent.log().contains("ERROR fabedge_agent"),
        "every apply succeeded:\n{}",
        agent.log()
    );
    // What the server saw: only declared calls, none refused.
    let requests = agent_requests(&server)?;
    assert_agent_calls_are_declared(&requests);
    let refused: Vec<&Request> = requests.iter().filter(|r| r.code == 403).collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    Ok(())
}

#[test]
fn an_apiserver_restart_keeps_the_maps_and_the_agent_relists_and_reconciles() -> Result<()> {
    let mut server = ApiServer::start()?;
    apply_deploy(&server)?;
    publish_fixture(&server)?;
    let mut agent = edge_agent("api-restart", &server, "edge-1")?;
    agent.start()?;
    let online = agent.wait_routes("the first plan", |r| r.contains_key("10.234.2.0/24"))?;
    // The maps fill before the apply is logged.
    let applies = agent.wait("the first apply logged", |a| {
        Ok(Some(a.applies()).filter(|n| *n > 0))
    })?;

    let node_lists = |server: &ApiServer| -> Result<usize> {
        Ok(agent_requests(server)?
            .iter()
            .filter(|r| r.verb == "list" && r.resource == "nodes")
            .count())
    };
    let lists_before = node_lists(&server)?;

    // Down: every watch breaks; the datapath stays as it was.
    server.stop_apiserver();
    agent.wait("the broken watches noticed", |a| {
        Ok(a.log().contains("watch of Node failed").then_some(()))
    })?;
    assert_eq!(
        agent.routes()?,
        online,
        "unchanged while the API server is down"
    );
    // etcd moves on meanwhile: the restarted server's watch cache starts
    // after every resource version the agent holds, so the agent must relist.
    server.bump_etcd_revision()?;

    // Back: the agent relists (nothing changed, so nothing is written), and
    // the next edit reaches the maps. A starting server refuses requests
    // (403) until its RBAC caches fill: the agent keeps its state through
    // that too.
    server.start_apiserver()?;
    agent.wait("the Node watch resumed", |a| {
        Ok(a.log().contains("watch of Node resumed").then_some(()))
    })?;
    let relisted = agent.wait("the agent's relist of Nodes", |_| {
        let lists = node_lists(&server)?;
        Ok((lists > lists_before).then_some(lists))
    })?;
    assert!(relisted > lists_before);
    assert_eq!(agent.routes()?, online);
    assert_eq!(
        agent.applies(),
        applies,
        "no map write for an unchanged cluster:\n{}",
        agent.log()
    );
    server.apply(&edge_node("edge-9", "10.2.0.19", "10.234.9.0/24"))?;
    server.apply(&community(&["edge-1", "edge-2", "edge-9"]))?;
    agent.wait_routes("edge-9 after the restart", |r| {
        r.get("10.234.9.0/24")
            .is_some_and(|hop| hop.contains("198.18.0.19"))
    })?;
    assert!(
        !agent.log().contains("ERROR fabedge_agent"),
        "{}",
        agent.log()
    );
    Ok(())
}

#[test]
fn a_connector_agent_on_its_token_leads_annotates_edge_nodes_and_records_an_exhausted_pool()
-> Result<()> {
    let server = ApiServer::start()?;
    apply_deploy(&server)?;
    publish_fixture(&server)?;
    let mut agent = edge_agent("api-conn", &server, "cloud-1")?;
    // cloud-1's uplink (its InternalIP) and Flannel's VXLAN device with the
    // MAC cloud-1's lease announces.
    let ns = &agent.netns;
    ns.ip(&["link", "set", "eth0", "down"])?;
    ns.ip(&["addr", "flush", "dev", "eth0"])?;
    ns.add_addr("eth0", "10.1.0.1/24")?;
    ns.set_up("eth0")?;
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "address",
        "ce:0c:01:00:00:01",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        "eth0",
    ])?;
    ns.set_up("flannel.1")?;
    agent.extra_args.extend(
        [
            "--uplink",
            "eth0",
            "--lease-duration",
            "3s",
            "--lease-renew-interval",
            "500ms",
            // Two /25 blocks for three edge Nodes without spec.podCIDR.
            "--edge-pod-cidr-pool",
            "10.250.0.0/24",
            "--edge-pod-cidr-size",
            "25",
        ]
        .map(String::from),
    );
    for (i, name) in ["edge-a", "edge-b", "edge-c"].iter().enumerate() {
        server.apply(&edge_node_without_cidr(name, &format!("10.2.1.{}", i + 1)))?;
    }
    agent.start()?;

    // It took the Lease, and the server holds its annotations on every
    // edge Node (and on no other).
    let annotations = |node: &str| -> Result<BTreeMap<String, String>> {
        let object = server.get("v1", "Node", None, node)?.context("the Node")?;
        Ok(serde_json::from_value(object["metadata"]["annotations"].clone()).unwrap_or_default())
    };
    let cloud_before: Vec<(&str, BTreeMap<String, String>)> = ["cloud-1", "cloud-2"]
        .into_iter()
        .map(|n| Ok((n, annotations(n)?)))
        .collect::<Result<_>>()?;
    let edges = ["edge-1", "edge-2", "edge-3", "edge-a", "edge-b", "edge-c"];
    agent.wait("the Lease held and every edge Node annotated", |_| {
        let lease = server.get(
            "coordination.k8s.io/v1",
            "Lease",
            Some(NAMESPACE),
            "fabedge-connector",
        )?;
        let holder = lease.map(|l| l["spec"]["holderIdentity"].clone());
        let mut annotated = true;
        for node in edges {
            annotated &= annotations(node)?
                .get(annotation::FLANNEL_PUBLIC_IP)
                .is_some_and(|ip| ip == "10.1.0.1");
        }
        Ok((holder == Some(json!("cloud-1")) && annotated).then_some(()))
    })?;
    for (node, before) in &cloud_before {
        assert_eq!(
            &annotations(node)?,
            before,
            "{node} is not an edge Node: left as Flannel wrote it"
        );
    }

    // Two of the three got a block of the pool; the third is named in a
    // Warning Event the server accepted.
    let blocks: BTreeSet<String> = ["edge-a", "edge-b", "edge-c"]
        .iter()
        .filter_map(|n| annotations(n).ok()?.get(annotation::POD_CIDR).cloned())
        .collect();
    assert_eq!(
        blocks,
        ["10.250.0.0/25", "10.250.0.128/25"]
            .map(String::from)
            .into(),
        "{}",
        agent.log()
    );
    let client = server.client();
    let event = agent.wait("the PodCIDRPoolExhausted Event in default", |_| {
        let events = server.block_on(
            Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), "default")
                .list(&ListParams::default()),
        )?;
        Ok(events
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("PodCIDRPoolExhausted")))
    })?;
    assert_eq!(event.involved_object.kind.as_deref(), Some("Node"));
    assert_eq!(event.involved_object.name.as_deref(), Some("edge-c"));
    assert!(!annotations("edge-c")?.contains_key(annotation::POD_CIDR));

    // SIGTERM releases the Lease for the next connector.
    agent.stop();
    let lease = server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some(NAMESPACE),
            "fabedge-connector",
        )?
        .context("the Lease")?;
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "released on SIGTERM: {lease:#}\n{}",
        agent.log()
    );
    // The exhausted pool is the one error, and it is logged (an Event
    // refused by the server would be another).
    let log = agent.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR"))
        .filter(|l| !l.contains("edge pod CIDR pool 10.250.0.0/24 in /25 blocks (2 blocks) is exhausted: node edge-c"))
        .collect();
    assert!(errors.is_empty(), "{log}");
    // Its Lease, patch and Event calls were all declared, none refused.
    let requests = agent_requests(&server)?;
    assert_agent_calls_are_declared(&requests);
    for verb in ["patch", "create", "update", "get"] {
        assert!(
            requests.iter().any(|r| r.verb == verb),
            "no {verb} seen: {requests:#?}"
        );
    }
    let refused: Vec<&Request> = requests.iter().filter(|r| r.code == 403).collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    Ok(())
}
