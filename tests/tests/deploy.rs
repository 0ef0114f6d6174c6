//! `deploy/`: every document parses into its k8s-openapi type (strictly: a
//! misspelt field fails), the CRD is what `cargo xtask gen-crd` generates
//! from the Rust types, the RBAC grants each role's ServiceAccount exactly
//! the calls its agents make (`annotate::API_CALLS`, `Account::calls`), the
//! node policy names the accounts, labels and annotations the code uses, and
//! the DaemonSets give the agent what it relies on (its role's account,
//! mounts, env, and a metrics port its probes use).

#[path = "../../xtask/src/crd.rs"]
#[allow(dead_code)]
mod crd;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use fabedge_agent::{
    connector::annotate::{API_CALLS, Account, CallScope},
    datapath::DEFAULT_BPFFS_ROOT,
    esp::keys::{
        ESP_ENDPOINT_ANNOTATION, KEY_GENERATION_ANNOTATION, KEY_NONCE_ANNOTATION,
        PUBLIC_KEY_ANNOTATION,
    },
    model::{annotation, label},
    observe::DEFAULT_METRICS_PORT,
    plan::DEFAULT_CNI_CONF_DIR,
    source::{CommunityObject, CommunitySpec},
};
use k8s_openapi::{
    Resource,
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::DaemonSet,
        core::v1::{Namespace, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

const NAMESPACE: &str = "fabedge";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every file the kustomization lists, as JSON.
fn documents() -> Result<Vec<(String, Value)>> {
    let dir = deploy_dir();
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml"))?)?;
    let listed: Vec<String> = kustomization["resources"]
        .as_array()
        .context("kustomization.yaml lists no resources")?
        .iter()
        .map(|r| r.as_str().unwrap_or_default().to_owned())
        .collect();
    // Nothing in deploy/ is left out of the kustomization.
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        on_disk,
        listed.iter().cloned().collect(),
        "deploy/*.yaml and kustomization resources differ"
    );
    let mut docs = Vec::new();
    for file in listed {
        let text = std::fs::read_to_string(dir.join(&file))
            .with_context(|| format!("reading deploy/{file}"))?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc)
                .with_context(|| format!("deploy/{file} document {}", i + 1))?;
            if !value.is_null() {
                docs.push((format!("deploy/{file} document {}", i + 1), value));
            }
        }
    }
    Ok(docs)
}

/// Parses `value` as `T` and back: a field k8s-openapi does not know (a typo)
/// would vanish on the way, so the round trip must give the same JSON.
fn strict<T: DeserializeOwned + serde::Serialize>(origin: &str, value: &Value) -> Result<T> {
    let typed: T = serde_json::from_value(value.clone())
        .with_context(|| format!("{origin}: not a valid object"))?;
    let back = serde_json::to_value(&typed)?;
    if back != *value {
        bail!(
            "{origin}: fields were lost parsing it (misspelt or misplaced?):\nwritten: {value:#}\nparsed:  {back:#}"
        );
    }
    Ok(typed)
}

fn all_of<T: DeserializeOwned + serde::Serialize + Resource>(
    docs: &[(String, Value)],
) -> Result<Vec<T>> {
    docs.iter()
        .filter(|(_, v)| v["kind"] == T::KIND && v["apiVersion"] == T::API_VERSION)
        .map(|(o, v)| strict(o, v))
        .collect()
}

