//! `deploy/` and the agent against a real kube-apiserver and etcd
//! (`fabedge_tests::apiserver`; `cargo xtask setup` builds them once).
//!
//! What the in-test fake (`tests/tests/kube.rs`) cannot prove: the server
//! accepts our manifests and enforces the CRD schema, RBAC grants each
//! agent's ServiceAccount exactly what it uses, the node policy confines
//! every agent's Node writes to its own node and role (per-node identity),
//! and real list/watch semantics drive the agent's maps, also across an
//! API server restart.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fabedge_agent::{
    connector::annotate::{API_CALLS, Account, CallScope, merge_patch},
    esp::keys::{
        ESP_ENDPOINT_ANNOTATION, KEY_GENERATION_ANNOTATION, KEY_NONCE_ANNOTATION,
        PUBLIC_KEY_ANNOTATION,
    },
    model::{AnnotationPatch, annotation, label},
};
use fabedge_tests::{
    apiserver::{ApiServer, User},
    kube_agent::KubeAgent,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchParams},
    core::{ApiResource, GroupVersionKind},
    discovery,
};
use serde_json::{Value, json};

const NAMESPACE: &str = "fabedge";
/// How the server prefixes a refusal by deploy/node-policy.yaml.
const NODE_POLICY: &str = "ValidatingAdmissionPolicy 'fabedge-node-writes' with binding 'fabedge-node-writes' denied request: ";

/// An account's identity as the API server sees it.
fn user_of(account: Account) -> String {
    format!(
        "system:serviceaccount:{NAMESPACE}:{}",
        account.service_account()
    )
}
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
    server.apply_yaml(&std::fs::read_to_string(FIXTURE)?)
}

/// `deploy/` and the mini cluster, once the node policy is enforced.
fn deploy_with_fixture(server: &ApiServer) -> Result<()> {
    apply_deploy(server)?;
    publish_fixture(server)?;
    wait_for_node_policy(server)
}

/// Waits until the server enforces `deploy/node-policy.yaml` (its admission
/// plugin loads a new policy a moment after it is created): a dry-run write
/// with a token bound to no node is refused by the policy.
fn wait_for_node_policy(server: &ApiServer) -> Result<()> {
    let client = client_of(server, Account::Agent.service_account(), None)?;
    let probe = json!({"metadata": {"annotations": {"fabedge.io/policy-probe": "1"}}});
    let params = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let result = server.block_on(Api::<Node>::all(client.clone()).patch(
            "edge-1",
            &params,
            &Patch::Merge(&probe),
        ));
        match result {
            Err(kube::Error::Api(status)) if status.message.contains(NODE_POLICY) => return Ok(()),
            other if Instant::now() > deadline => {
                bail!("the node policy was not enforced within 60 s: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
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

/// The requests of agents on `account` so far (each once, whatever its
/// stages). Dry runs are left out: the agent makes none, they are the
/// tests' probes of the node policy ([`wait_for_node_policy`]).
fn agent_requests(server: &ApiServer, account: Account) -> Result<Vec<Request>> {
    let user = user_of(account);
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for event in server.audit()? {
        if event["user"]["username"] != user.as_str()
            || event["requestURI"]
                .as_str()
                .is_some_and(|uri| uri.contains("dryRun="))
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

/// Every request the server saw from an agent on `account` is one of the
/// account's calls (what `deploy/rbac.yaml` grants it), in the namespace
/// declared.
fn assert_agent_calls_are_declared(requests: &[Request], account: Account) {
    assert!(!requests.is_empty(), "the audit log has no agent request");
    for r in requests {
        let declared = account.calls().any(|call| {
            call.group == r.group
                && call.resource == r.resource
                && call.verbs.contains(&r.verb.as_str())
                && namespace_of(call.scope) == r.namespace.as_deref()
        });
        assert!(
            declared,
            "the agent made {} {} ({} {:?} in {:?}), which annotate::API_CALLS does not declare for {account:?}",
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
        "serviceaccount/fabedge-connector created",
        "clusterrole.rbac.authorization.k8s.io/fabedge-agent created",
        "clusterrolebinding.rbac.authorization.k8s.io/fabedge-agent created",
        "role.rbac.authorization.k8s.io/fabedge-connector created",
        "rolebinding.rbac.authorization.k8s.io/fabedge-connector created",
        "role.rbac.authorization.k8s.io/fabedge-connector-events created",
        "rolebinding.rbac.authorization.k8s.io/fabedge-connector-events created",
        "validatingadmissionpolicy.admissionregistration.k8s.io/fabedge-node-writes created",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/fabedge-node-writes created",
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
    // The DaemonSets keep what the agent relies on after the server's
    // defaulting, each with its role's ServiceAccount.
    for (name, account) in [
        ("fabedge-agent", Account::Agent),
        ("fabedge-connector", Account::Connector),
    ] {
        let ds = server
            .get("apps/v1", "DaemonSet", Some(NAMESPACE), name)?
            .with_context(|| format!("the DaemonSet {name}"))?;
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(
            pod["serviceAccountName"],
            account.service_account(),
            "{name}"
        );
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(
            pod["containers"][0]["image"],
            "ghcr.io/fabedge/fabedge-agent:latest"
        );
    }

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

/// The Node an account's token is bound to in the RBAC test (its own Node:
/// the only one whose annotations it may patch as every agent does).
fn home_of(account: Account) -> &'static str {
    match account {
        Account::Agent => "edge-1",
        Account::Connector => "cloud-1",
    }
}

#[test]
fn each_service_account_may_make_exactly_the_calls_its_agents_make() -> Result<()> {
    let server = ApiServer::start()?;
    deploy_with_fixture(&server)?;
    // A ServiceAccount bound to nothing: what every identity may do anyway.
    server.apply(&json!({"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": "nobody", "namespace": NAMESPACE}}))?;
    let nobody = client_of(&server, "nobody", None)?;
    let admin = server.client();
    // The connector first: the agent's refused Lease update needs the Lease
    // the connector's calls create.
    for account in [Account::Connector, Account::Agent] {
        let service_account = account.service_account();
        let home = home_of(account);
        let agent = client_of(&server, service_account, Some(home))?;
        server.block_on(async {
            // Every call of the account, made for real with its token.
            // Objects for get/update/patch: its own Node and the Lease created first.
            let existing = |resource: &str| if resource == "nodes" { home } else { "rbac-test" };
            let order = ["create", "get", "update", "patch", "list", "watch"];
            let mut made = 0;
            for api_call in account.calls() {
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
                            "{verb} {} (group {:?}) with the {service_account} token failed: {e}",
                            api_call.resource,
                            api_call.group
                        );
                    }
                    made += 1;
                }
            }
            assert_eq!(
                made,
                account.calls().map(|c| c.verbs.len()).sum::<usize>(),
                "{account:?}"
            );

            // The server's view of the grants, less what any identity has, is
            // exactly the account's calls: the namespaced ones only in their namespace.
            for namespace in [NAMESPACE, "default", "kube-system"] {
                let baseline = rules_of(&nobody, namespace).await?;
                let granted: BTreeSet<Grant> = rules_of(&agent, namespace)
                    .await?
                    .difference(&baseline)
                    .cloned()
                    .collect();
                let declared: BTreeSet<Grant> = account
                    .calls()
                    .filter(|c| namespace_of(c.scope).is_none_or(|ns| ns == namespace))
                    .flat_map(|c| {
                        c.verbs.iter().map(|v| Grant {
                            group: c.group.into(),
                            resource: c.resource.into(),
                            verb: (*v).into(),
                        })
                    })
                    .collect();
                assert_eq!(
                    granted, declared,
                    "grants of {service_account} in namespace {namespace}"
                );
            }

            // Outside the role: refused by the server, naming the identity.
            let mut refused = vec![
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
            // What only connectors may do.
            let connector_only = API_CALLS
                .iter()
                .filter(|c| !c.accounts.contains(&account))
                .flat_map(|c| c.verbs.iter().map(|v| (c.group, c.resource, *v, c.scope)));
            refused.extend(connector_only);
            for (group, plural, verb, scope) in refused {
                let resource = resource_of(&admin, group, plural).await?;
                let name = match plural {
                    "nodes" => home,
                    "daemonsets" => "fabedge-agent",
                    "communities" => "beijing",
                    _ => "rbac-test",
                };
                let result = call(&agent, &admin, &resource, scope, verb, name).await?;
                let message = forbidden(&result).with_context(|| {
                    format!("{verb} {plural} with the {service_account} token was not refused: {result:?}")
                })?;
                assert!(
                    message.contains(&format!(
                        "User \"{}\" cannot {verb} resource \"{plural}\"",
                        user_of(account)
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
    }

    // A token bound to a Node (as the agents' are) stops working when the
    // Node is deleted (after the server's short cache of valid tokens).
    let bound = server.token(NAMESPACE, Account::Agent.service_account(), Some("edge-3"))?;
    let bound = server.client_as(&User::Token(&bound))?;
    let list_nodes =
        || server.block_on(Api::<Node>::all(bound.clone()).list(&ListParams::default().limit(1)));
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
// Per-node identity: deploy/node-policy.yaml lets each agent change only its
// own Node's fabedge.io/ annotations, and a connector also the Flannel lease
// and pod CIDR of edge Nodes; no agent changes labels.

/// What the policy guards on Node `node`, as the server holds it.
fn guarded(server: &ApiServer, node: &str) -> Result<Value> {
    let object = server.get("v1", "Node", None, node)?.context("the Node")?;
    let metadata = &object["metadata"];
    Ok(json!({
        "labels": metadata["labels"], "annotations": metadata["annotations"],
        "finalizers": metadata["finalizers"], "spec": object["spec"],
    }))
}

fn patch_node(server: &ApiServer, client: &Client, node: &str, body: &Value) -> kube::Result<Node> {
    server.block_on(Api::<Node>::all(client.clone()).patch(
        node,
        &PatchParams::default(),
        &Patch::Merge(body),
    ))
}

/// The merge patch the agent sends to set `set` and remove `remove` on `node`.
fn annotations_patch(node: &str, set: &[(&str, &str)], remove: &[&str]) -> Value {
    merge_patch(&AnnotationPatch {
        node: node.into(),
        set: set
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        remove: remove.iter().map(|k| (*k).into()).collect(),
    })
}

/// `body` on `node` with `client` is refused by the node policy with
/// exactly `reason`, and the Node is left as it was.
fn assert_refused(
    server: &ApiServer,
    client: &Client,
    node: &str,
    body: &Value,
    reason: &str,
) -> Result<()> {
    let before = guarded(server, node)?;
    match patch_node(server, client, node, body) {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{body} on {node}: {status:?}");
            assert_eq!(
                status.message,
                format!("nodes \"{node}\" is forbidden: {NODE_POLICY}{reason}"),
                "{body} on {node}"
            );
        }
        other => bail!("{body} on {node} was not refused: {other:?}"),
    }
    assert_eq!(guarded(server, node)?, before, "{body} changed {node}");
    Ok(())
}

/// `body` on `node` with `client` is accepted, and the server holds it.
fn assert_written(server: &ApiServer, client: &Client, node: &str, body: &Value) -> Result<()> {
    patch_node(server, client, node, body).with_context(|| format!("{body} on {node}"))?;
    let stored = guarded(server, node)?;
    for (key, value) in body["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(&stored["annotations"][key], value, "{key} on {node}");
    }
    for (key, value) in body["spec"].as_object().into_iter().flatten() {
        assert_eq!(&stored["spec"][key], value, "spec.{key} on {node}");
    }
    Ok(())
}

/// A client on a token of `service_account`, bound to Node `node` (or to nothing).
fn client_of(server: &ApiServer, service_account: &str, node: Option<&str>) -> Result<Client> {
    server.client_as(&User::Token(&server.token(
        NAMESPACE,
        service_account,
        node,
    )?))
}

/// A server with `deploy/`, the mini cluster and `edge-a`, an edge Node
/// without a pod CIDR.
fn node_writes_cluster() -> Result<ApiServer> {
    let server = ApiServer::start()?;
    deploy_with_fixture(&server)?;
    server.apply(&edge_node_without_cidr("edge-a", "10.2.1.1"))?;
    Ok(server)
}

/// `body` on edge-1 with a `service_account` token bound to no node (a
/// legacy Secret token, an unbound TokenRequest) is refused.
fn assert_unbound_token_writes_nothing(
    server: &ApiServer,
    service_account: &str,
    body: &Value,
) -> Result<()> {
    assert_refused(
        server,
        &client_of(server, service_account, None)?,
        "edge-1",
        body,
        &format!(
            "{service_account} with a token bound to no node may not write Nodes: \
             the agent must use a token bound to its Pod or Node"
        ),
    )
}

/// What every agent publishes on its own Node (ESP: `plan::esp_annotations`).
fn own_annotations(node: &str, generation: &str) -> Value {
    annotations_patch(
        node,
        &[
            (
                PUBLIC_KEY_ANNOTATION,
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            ),
            (KEY_GENERATION_ANNOTATION, generation),
            (KEY_NONCE_ANNOTATION, "bm9uY2Utbm9uY2Utbm9uY2U="),
            (ESP_ENDPOINT_ANNOTATION, "198.18.0.11:4500"),
        ],
        &[],
    )
}

#[test]
fn an_edge_agent_changes_only_its_own_nodes_fabedge_annotations_and_never_labels() -> Result<()> {
    let server = node_writes_cluster()?;
    let account = Account::Agent.service_account();
    let edge1 = client_of(&server, account, Some("edge-1"))?;
    let writer = "fabedge-agent of node edge-1";
    let agent_only = " (an agent writes only its own fabedge.io/ annotations)";

    // (a) Its own Node's fabedge.io/ annotations: set, changed, removed.
    assert_written(&server, &edge1, "edge-1", &own_annotations("edge-1", "1"))?;
    assert_written(&server, &edge1, "edge-1", &own_annotations("edge-1", "2"))?;
    patch_node(
        &server,
        &edge1,
        "edge-1",
        &annotations_patch("edge-1", &[], &[ESP_ENDPOINT_ANNOTATION]),
    )?;
    assert!(
        guarded(&server, "edge-1")?["annotations"]
            .get(ESP_ENDPOINT_ANNOTATION)
            .is_none()
    );

    // (b) Everything else is refused, naming the writer and what it touched.
    // Another Node's key: whoever publishes a key on edge-2 gets its traffic.
    assert_refused(
        &server,
        &edge1,
        "edge-2",
        &own_annotations("edge-2", "9"),
        &format!("{writer} may change only its own Node, not edge-2"),
    )?;
    // Role labels, its own and another's.
    let labels = "(labels choose roles; only an administrator sets them)";
    assert_refused(
        &server,
        &edge1,
        "edge-1",
        &json!({"metadata": {"labels": {label::CONNECTOR: ""}}}),
        &format!("{writer} may not change the labels of Node edge-1 {labels}"),
    )?;
    assert_refused(
        &server,
        &edge1,
        "edge-1",
        &json!({"metadata": {"labels": {label::EDGE: null}}}),
        &format!("{writer} may not change the labels of Node edge-1 {labels}"),
    )?;
    assert_refused(
        &server,
        &edge1,
        "edge-2",
        &json!({"metadata": {"labels": {label::EDGE: null}}}),
        &format!("{writer} may change only its own Node, not edge-2"),
    )?;
    // The Flannel lease, the pod CIDR annotation, foreign annotations: the
    // connector's, or nobody's.
    for key in [
        annotation::FLANNEL_PUBLIC_IP,
        annotation::FLANNEL_BACKEND_DATA,
        annotation::POD_CIDR,
        "example.com/owner",
    ] {
        assert_refused(
            &server,
            &edge1,
            "edge-1",
            &json!({"metadata": {"annotations": {key: "10.9.0.0/24"}}}),
            &format!("{writer} may not change annotation(s) {key} of Node edge-1{agent_only}"),
        )?;
    }
    // Removing one it did not write is a change too (an administrator's, here).
    let applied = "example.com/owner";
    patch_node(
        &server,
        &server.client(),
        "edge-1",
        &json!({"metadata": {"annotations": {applied: "team-a"}}}),
    )?;
    assert_refused(
        &server,
        &edge1,
        "edge-1",
        &annotations_patch("edge-1", &[(PUBLIC_KEY_ANNOTATION, "x")], &[applied]),
        &format!("{writer} may not change annotation(s) {applied} of Node edge-1{agent_only}"),
    )?;
    // spec.podCIDR, on a Node that has none (the API server itself would
    // take it once), and any other spec field.
    let edge_a = client_of(&server, account, Some("edge-a"))?;
    assert_refused(
        &server,
        &edge_a,
        "edge-a",
        &json!({"spec": {"podCIDR": "10.234.99.0/24", "podCIDRs": ["10.234.99.0/24"]}}),
        "fabedge-agent of node edge-a may not change the spec of Node edge-a",
    )?;
    // The leader's pool CIDR patch, sent by an edge for itself.
    assert_refused(
        &server,
        &edge_a,
        "edge-a",
        &annotations_patch("edge-a", &[(annotation::POD_CIDR, "10.234.99.0/24")], &[]),
        &format!(
            "fabedge-agent of node edge-a may not change annotation(s) {} of Node edge-a{agent_only}",
            annotation::POD_CIDR
        ),
    )?;
    assert_refused(
        &server,
        &edge1,
        "edge-1",
        &json!({"spec": {"unschedulable": true}}),
        &format!("{writer} may not change the spec of Node edge-1"),
    )?;
    assert_refused(
        &server,
        &edge1,
        "edge-1",
        &json!({"metadata": {"finalizers": ["example.com/keep"]}}),
        &format!("{writer} may not change the finalizers or owners of Node edge-1"),
    )?;

    // A token bound to no node speaks for no node: refused even on edge-1.
    assert_unbound_token_writes_nothing(&server, account, &own_annotations("edge-1", "3"))?;

    // The kubelet's token for the agent's Pod carries the Pod's node: the
    // same rules, from the production path.
    server.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "fabedge-agent-edge-2", "namespace": NAMESPACE},
        "spec": {"nodeName": "edge-2", "serviceAccountName": account,
                 "containers": [{"name": "agent", "image": "fabedge-agent"}]},
    }))?;
    let pod = server.client_as(&User::Token(&server.pod_token(
        NAMESPACE,
        account,
        "fabedge-agent-edge-2",
    )?))?;
    assert_written(&server, &pod, "edge-2", &own_annotations("edge-2", "1"))?;
    assert_refused(
        &server,
        &pod,
        "edge-1",
        &own_annotations("edge-1", "5"),
        "fabedge-agent of node edge-2 may change only its own Node, not edge-1",
    )?;
    Ok(())
}

#[test]
fn a_connector_writes_the_flannel_lease_and_pod_cidr_of_edge_nodes_but_no_roles_or_keys()
-> Result<()> {
    let server = node_writes_cluster()?;
    let account = Account::Connector.service_account();
    let cloud1 = client_of(&server, account, Some("cloud-1"))?;
    let writer = "fabedge-connector of node cloud-1";
    let connector_only = " (a connector writes its own fabedge.io/ annotations and the Flannel \
                          lease and fabedge.io/pod-cidr of edge Nodes)";

    // The leader's writes, as its code builds them: the Flannel lease and a
    // pool CIDR (annotation and spec) on an edge Node without one.
    let lease =
        fabedge_agent::plan::masquerade_lease([0xce, 0x0c, 0x01, 0, 0, 1], "10.1.0.1".parse()?);
    let mut set: Vec<(&str, &str)> = lease
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    set.push((annotation::POD_CIDR, "10.250.0.0/25"));
    assert_written(
        &server,
        &cloud1,
        "edge-a",
        &annotations_patch("edge-a", &set, &[]),
    )?;
    assert_eq!(
        guarded(&server, "edge-a")?["spec"]["podCIDR"],
        "10.250.0.0/25"
    );
    // Its own key, like every agent.
    assert_written(
        &server,
        &cloud1,
        "cloud-1",
        &own_annotations("cloud-1", "1"),
    )?;
    // Not its own VTEP address: a stolen connector may not point cloud
    // nodes and the other connectors at an address of its choosing.
    assert_refused(
        &server,
        &cloud1,
        "cloud-1",
        &annotations_patch("cloud-1", &[(annotation::VTEP_ADDRESS, "10.1.0.250")], &[]),
        &format!(
            "{writer} may not change annotation(s) {} of Node cloud-1{connector_only}",
            annotation::VTEP_ADDRESS
        ),
    )?;
    // A Node that stopped being an edge: its copy of the lease comes off.
    server.apply(&json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "was-edge", "annotations": lease}}))?;
    let keys: Vec<&str> = lease.keys().map(String::as_str).collect();
    patch_node(
        &server,
        &cloud1,
        "was-edge",
        &annotations_patch("was-edge", &[], &keys),
    )
    .context("removing the lease from a former edge Node")?;
    let left = guarded(&server, "was-edge")?["annotations"].clone();
    assert!(keys.iter().all(|k| left.get(k).is_none()), "{left}");

    // Refused: another Node's key (edge or cloud), role labels anywhere.
    for node in ["edge-1", "cloud-2"] {
        assert_refused(
            &server,
            &cloud1,
            node,
            &annotations_patch(node, &[(PUBLIC_KEY_ANNOTATION, "bm90LXlvdXJz")], &[]),
            &format!(
                "{writer} may not change annotation(s) {PUBLIC_KEY_ANNOTATION} of Node {node}{connector_only}"
            ),
        )?;
    }
    for (node, labels) in [
        ("edge-1", json!({label::EDGE: null})),
        ("cloud-2", json!({label::CONNECTOR: ""})),
        ("cloud-1", json!({label::CONNECTOR: null})),
    ] {
        assert_refused(
            &server,
            &cloud1,
            node,
            &json!({"metadata": {"labels": labels}}),
            &format!(
                "{writer} may not change the labels of Node {node} \
                 (labels choose roles; only an administrator sets them)"
            ),
        )?;
    }
    // The Flannel lease of a cloud Node (its own, another's) is Flannel's.
    for node in ["cloud-1", "cloud-2"] {
        assert_refused(
            &server,
            &cloud1,
            node,
            &annotations_patch(node, &[(annotation::FLANNEL_PUBLIC_IP, "10.1.0.99")], &[]),
            &format!(
                "{writer} may not change annotation(s) {} of Node {node}{connector_only}",
                annotation::FLANNEL_PUBLIC_IP
            ),
        )?;
    }
    // Spec fields other than the pod CIDR, and the pod CIDR of a cloud Node.
    assert_refused(
        &server,
        &cloud1,
        "edge-1",
        &json!({"spec": {"unschedulable": true}}),
        &format!(
            "{writer} may not change the spec of Node edge-1 \
             (a connector sets only spec.podCIDR and spec.podCIDRs of edge Nodes)"
        ),
    )?;
    server.apply(&json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "cloud-9"}}))?;
    assert_refused(
        &server,
        &cloud1,
        "cloud-9",
        &json!({"spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}}),
        &format!(
            "{writer} may not change the spec of Node cloud-9 \
             (a connector sets only spec.podCIDR and spec.podCIDRs of edge Nodes)"
        ),
    )?;

    // A connector token bound to no node writes nothing, not even the lease.
    let lease_update = annotations_patch(
        "edge-1",
        &[(annotation::FLANNEL_PUBLIC_IP, "10.1.0.99")],
        &[],
    );
    assert_unbound_token_writes_nothing(&server, account, &lease_update)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The real agent binary on its ServiceAccount token, in a throwaway network
// namespace that reaches the server through a relay on the namespace's
// loopback; the maps are read with `fabedge-agent inspect ... --json`.

/// `node`'s agent on `token`, reaching the server through a relay on its
/// namespace's loopback.
fn agent_on(name: &str, server: &ApiServer, node: &str, token: &str) -> Result<KubeAgent> {
    let mut agent = KubeAgent::new(name)?;
    agent.node = node.into();
    agent.extra_args = vec!["--namespace".into(), NAMESPACE.into()];
    let relay = server.expose_in(&agent.netns)?;
    server.write_kubeconfig(&agent.kubeconfig(), &User::Token(token), Some(relay.port))?;
    agent.hold(relay);
    Ok(agent)
}

/// `node`'s agent on a `fabedge-agent` token bound to that Node object.
fn edge_agent(name: &str, server: &ApiServer, node: &str) -> Result<KubeAgent> {
    let token = server.token(NAMESPACE, Account::Agent.service_account(), Some(node))?;
    agent_on(name, server, node, &token)
}

/// `node`'s connector agent on the token the kubelet would give it: the
/// `fabedge-connector` account's, bound to the agent's Pod on `node` (a Pod
/// object only; nothing runs it here).
fn connector_agent(name: &str, server: &ApiServer, node: &str) -> Result<KubeAgent> {
    let account = Account::Connector.service_account();
    let pod = format!("{account}-{node}");
    server.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": NAMESPACE},
        "spec": {"nodeName": node, "serviceAccountName": account,
                 "containers": [{"name": "agent", "image": "fabedge-agent"}]},
    }))?;
    let token = server.pod_token(NAMESPACE, account, &pod)?;
    agent_on(name, server, node, &token)
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

/// What the server set on an object read back, so it can be applied again.
fn strip_server_fields(object: &mut Value) {
    for key in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
    ] {
        object["metadata"].as_object_mut().unwrap().remove(key);
    }
    object.as_object_mut().unwrap().remove("status");
}

#[test]
fn an_agent_on_a_node_bound_token_follows_node_community_and_service_edits() -> Result<()> {
    let server = ApiServer::start()?;
    deploy_with_fixture(&server)?;
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
    let service_writes = |a: &KubeAgent| a.log().matches("services: ServiceReport").count();
    // Before the edit: its pass is the one that logs the next Service line.
    let writes = service_writes(&agent);
    let set_dns_port = |port: u16| -> Result<()> {
        let mut dns = server
            .get("v1", "Service", Some("kube-system"), "dns")?
            .context("the dns Service")?;
        dns["spec"]["ports"][0]["port"] = json!(port);
        strip_server_fields(&mut dns);
        server.apply(&dns)
    };
    set_dns_port(5353)?;
    agent.wait("10.96.0.10:5353 in the Service map, :53/UDP gone", |a| {
        let f = frontends(a)?;
        Ok(
            (f.contains_key("10.96.0.10:5353/UDP") && !f.contains_key("10.96.0.10:53/UDP"))
                .then_some(()),
        )
    })?;

    // An endpoint moves to another pod: its slot changes without a full
    // pass (no `applied plan` line; the Service maps' own line instead).
    // The maps are written before the pass logs them: wait for the edit's
    // own Service line, then for `applied plan` after it (the pass's end).
    let applies = agent.wait("the Service port edit's full pass logged", |a| {
        let log = a.log();
        let done = service_writes(a) > writes
            && log.rfind("applied plan for") > log.rfind("services: ServiceReport");
        Ok(done.then_some(a.applies()))
    })?;
    let writes = service_writes(&agent);
    let mut slice = server
        .get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some("kube-system"),
            "dns-7x2kq",
        )?
        .context("the dns EndpointSlice")?;
    slice["endpoints"][0]["addresses"] = json!(["10.234.1.11"]);
    strip_server_fields(&mut slice);
    server.apply(&slice)?;
    agent.wait("the new endpoint behind 10.96.0.10:5353/UDP", |a| {
        let f = frontends(a)?;
        Ok((f.get("10.96.0.10:5353/UDP") == Some(&json!(["10.234.1.11:53"]))).then_some(()))
    })?;
    // The log lags the maps. A marker edit that takes a full pass closes it:
    // once the marker's `applied plan` is logged, the endpoint change's
    // lines are all there, and the marker's pass is the only new one.
    set_dns_port(53)?;
    agent.wait("the marker edit's full pass logged", |a| {
        let log = a.log();
        let done = service_writes(a) >= writes + 2
            && log.rfind("applied plan for") > log.rfind("services: ServiceReport");
        Ok(done.then_some(()))
    })?;
    assert_eq!(
        agent.applies(),
        applies + 1,
        "an endpoint change took a full pass (besides the marker edit's):\n{}",
        agent.log()
    );
    assert_eq!(service_writes(&agent), writes + 2, "{}", agent.log());
    assert!(
        !agent.log().contains("ERROR fabedge_agent"),
        "every apply succeeded:\n{}",
        agent.log()
    );
    // What the server saw: only declared calls, none refused.
    let requests = agent_requests(&server, Account::Agent)?;
    assert_agent_calls_are_declared(&requests, Account::Agent);
    let refused: Vec<&Request> = requests.iter().filter(|r| r.code == 403).collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    Ok(())
}

#[test]
fn an_apiserver_restart_keeps_the_maps_and_the_agent_relists_and_reconciles() -> Result<()> {
    let mut server = ApiServer::start()?;
    deploy_with_fixture(&server)?;
    let mut agent = edge_agent("api-restart", &server, "edge-1")?;
    agent.start()?;
    let online = agent.wait_routes("the first plan", |r| r.contains_key("10.234.2.0/24"))?;
    // The maps fill before the apply is logged.
    let applies = agent.wait("the first apply logged", |a| {
        Ok(Some(a.applies()).filter(|n| *n > 0))
    })?;

    let node_lists = |server: &ApiServer| -> Result<usize> {
        Ok(agent_requests(server, Account::Agent)?
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
    deploy_with_fixture(&server)?;
    let mut agent = connector_agent("api-conn", &server, "cloud-1")?;
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
    // Its Lease, patch and Event calls were all declared, none refused (by
    // RBAC nor by the node policy).
    let requests = agent_requests(&server, Account::Connector)?;
    assert_agent_calls_are_declared(&requests, Account::Connector);
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