#[test]
fn every_document_parses_into_its_kubernetes_type() -> Result<()> {
    let docs = documents()?;
    let known = [
        (Namespace::API_VERSION, Namespace::KIND),
        (ServiceAccount::API_VERSION, ServiceAccount::KIND),
        (ClusterRole::API_VERSION, ClusterRole::KIND),
        (ClusterRoleBinding::API_VERSION, ClusterRoleBinding::KIND),
        (Role::API_VERSION, Role::KIND),
        (RoleBinding::API_VERSION, RoleBinding::KIND),
        (DaemonSet::API_VERSION, DaemonSet::KIND),
        (
            ValidatingAdmissionPolicy::API_VERSION,
            ValidatingAdmissionPolicy::KIND,
        ),
        (
            ValidatingAdmissionPolicyBinding::API_VERSION,
            ValidatingAdmissionPolicyBinding::KIND,
        ),
        (
            CustomResourceDefinition::API_VERSION,
            CustomResourceDefinition::KIND,
        ),
    ];
    for (origin, doc) in &docs {
        let key = (
            doc["apiVersion"].as_str().unwrap_or(""),
            doc["kind"].as_str().unwrap_or(""),
        );
        assert!(known.contains(&key), "{origin}: unexpected {key:?}");
    }
    assert_eq!(all_of::<Namespace>(&docs)?.len(), 1);
    assert_eq!(all_of::<ServiceAccount>(&docs)?.len(), Account::ALL.len());
    assert_eq!(all_of::<ValidatingAdmissionPolicy>(&docs)?.len(), 1);
    assert_eq!(all_of::<ValidatingAdmissionPolicyBinding>(&docs)?.len(), 1);
    assert_eq!(all_of::<CustomResourceDefinition>(&docs)?.len(), 1);
    assert_eq!(all_of::<DaemonSet>(&docs)?.len(), 2);
    Ok(())
}

#[test]
fn checked_in_crd_is_what_gen_crd_generates_from_the_rust_types() -> Result<()> {
    let checked_in = std::fs::read_to_string(deploy_dir().join("crd.yaml"))?;
    assert!(
        checked_in == crd::render()?,
        "deploy/crd.yaml is stale: run `cargo xtask gen-crd`"
    );

    // The generator's names are the Rust type's.
    assert_eq!(
        (crd::GROUP, crd::VERSION, crd::KIND),
        (
            CommunityObject::GROUP,
            CommunityObject::VERSION,
            CommunityObject::KIND
        )
    );
    assert_eq!(crd::PLURAL, CommunityObject::URL_PATH_SEGMENT);
    assert_eq!(
        crd::LIST_KIND,
        <CommunityObject as k8s_openapi::ListableResource>::LIST_KIND
    );
    let docs = documents()?;
    let crd_object = all_of::<CustomResourceDefinition>(&docs)?.remove(0);
    assert_eq!(
        crd_object.spec.scope, "Cluster",
        "CommunityObject is cluster-scoped"
    );

    // The schema's spec fields are exactly the fields CommunitySpec (de)serialises.
    let spec = serde_json::to_value(CommunitySpec {
        members: vec!["edge-1".into()],
    })?;
    let fields: BTreeSet<&String> = spec.as_object().unwrap().keys().collect();
    let schema = crd::spec_schema();
    let properties: BTreeSet<&String> = schema["properties"].as_object().unwrap().keys().collect();
    assert_eq!(fields, properties);
    // An object the schema describes deserialises into the Rust type.
    let sample = serde_json::json!({"apiVersion": "fabedge.io/v1alpha1", "kind": "Community",
        "metadata": {"name": "beijing"}, "spec": {"members": ["edge-1", "edge-2"]}});
    let parsed: CommunityObject = serde_json::from_value(sample.clone())?;
    assert_eq!(parsed.spec.members, ["edge-1", "edge-2"]);
    assert_eq!(serde_json::to_value(&parsed)?, sample);
    Ok(())
}

/// (group, resource, verb) triples a set of rules grants.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    assert_ne!(resource, "*", "no wildcard resources");
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

fn namespace_of(scope: CallScope) -> Option<&'static str> {
    match scope {
        CallScope::Cluster => None,
        CallScope::AgentNamespace => Some(NAMESPACE),
        CallScope::Namespace(ns) => Some(ns),
    }
}

/// What `account`'s agents need cluster-wide (`None`) or in one namespace.
fn needed(account: Account, namespace: Option<&str>) -> BTreeSet<(String, String, String)> {
    account
        .calls()
        .filter(|c| namespace_of(c.scope) == namespace)
        .flat_map(|c| {
            c.verbs
                .iter()
                .map(|v| (c.group.to_owned(), c.resource.to_owned(), (*v).to_owned()))
        })
        .collect()
}

fn names(subjects: &Option<Vec<Subject>>, account: Account) -> bool {
    subjects.iter().flatten().any(|s| {
        s.kind == "ServiceAccount"
            && s.name == account.service_account()
            && s.namespace.as_deref() == Some(NAMESPACE)
    })
}

#[test]
fn rbac_grants_each_service_account_exactly_its_agents_calls() -> Result<()> {
    let docs = documents()?;
    let cluster_roles = all_of::<ClusterRole>(&docs)?;
    let roles = all_of::<Role>(&docs)?;
    let cluster_bindings = all_of::<ClusterRoleBinding>(&docs)?;
    let bindings = all_of::<RoleBinding>(&docs)?;
    let accounts: BTreeSet<String> = all_of::<ServiceAccount>(&docs)?
        .into_iter()
        .map(|sa| {
            assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));
            sa.metadata.name.unwrap_or_default()
        })
        .collect();
    assert_eq!(
        accounts,
        Account::ALL
            .iter()
            .map(|a| a.service_account().to_owned())
            .collect(),
        "one ServiceAccount per role"
    );
    let cluster_rules = |name: &str| -> Vec<PolicyRule> {
        cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .and_then(|r| r.rules.clone())
            .unwrap_or_default()
    };
    let namespaces: BTreeSet<&str> = API_CALLS
        .iter()
        .filter_map(|c| namespace_of(c.scope))
        .chain(roles.iter().filter_map(|r| r.metadata.namespace.as_deref()))
        .collect();
    for account in Account::ALL {
        // Cluster-wide: the ClusterRoles bound to it.
        let rules: Vec<PolicyRule> = cluster_bindings
            .iter()
            .filter(|b| b.role_ref.kind == "ClusterRole" && names(&b.subjects, account))
            .flat_map(|b| cluster_rules(&b.role_ref.name))
            .collect();
        assert_eq!(
            grants(&rules),
            needed(account, None),
            "{account:?} cluster-wide"
        );
        // In each namespace: the Roles (or ClusterRoles) bound there.
        for namespace in &namespaces {
            let rules: Vec<PolicyRule> = bindings
                .iter()
                .filter(|b| {
                    b.metadata.namespace.as_deref() == Some(namespace)
                        && names(&b.subjects, account)
                })
                .flat_map(|b| match b.role_ref.kind.as_str() {
                    "ClusterRole" => cluster_rules(&b.role_ref.name),
                    _ => roles
                        .iter()
                        .find(|r| {
                            r.metadata.name.as_ref() == Some(&b.role_ref.name)
                                && r.metadata.namespace == b.metadata.namespace
                        })
                        .and_then(|r| r.rules.clone())
                        .unwrap_or_default(),
                })
                .collect();
            assert_eq!(
                grants(&rules),
                needed(account, Some(namespace)),
                "{account:?} in namespace {namespace}"
            );
        }
    }
    // No role is left unbound (dead grants hide mistakes).
    for role in &roles {
        assert!(
            bindings.iter().any(|b| b.role_ref.kind == "Role"
                && Some(&b.role_ref.name) == role.metadata.name.as_ref()
                && b.metadata.namespace == role.metadata.namespace),
            "Role {:?} is bound to nobody",
            role.metadata.name
        );
    }
    for role in &cluster_roles {
        assert!(
            cluster_bindings
                .iter()
                .any(|b| Some(&b.role_ref.name) == role.metadata.name.as_ref()),
            "ClusterRole {:?} is bound to nobody",
            role.metadata.name
        );
    }
    Ok(())
}

/// The node policy's text speaks of the accounts, labels and annotation
/// keys the code uses (what it allows is proven against the real API
/// server in `tests/tests/apiserver.rs`).
#[test]
fn node_policy_names_the_accounts_labels_and_annotations_the_code_uses() -> Result<()> {
    let docs = documents()?;
    let policy = all_of::<ValidatingAdmissionPolicy>(&docs)?.remove(0);
    let binding = all_of::<ValidatingAdmissionPolicyBinding>(&docs)?.remove(0);
    let spec = policy.spec.context("the policy's spec")?;
    let binding_spec = binding.spec;
    assert_eq!(
        binding_spec.policy_name,
        policy.metadata.name.unwrap_or_default()
    );
    assert_eq!(binding_spec.validation_actions, ["Deny"]);
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"), "fail closed");
    assert!(
        binding_spec.match_resources.is_none(),
        "the binding narrows nothing"
    );

    // It applies to Node writes of exactly the two accounts.
    let rules = spec
        .match_constraints
        .as_ref()
        .and_then(|m| m.resource_rules.clone())
        .unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["nodes".to_owned()][..])
    );
    assert_eq!(
        rules[0].operations.as_deref(),
        Some(&["UPDATE".to_owned()][..])
    );
    let conditions = spec.match_conditions.clone().unwrap_or_default();
    let users: Vec<String> = Account::ALL
        .iter()
        .map(|a| {
            format!(
                "'system:serviceaccount:{NAMESPACE}:{}'",
                a.service_account()
            )
        })
        .collect();
    assert_eq!(conditions.len(), 1);
    for user in &users {
        assert!(
            conditions[0].expression.contains(user),
            "{user} not matched"
        );
    }
    let variable = |name: &str| -> String {
        spec.variables
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .map(|v| v.expression.clone())
            .unwrap_or_default()
    };
    assert!(
        variable("connector").contains(&users[1]),
        "the connector variable names {}",
        users[1]
    );
    assert!(variable("edge").contains(&format!("'{}'", label::EDGE)));

    // The keys: every agent's own annotations are under the prefix it
    // may write; the Flannel lease under the connector's; the pod CIDR is
    // named as the connector's alone.
    let refused = variable("refused");
    let own_prefix = "fabedge.io/";
    for key in [
        PUBLIC_KEY_ANNOTATION,
        KEY_GENERATION_ANNOTATION,
        KEY_NONCE_ANNOTATION,
        ESP_ENDPOINT_ANNOTATION,
        annotation::TUNNEL_ENDPOINT,
    ] {
        assert!(key.starts_with(own_prefix), "{key}");
    }
    assert!(refused.contains(&format!("k.startsWith('{own_prefix}')")));
    assert!(refused.contains(&format!("k != '{}'", annotation::POD_CIDR)));
    assert!(refused.contains(&format!("k == '{}'", annotation::POD_CIDR)));
    let flannel_prefix = "flannel.alpha.coreos.com/";
    assert!(
        annotation::FLANNEL_LEASE
            .iter()
            .all(|k| k.starts_with(flannel_prefix))
    );
    assert!(refused.contains(&format!("k.startsWith('{flannel_prefix}')")));
    Ok(())
}

/// The flags `fabedge-agent run` accepts, from its own help.
fn run_flags() -> Result<BTreeSet<String>> {
    let out = std::process::Command::new(fabedge_tests::agent::agent_bin()?)
        .args(["run", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches([',', '.'])
                .split('=')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect())
}

#[test]
fn daemonsets_give_the_agent_what_it_relies_on() -> Result<()> {
    let docs = documents()?;
    let flags = run_flags()?;
    let daemonsets = all_of::<DaemonSet>(&docs)?;
    let mut selects = BTreeSet::new();
    for ds in &daemonsets {
        let name = ds.metadata.name.clone().unwrap_or_default();
        assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE), "{name}");
        let pod = ds.spec.template.spec.as_ref().context("a pod spec")?;
        assert_eq!(
            pod.host_network,
            Some(true),
            "{name}: hostNetwork (the datapath is the node's)"
        );
        // Its role's own account (RBAC and the node policy tell them apart).
        let connector_ds = pod
            .affinity
            .iter()
            .flat_map(|a| a.node_affinity.iter())
            .flat_map(|n| n.required_during_scheduling_ignored_during_execution.iter())
            .flat_map(|r| r.node_selector_terms.iter())
            .flat_map(|t| t.match_expressions.iter().flatten())
            .any(|e| e.key == label::CONNECTOR && e.operator == "Exists");
        let account = if connector_ds {
            Account::Connector
        } else {
            Account::Agent
        };
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some(account.service_account()),
            "{name}"
        );
        assert!(
            pod.tolerations
                .iter()
                .flatten()
                .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
            "{name}: tolerates every taint (edge nodes are tainted)"
        );
        // Selection by role labels.
        let terms = &pod
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .context("required node affinity")?
            .node_selector_terms;
        for term in terms {
            for expr in term.match_expressions.iter().flatten() {
                assert!(
                    [label::EDGE, label::CONNECTOR].contains(&expr.key.as_str()),
                    "{name}: selects on {}",
                    expr.key
                );
                selects.insert((expr.key.clone(), expr.operator.clone()));
            }
        }

        assert_eq!(pod.containers.len(), 1);
        let agent = &pod.containers[0];
        assert_eq!(
            agent.security_context.as_ref().and_then(|s| s.privileged),
            Some(true),
            "{name}: privileged"
        );
        let args = agent.args.clone().unwrap_or_default();
        assert_eq!(args.first().map(String::as_str), Some("run"), "{name}");
        assert!(
            !args.iter().any(|a| a.starts_with("--manifests")),
            "{name}: kube mode, not standalone"
        );
        for arg in args.iter().skip(1) {
            let flag = arg.split('=').next().unwrap();
            assert!(
                flags.contains(flag),
                "{name}: `fabedge-agent run` has no flag {flag}"
            );
        }
        let arg = |flag: &str| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("{flag}=")))
                .map(str::to_owned)
        };

        // Env: the node name and namespace from the downward API, and any $(VAR) the args use.
        let env = agent.env.clone().unwrap_or_default();
        let field = |var: &str| {
            env.iter()
                .find(|e| e.name == var)
                .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
                .map(|f| f.field_path.clone())
        };
        assert_eq!(
            field("NODE_NAME").as_deref(),
            Some("spec.nodeName"),
            "{name}: --node comes from NODE_NAME"
        );
        assert_eq!(
            field("POD_NAMESPACE").as_deref(),
            Some("metadata.namespace"),
            "{name}: the Lease's namespace"
        );
        for a in &args {
            if let Some(var) = a.split("$(").nth(1).and_then(|r| r.split(')').next()) {
                assert!(
                    env.iter().any(|e| e.name == var),
                    "{name}: {a} needs env {var}"
                );
            }
        }

        // Mounts: bpffs (Bidirectional, so pins reach the host), CNI config, state dir.
        let mounts = agent.volume_mounts.clone().unwrap_or_default();
        let volumes = pod.volumes.clone().unwrap_or_default();
        let host_path_of = |mount_path: &str| -> Option<(String, Option<String>)> {
            let m = mounts.iter().find(|m| m.mount_path == mount_path)?;
            let v = volumes.iter().find(|v| v.name == m.name)?;
            Some((
                v.host_path.as_ref()?.path.clone(),
                m.mount_propagation.clone(),
            ))
        };
        let bpffs = Path::new(DEFAULT_BPFFS_ROOT)
            .parent()
            .unwrap()
            .display()
            .to_string();
        assert_eq!(
            host_path_of(&bpffs),
            Some((bpffs.clone(), Some("Bidirectional".into()))),
            "{name}: {bpffs}"
        );
        let cni = arg("--cni-conf-dir").unwrap_or_else(|| DEFAULT_CNI_CONF_DIR.into());
        assert_eq!(
            host_path_of(&cni).map(|h| h.0),
            Some(cni.clone()),
            "{name}: CNI config dir"
        );
        let state = arg("--state-dir").context("--state-dir")?;
        assert_eq!(
            host_path_of(&state).map(|h| h.0),
            Some(state.clone()),
            "{name}: state dir on the host"
        );
        // Socket-level Service translation needs the host's cgroup hierarchy,
        // not the container's own cgroup namespace.
        let cgroup = arg("--cgroup")
            .context("--cgroup: the container's /sys/fs/cgroup is its own cgroup")?;
        let host_cgroup = host_path_of(&cgroup).or_else(|| {
            host_path_of(Path::new(&cgroup).parent()?.to_str()?)
                .map(|(p, m)| (format!("{p}/unified"), m))
        });
        assert!(
            host_cgroup
                .as_ref()
                .is_some_and(|(path, _)| path.starts_with("/sys/fs/cgroup")),
            "{name}: --cgroup {cgroup} must be the host's /sys/fs/cgroup mounted into the pod, found {host_cgroup:?}"
        );
        // Metrics: --metrics-addr serves on the node's address (the kubelet
        // probes a hostNetwork pod there) at the container's declared port,
        // which the liveness (/healthz) and readiness (/readyz) probes use.
        let metrics_addr =
            arg("--metrics-addr").with_context(|| format!("{name}: --metrics-addr"))?;
        let (host, port) = metrics_addr.rsplit_once(':').with_context(|| {
            format!("{name}: --metrics-addr={metrics_addr} is not ADDRESS:PORT")
        })?;
        let port: i32 = port.parse()?;
        assert_eq!(
            port,
            i32::from(DEFAULT_METRICS_PORT),
            "{name}: the metrics port README names"
        );
        match host.strip_prefix("$(").and_then(|r| r.strip_suffix(')')) {
            Some(var) => assert_eq!(
                field(var).as_deref(),
                Some("status.hostIP"),
                "{name}: {metrics_addr} must be the node's address for the probes to reach it"
            ),
            None => assert_eq!(
                host, "0.0.0.0",
                "{name}: {metrics_addr} unreachable to probes"
            ),
        }
        // A hostNetwork pod's containerPort is a hostPort: the surge pod of a
        // rolling update could not be scheduled beside the old one.
        assert!(
            agent.ports.iter().flatten().next().is_none(),
            "{name}: declares ports {:?}; on a hostNetwork pod they are host ports that keep \
             the surge pod of a rolling update off the node",
            agent.ports
        );
        let probes = |probe: Option<&Probe>, path: &str| {
            let Some(get) = probe.and_then(|p| p.http_get.as_ref()) else {
                return false;
            };
            get.path.as_deref() == Some(path) && get.port == IntOrString::Int(port)
        };
        assert!(
            probes(agent.liveness_probe.as_ref(), "/healthz"),
            "{name}: liveness probe GET /healthz on the metrics port, found {:?}",
            agent.liveness_probe
        );
        assert!(
            probes(agent.readiness_probe.as_ref(), "/readyz"),
            "{name}: readiness probe GET /readyz on the metrics port, found {:?}",
            agent.readiness_probe
        );

        // Rolled by surge: the new agent stands by until the old one exits
        // (run/handover.rs), so no node is ever without one.
        let rolling = ds
            .spec
            .update_strategy
            .as_ref()
            .and_then(|u| u.rolling_update.as_ref())
            .with_context(|| format!("{name}: no rollingUpdate strategy"))?;
        assert_eq!(
            (rolling.max_surge.as_ref(), rolling.max_unavailable.as_ref()),
            (Some(&IntOrString::Int(1)), Some(&IntOrString::Int(0))),
            "{name}: rollingUpdate must be maxSurge 1, maxUnavailable 0"
        );

        if selects.contains(&(label::CONNECTOR.to_owned(), "Exists".to_owned()))
            && name.contains("connector")
        {
            assert!(
                arg("--uplink").is_some(),
                "{name}: connectors need --uplink"
            );
        }
    }
    // One DaemonSet on connectors, one on every other node.
    assert_eq!(
        selects,
        BTreeSet::from([
            (label::CONNECTOR.to_owned(), "Exists".to_owned()),
            (label::CONNECTOR.to_owned(), "DoesNotExist".to_owned()),
        ])
    );
    Ok(())
}
