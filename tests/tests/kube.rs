//! The Kubernetes control plane against an in-test API server
//! (`fabedge_tests::fake_api`): the real kube-rs client, watchers and
//! Lease calls, the agent's own source, election, IPAM and annotation code.
//!
//! In-process tests drive the same pieces the agent's kube mode drives
//! (`KubeSource`, `ConnectorDuty`) and assert on plans and on what the API
//! server received. The tests that must see maps run the real agent binary
//! in a throwaway network namespace against the fake server (see the end).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fabedge_agent::{
    connector::{
        annotate::{API_CALLS, CallScope, ConnectorDuty, is_connector},
        ipam::Pool,
        leader::ElectionConfig,
    },
    model::{FlannelLease, annotation, label},
    plan::{PeerIds, Settings, plan},
    source::{Objects, kube::KubeSource, manifest},
};
use fabedge_tests::{
    fake_api::{FakeApi, Request},
    kube_agent::KubeAgent,
};
use ipnet::Ipv4Net;
use serde_json::{Value, json};

const NAMESPACE: &str = "fabedge";
const LEASE: &str = "fabedge-connector";
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mini-cluster.yaml");

fn fixture() -> Objects {
    let text = std::fs::read_to_string(FIXTURE).expect("the fixture is readable");
    manifest::parse(&text).expect("the fixture parses")
}

/// Every object of `objects` stored in the fake server.
fn publish(fake: &FakeApi, objects: &Objects) -> Result<()> {
    for node in &objects.nodes {
        fake.apply(&serde_json::to_value(node)?)?;
    }
    for community in &objects.communities {
        fake.apply(&serde_json::to_value(community)?)?;
    }
    for service in &objects.services {
        fake.apply(&serde_json::to_value(service)?)?;
    }
    for slice in &objects.endpoint_slices {
        fake.apply(&serde_json::to_value(slice)?)?;
    }
    Ok(())
}

fn client(fake: &FakeApi) -> kube::Client {
    let config = kube::Config::new(fake.url().parse().expect("a URL"));
    kube::Client::try_from(config).expect("a client for plain HTTP")
}

/// Polls `probe` until it returns `Some`, or fails naming `what`.
async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn connector_settings() -> Settings {
    Settings {
        flannel_mac: Some([0xce, 0x0c, 1, 0, 0, 1]),
        uplink: Some("eth0".into()),
        ..Settings::default()
    }
}

fn edge_node(name: &str, address: &str, pod_cidr: Option<&str>) -> Value {
    let mut node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {label::EDGE: ""}},
        "spec": {},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    });
    // A public address outside the cluster's ranges, so the tunnel endpoint
    // is not behind the tunnel.
    let octets: Vec<&str> = address.split('.').collect();
    node["status"]["addresses"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "type": "ExternalIP", "address": format!("198.18.{}.{}", octets[2], octets[3]),
        }));
    if let Some(cidr) = pod_cidr {
        node["spec"]["podCIDR"] = json!(cidr);
    }
    node
}

/// Every request the fake server saw is covered by `API_CALLS` (the list
/// the deploy test checks the RBAC against).
fn assert_calls_are_declared(requests: &[Request]) {
    for request in requests {
        let resource = request
            .resource
            .as_ref()
            .unwrap_or_else(|| panic!("unroutable request {}", request.path));
        let verb = request.verb();
        let declared = API_CALLS.iter().any(|call| {
            call.group == resource.group
                && call.resource == resource.plural
                && call.verbs.contains(&verb)
                && match call.scope {
                    CallScope::Cluster => request.namespace.is_none(),
                    CallScope::AgentNamespace => request.namespace.as_deref() == Some(NAMESPACE),
                    CallScope::Namespace(ns) => request.namespace.as_deref() == Some(ns),
                }
        });
        assert!(
            declared,
            "{} {} ({verb} {}) is not in annotate::API_CALLS",
            request.method, request.path, resource.plural
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_objects_from_file_and_kube_give_identical_plans() -> Result<()> {
    let fake = FakeApi::start()?;
    let from_file = fixture();
    publish(&fake, &from_file)?;
    let source = KubeSource::start(client(&fake));
    let from_kube = eventually(
        "the first list of every kind",
        Duration::from_secs(10),
        || source.objects(),
    )
    .await?;

    let file_snapshot = from_file.snapshot()?;
    let kube_snapshot = from_kube.snapshot()?;
    assert_eq!(kube_snapshot, file_snapshot);
    let settings = connector_settings();
    for node in file_snapshot.nodes.keys() {
        let from_file = plan(&file_snapshot, node, &settings, &PeerIds::new());
        assert!(from_file.is_ok(), "{node}: {from_file:?}");
        assert_eq!(
            plan(&kube_snapshot, node, &settings, &PeerIds::new()),
            from_file,
            "plans of {node} differ"
        );
    }
    assert_calls_are_declared(&fake.requests());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_added_changed_and_removed_reach_the_plan() -> Result<()> {
    let fake = FakeApi::start()?;
    publish(&fake, &fixture())?;
    let source = KubeSource::start(client(&fake));
    let settings = connector_settings();
    let routes_of_connector = || -> Option<BTreeSet<Ipv4Net>> {
        let snapshot = source.objects()?.snapshot().ok()?;
        let plan = plan(&snapshot, "cloud-1", &settings, &PeerIds::new()).ok()?;
        Some(plan.routes.keys().copied().collect())
    };
    let cidr = |s: &str| s.parse::<Ipv4Net>().unwrap();
    eventually("the first plan", Duration::from_secs(10), || {
        routes_of_connector()
    })
    .await?;

    fake.apply(&edge_node("edge-9", "10.2.0.19", Some("10.234.9.0/24")))?;
    eventually(
        "edge-9's pod CIDR in the plan",
        Duration::from_secs(10),
        || {
            routes_of_connector()
                .filter(|r| r.contains(&cidr("10.234.9.0/24")) && r.contains(&cidr("10.2.0.19/32")))
        },
    )
    .await?;

    fake.apply(&edge_node("edge-9", "10.2.0.29", Some("10.234.9.0/24")))?;
    eventually(
        "edge-9's new address in the plan",
        Duration::from_secs(10),
        || {
            routes_of_connector()
                .filter(|r| r.contains(&cidr("10.2.0.29/32")) && !r.contains(&cidr("10.2.0.19/32")))
        },
    )
    .await?;

    fake.delete("v1", "Node", None, "edge-9")?;
    eventually("edge-9 gone from the plan", Duration::from_secs(10), || {
        routes_of_connector()
            .filter(|r| !r.contains(&cidr("10.234.9.0/24")) && !r.contains(&cidr("10.2.0.29/32")))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_resource_version_relists_without_reporting_a_change() -> Result<()> {
    let fake = FakeApi::start()?;
    publish(&fake, &fixture())?;
    let mut source = KubeSource::start(client(&fake));
    let before = eventually("the first list", Duration::from_secs(10), || {
        source.objects()
    })
    .await?;
    // Drain the notifications of the first list.
    while tokio::time::timeout(Duration::from_millis(300), source.changed())
        .await
        .is_ok()
    {}
    let lists = |requests: &[Request]| requests.iter().filter(|r| r.verb() == "list").count();
    let lists_before = lists(&fake.requests());
    assert_eq!(lists_before, 4, "one list per kind");

    fake.expire_watches();
    fake.wait_for_requests(
        "a relist of all four kinds after 410 Gone",
        Duration::from_secs(20),
        |r| lists(r) >= lists_before + 4,
    )?;
    let rewatched = fake
        .requests()
        .iter()
        .filter(|r| r.verb() == "watch")
        .count();
    assert!(
        rewatched >= 8,
        "the watchers watch again after relisting ({rewatched} watches)"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(1), source.changed())
            .await
            .is_err(),
        "a relist that finds the same objects must not look like a change"
    );
    assert_eq!(source.objects(), Some(before));
    assert_calls_are_declared(&fake.requests());
    Ok(())
}

/// A connector agent's cluster work without its datapath: the same
/// `KubeSource` → `ConnectorDuty` steps the agent's kube mode runs.
struct Candidate {
    task: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Candidate {
    /// As if killed: no release.
    fn kill(&self) {
        self.task.abort();
    }

    /// As on SIGTERM: the agent releases the lease on its way out.
    async fn stop_gracefully(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

fn candidate(
    fake: &FakeApi,
    name: &str,
    lease: Duration,
    renew: Duration,
    pool: Option<Pool>,
) -> Candidate {
    let client = client(fake);
    let name = name.to_owned();
    let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut source = KubeSource::start(client.clone());
        let config = ElectionConfig {
            namespace: NAMESPACE.into(),
            lease_name: LEASE.into(),
            identity: name.clone(),
            lease_duration: lease,
            renew_interval: renew,
        };
        let mut duty = ConnectorDuty::new(client, config, pool);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = source.changed() => {}
                _ = tick.tick() => {}
                _ = duty.leading_changed() => {}
                _ = &mut stop => break,
            }
            if let Some(objects) = source.objects() {
                let connector = is_connector(&objects.nodes, &name);
                duty.step(|| Some(objects), connector, None).await;
            }
        }
        duty.release().await;
    });
    Candidate {
        task,
        stop: Some(stop_tx),
    }
}

fn lease_holder(fake: &FakeApi) -> Option<(String, i64)> {
    let lease = fake.get("coordination.k8s.io/v1", "Lease", Some(NAMESPACE), LEASE)?;
    Some((
        lease["spec"]["holderIdentity"].as_str()?.to_owned(),
        lease["spec"]["leaseTransitions"].as_i64()?,
    ))
}

fn annotations(fake: &FakeApi, node: &str) -> BTreeMap<String, String> {
    fake.get("v1", "Node", None, node)
        .and_then(|n| serde_json::from_value(n["metadata"]["annotations"].clone()).ok())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_writes_flannel_annotations_and_the_follower_takes_over_within_the_lease()
-> Result<()> {
    let fake = FakeApi::start()?;
    let objects = fixture();
    publish(&fake, &objects)?;
    // A second connector: both are active, each edge carries the lease of
    // its first connector (rendezvous hashing on the names).
    let mut standby = serde_json::to_value(
        objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some("cloud-2"))
            .unwrap(),
    )?;
    standby["metadata"]["name"] = json!("cloud-9");
    standby["metadata"]["labels"][label::CONNECTOR] = json!("");
    standby["spec"] = json!({"podCIDR": "10.244.9.0/24"});
    standby["status"]["addresses"] = json!([{"type": "InternalIP", "address": "10.1.0.9"}]);
    // Its own Flannel lease (a copy of cloud-2's would make cloud-2's look
    // like a connector's masquerade lease, which the leader takes off).
    standby["metadata"]["annotations"][annotation::FLANNEL_BACKEND_DATA] =
        json!(r#"{"VtepMAC":"ce:0c:09:00:00:09"}"#);
    standby["metadata"]["annotations"][annotation::FLANNEL_PUBLIC_IP] = json!("10.1.0.9");
    fake.apply(&standby)?;
    let (lease, renew) = (Duration::from_secs(2), Duration::from_millis(400));

    let first = candidate(&fake, "cloud-1", lease, renew, None);
    eventually("cloud-1 holding the lease", Duration::from_secs(10), || {
        lease_holder(&fake).filter(|(h, _)| h == "cloud-1")
    })
    .await?;
    let second = candidate(&fake, "cloud-9", lease, renew, None);

    // The leader puts each edge's first connector's Flannel lease on it:
    // exactly the four annotations Flannel reads, parsed as Flannel would.
    // cloud-9 is a copy of cloud-2 with its own Flannel lease.
    let mut primaries = BTreeSet::new();
    for edge in ["edge-1", "edge-2", "edge-3"] {
        let primary = fabedge_agent::ha::order::primary(edge, ["cloud-1", "cloud-9"])
            .context("two connectors")?;
        primaries.insert(primary);
        let (mac, public_ip) = match primary {
            "cloud-1" => ([0xce, 0x0c, 1, 0, 0, 1], Ipv4Addr::new(10, 1, 0, 1)),
            _ => ([0xce, 0x0c, 9, 0, 0, 9], Ipv4Addr::new(10, 1, 0, 9)),
        };
        let got = eventually(
            &format!("Flannel annotations on {edge}"),
            Duration::from_secs(10),
            || {
                Some(annotations(&fake, edge))
                    .filter(|a| a.contains_key(annotation::FLANNEL_PUBLIC_IP))
            },
        )
        .await?;
        let keys: BTreeSet<&str> = got
            .keys()
            .map(String::as_str)
            .filter(|k| k.starts_with("flannel."))
            .collect();
        assert_eq!(
            keys,
            annotation::FLANNEL_LEASE.into_iter().collect(),
            "{edge}"
        );
        let lease = FlannelLease::from_annotations(&got)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .context("a lease")?;
        assert_eq!(lease.vtep_mac, mac, "{edge}: {primary}'s VtepMAC");
        assert_eq!(lease.public_ip, public_ip, "{edge}: {primary}'s public-ip");
        assert_eq!(got[annotation::FLANNEL_BACKEND_TYPE], "vxlan");
        assert_eq!(got[annotation::FLANNEL_KUBE_SUBNET_MANAGER], "true");
    }
    assert_eq!(primaries.len(), 2, "the edges spread over both connectors");
    let patches: Vec<Request> = fake
        .requests()
        .into_iter()
        .filter(|r| r.verb() == "patch")
        .collect();
    assert!(!patches.is_empty());
    for patch in &patches {
        assert_eq!(
            patch.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        let body = patch.body.as_ref().expect("a patch body");
        assert_eq!(
            body.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["metadata"],
            "touches annotations only"
        );
        assert_eq!(
            body["metadata"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["annotations"]
        );
    }
    // Cloud nodes and the connectors themselves are left alone.
    assert!(
        patches
            .iter()
            .all(|p| p.name.as_deref().is_some_and(|n| n.starts_with("edge-"))),
        "{patches:?}"
    );

    // The follower does not steal a lease that is being renewed.
    tokio::time::sleep(lease * 2).await;
    assert_eq!(lease_holder(&fake), Some(("cloud-1".into(), 0)));

    // The leader stops (no release: as if killed).
    first.kill();
    let stopped = Instant::now();
    eventually(
        "cloud-9 taking the lease over",
        Duration::from_secs(15),
        || lease_holder(&fake).filter(|(h, _)| h == "cloud-9"),
    )
    .await?;
    let took = stopped.elapsed();
    eprintln!(
        "takeover {took:?} after the leader stopped (lease {lease:?}, renew interval {renew:?})"
    );
    assert_eq!(
        lease_holder(&fake),
        Some(("cloud-9".into(), 1)),
        "one transition"
    );
    // Within the lease duration of the last renewal the follower saw, plus
    // the follower's own renew interval (when it next looks) and scheduling slack.
    assert!(
        took <= lease + renew * 2 + Duration::from_secs(1),
        "takeover took {took:?}"
    );

    // The new leader does the work: a node that stops being edge loses
    // exactly the four annotations, a new edge node gets them.
    let mut edge3 = fake.get("v1", "Node", None, "edge-3").context("edge-3")?;
    edge3["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(label::EDGE);
    fake.apply(&edge3)?;
    fake.apply(&edge_node("edge-4", "10.2.0.14", Some("10.234.4.0/24")))?;
    eventually(
        "edge-3 without Flannel annotations and edge-4 with them",
        Duration::from_secs(10),
        || {
            let e3 = annotations(&fake, "edge-3");
            let e4 = annotations(&fake, "edge-4");
            (annotation::FLANNEL_LEASE
                .iter()
                .all(|k| !e3.contains_key(*k))
                && annotation::FLANNEL_LEASE
                    .iter()
                    .all(|k| e4.contains_key(*k)))
            .then_some(())
        },
    )
    .await?;
    let removal = fake
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.verb() == "patch" && r.name.as_deref() == Some("edge-3"))
        .context("a patch of edge-3")?;
    let removed = removal.body.unwrap()["metadata"]["annotations"].clone();
    let expected: serde_json::Map<String, Value> = annotation::FLANNEL_LEASE
        .iter()
        .map(|k| (k.to_string(), Value::Null))
        .collect();
    assert_eq!(removed, Value::Object(expected));
    second.kill();
    assert_calls_are_declared(&fake.requests());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_edge_pod_cidrs_never_collide_and_survive_a_restart() -> Result<()> {
    let fake = FakeApi::start()?;
    let objects = fixture();
    // The connector and a cloud node with spec.podCIDRs (one inside the pool: never reallocated).
    for node in objects.nodes.iter().filter(|n| {
        n.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("cloud"))
    }) {
        fake.apply(&serde_json::to_value(node)?)?;
    }
    fake.apply(&edge_node(
        "edge-fixed",
        "10.2.1.250",
        Some("10.234.0.0/24"),
    ))?;
    let count = 500;
    for i in 0..count {
        fake.apply(&edge_node(
            &format!("edge-{i:03}"),
            &format!("10.3.{}.{}", i / 250, i % 250 + 1),
            None,
        ))?;
    }
    // 512 /24 blocks, one of them taken by edge-fixed: 511 free.
    let pool = Pool::new("10.234.0.0/15".parse()?, 24)?;
    let (lease, renew) = (Duration::from_secs(2), Duration::from_millis(400));

    let allocated = |fake: &FakeApi| -> BTreeMap<String, Ipv4Net> {
        fake.list("v1", "Node")
            .iter()
            .filter_map(|n| {
                let cidr = n["metadata"]["annotations"][annotation::POD_CIDR]
                    .as_str()?
                    .parse()
                    .ok()?;
                Some((n["metadata"]["name"].as_str()?.to_owned(), cidr))
            })
            .collect()
    };
    let leader = candidate(&fake, "cloud-1", lease, renew, Some(pool));
    let first = eventually("500 allocations", Duration::from_secs(60), || {
        Some(allocated(&fake)).filter(|a| a.len() == count)
    })
    .await?;
    let mut all: Vec<Ipv4Net> = first.values().copied().collect();
    all.push("10.234.0.0/24".parse()?);
    for (i, a) in all.iter().enumerate() {
        assert!(pool.cidr.contains(a) && a.prefix_len() == 24, "{a}");
        for b in &all[i + 1..] {
            assert!(
                !a.contains(&b.network()) && !b.contains(&a.network()),
                "{a} and {b} collide"
            );
        }
    }
    // Every allocated CIDR is also what the model now uses as the node's pod CIDR.
    let model = {
        let client = client(&fake);
        let source = KubeSource::start(client);
        eventually("a view of the cluster", Duration::from_secs(10), || {
            source.objects()
        })
        .await?
        .snapshot()?
    };
    for (node, cidr) in &first {
        assert_eq!(model.nodes[node].pod_cidr, Some(*cidr), "{node}");
    }
    // ... and the Node's spec.podCIDR, which Flannel on cloud nodes routes by.
    for n in fake.list("v1", "Node") {
        let Some(cidr) = first.get(n["metadata"]["name"].as_str().unwrap_or_default()) else {
            continue;
        };
        assert_eq!(
            n["spec"]["podCIDR"].as_str(),
            Some(cidr.to_string().as_str()),
            "{}",
            n["metadata"]["name"]
        );
        assert_eq!(n["spec"]["podCIDRs"], serde_json::json!([cidr.to_string()]));
    }

    // Restart: the state comes back from the annotations alone.
    leader.kill();
    // A request the old leader had on the wire is counted before the restart.
    tokio::time::sleep(renew).await;
    let patches_before = fake
        .requests()
        .iter()
        .filter(|r| r.verb() == "patch")
        .count();
    let leader = candidate(&fake, "cloud-1", lease, renew, Some(pool));
    fake.apply(&edge_node("edge-late", "10.2.1.251", None))?;
    let after = eventually("edge-late's allocation", Duration::from_secs(20), || {
        Some(allocated(&fake)).filter(|a| a.contains_key("edge-late"))
    })
    .await?;
    for (node, cidr) in &first {
        assert_eq!(
            after.get(node),
            Some(cidr),
            "{node} kept its CIDR across the restart"
        );
    }
    assert!(
        !all.iter()
            .any(|c| c.contains(&after["edge-late"].network())),
        "edge-late got a CIDR nobody holds"
    );
    let new_patches: Vec<String> = fake.requests()[..]
        .iter()
        .filter(|r| r.verb() == "patch")
        .skip(patches_before)
        .filter_map(|r| r.name.clone())
        .collect();
    assert_eq!(
        new_patches,
        ["edge-late"],
        "the restarted leader re-patched nothing else"
    );

    // Exhaustion: 10 free blocks left, 11 more nodes: the last is named in an Event.
    for i in 0..11 {
        fake.apply(&edge_node(
            &format!("edge-x{i:02}"),
            &format!("10.4.0.{}", i + 1),
            None,
        ))?;
    }
    fake.wait_for_requests(
        "an Event for the exhausted pool",
        Duration::from_secs(20),
        |requests| {
            requests.iter().any(|r| {
                r.verb() == "create"
                    && r.resource
                        .as_ref()
                        .is_some_and(|res| res.plural == "events")
                    && r.body.as_ref().is_some_and(|b| {
                        b["reason"] == "PodCIDRPoolExhausted"
                            && b["involvedObject"]["name"] == "edge-x10"
                            && b["message"]
                                .as_str()
                                .is_some_and(|m| m.contains("--edge-pod-cidr-pool"))
                    })
            })
        },
    )?;
    let finally = eventually(
        "the last free blocks allocated",
        Duration::from_secs(10),
        || Some(allocated(&fake)).filter(|a| a.len() == count + 1 + 10),
    )
    .await?;
    assert!(!finally.contains_key("edge-x10"));
    leader.kill();
    assert_calls_are_declared(&fake.requests());
    Ok(())
}

// ---------------------------------------------------------------------------
// The real agent binary against the fake API server, in a throwaway network
// namespace (the server listens on that namespace's loopback) with its own
// bpffs root; the maps are read with `fabedge-agent inspect routes --json`.

fn community(members: &[&str]) -> Value {
    json!({"apiVersion": "fabedge.io/v1alpha1", "kind": "Community", "metadata": {"name": "beijing"},
           "spec": {"members": members}})
}

#[test]
fn agent_maps_follow_the_api_and_a_relist_writes_nothing() -> Result<()> {
    let mut agent = KubeAgent::new("kube-maps")?;
    let fake = FakeApi::start_in(&agent.netns)?;
    publish(&fake, &fixture())?;
    fake.write_kubeconfig(&agent.kubeconfig())?;
    agent.start()?;
    // edge-2 is a community peer: its pod CIDR goes straight to its endpoint.
    agent.wait_routes("edge-2's pod CIDR", |r| r.contains_key("10.234.2.0/24"))?;

    // Added: a new community member gets a direct tunnel route.
    fake.apply(&edge_node("edge-9", "10.2.0.19", Some("10.234.9.0/24")))?;
    fake.apply(&community(&["edge-1", "edge-2", "edge-9"]))?;
    agent.wait_routes("edge-9's pod CIDR via its endpoint", |r| {
        r.get("10.234.9.0/24")
            .is_some_and(|hop| hop.contains("198.18.0.19"))
    })?;
    // Changed: edge-9 moves to another public address.
    fake.apply(&edge_node("edge-9", "10.2.0.29", Some("10.234.9.0/24")))?;
    agent.wait_routes("edge-9's new endpoint", |r| {
        r.get("10.234.9.0/24")
            .is_some_and(|hop| hop.contains("198.18.0.29"))
    })?;
    // Removed.
    fake.apply(&community(&["edge-1", "edge-2"]))?;
    fake.delete("v1", "Node", None, "edge-9")?;
    let settled = agent.wait_routes("edge-9 gone", |r| !r.contains_key("10.234.9.0/24"))?;

    // 410 Gone: every watcher relists; nothing is written to the maps.
    std::thread::sleep(Duration::from_millis(600));
    let applies = agent.applies();
    let lists = |requests: &[Request]| requests.iter().filter(|r| r.verb() == "list").count();
    let lists_before = lists(&fake.requests());
    fake.expire_watches();
    fake.wait_for_requests("relists after 410", Duration::from_secs(20), |r| {
        lists(r) >= lists_before + 4
    })?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        agent.routes()?,
        settled,
        "the maps are unchanged by the relist"
    );
    assert_eq!(
        agent.applies(),
        applies,
        "no map write after the relist:\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("ERROR fabedge_agent"),
        "every apply succeeded:\n{}",
        agent.log()
    );
    Ok(())
}

#[test]
fn api_down_keeps_the_datapath_and_a_restart_while_down_restores_it() -> Result<()> {
    let mut agent = KubeAgent::new("kube-down")?;
    let fake = FakeApi::start_in(&agent.netns)?;
    publish(&fake, &fixture())?;
    fake.write_kubeconfig(&agent.kubeconfig())?;
    agent.start()?;
    let online = agent.wait_routes("the first plan", |r| r.contains_key("10.234.2.0/24"))?;
    let saved = agent
        .dir
        .join("state")
        .join(fabedge_agent::source::last_good::FILE_NAME);
    // Saved right after the apply that filled the maps.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !saved.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = std::fs::metadata(&saved).with_context(|| {
        format!(
            "{} was not written; agent log:\n{}",
            saved.display(),
            agent.log()
        )
    })?;
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // The API server goes away: the watches fail, the datapath stays.
    fake.set_down(true);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agent.log().contains("failed"),
        "the agent noticed:\n{}",
        agent.log()
    );
    assert_eq!(
        agent.routes()?,
        online,
        "unchanged while the API server is unreachable"
    );

    // Restart while down, from an empty datapath: the saved state comes back.
    agent.stop();
    fabedge_tests::agent::agent_ok(
        Some(&agent.netns),
        &agent.root,
        &[
            "uninstall",
            "--cni-conf-dir",
            &agent.dir.join("cni").display().to_string(),
        ],
    )?;
    assert!(agent.routes()?.is_empty(), "uninstall emptied the datapath");
    fake.write_kubeconfig(&agent.kubeconfig())?;
    agent.start()?;
    agent.wait_routes("the saved state restored while offline", |r| *r == online)?;
    assert!(
        agent.log().contains("last good cluster state"),
        "{}",
        agent.log()
    );

    // The API server returns with a change: the agent reconciles.
    fake.set_down(false);
    fake.apply(&edge_node("edge-9", "10.2.0.19", Some("10.234.9.0/24")))?;
    fake.apply(&community(&["edge-1", "edge-2", "edge-9"]))?;
    agent.wait_routes("edge-9 after the API server returned", |r| {
        r.contains_key("10.234.9.0/24")
    })?;
    assert!(
        !agent.log().contains("ERROR fabedge_agent"),
        "every apply succeeded:\n{}",
        agent.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopping_gracefully_hands_the_lease_over_at_once() -> Result<()> {
    let fake = FakeApi::start()?;
    let objects = fixture();
    publish(&fake, &objects)?;
    let mut standby = serde_json::to_value(
        objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some("cloud-1"))
            .unwrap(),
    )?;
    standby["metadata"]["name"] = json!("cloud-9");
    fake.apply(&standby)?;
    // A lease far longer than the test waits: only a release explains a quick takeover.
    let (lease, renew) = (Duration::from_secs(60), Duration::from_millis(300));
    let first = candidate(&fake, "cloud-1", lease, renew, None);
    eventually("cloud-1 holding the lease", Duration::from_secs(10), || {
        lease_holder(&fake).filter(|(h, _)| h == "cloud-1")
    })
    .await?;
    let second = candidate(&fake, "cloud-9", lease, renew, None);
    tokio::time::sleep(renew * 3).await;
    assert_eq!(lease_holder(&fake).map(|h| h.0).as_deref(), Some("cloud-1"));

    first.stop_gracefully().await;
    eventually(
        "cloud-9 holding the released lease",
        Duration::from_secs(10),
        || lease_holder(&fake).filter(|(h, _)| h == "cloud-9"),
    )
    .await?;
    assert_eq!(lease_holder(&fake), Some(("cloud-9".into(), 1)));
    second.kill();
    assert_calls_are_declared(&fake.requests());
    Ok(())
}

#[test]
fn connector_agent_leads_writes_edge_annotations_and_releases_on_sigterm() -> Result<()> {
    let mut agent = KubeAgent::new("kube-conn")?;
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
    agent.node = "cloud-1".into();
    agent.extra_args = [
        "--uplink",
        "eth0",
        "--lease-duration",
        "3s",
        "--lease-renew-interval",
        "500ms",
        "--namespace",
        NAMESPACE,
    ]
    .map(String::from)
    .to_vec();
    let fake = FakeApi::start_in(&agent.netns)?;
    publish(&fake, &fixture())?;
    fake.write_kubeconfig(&agent.kubeconfig())?;
    agent.start()?;

    // Its datapath: edge-1's pod CIDR behind edge-1's tunnel endpoint.
    agent.wait_routes("edge-1's pod CIDR", |r| {
        r.get("10.234.1.0/24")
            .is_some_and(|hop| hop.contains("198.18.0.11"))
    })?;
    // Its cluster work: it took the Lease and annotated every edge Node.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let holder = lease_holder(&fake).map(|h| h.0);
        let annotated = ["edge-1", "edge-2", "edge-3"].iter().all(|n| {
            annotations(&fake, n)
                .get(annotation::FLANNEL_PUBLIC_IP)
                .map(String::as_str)
                == Some("10.1.0.1")
        });
        if holder.as_deref() == Some("cloud-1") && annotated {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "holder {holder:?}, edges annotated: {annotated}\nagent log:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let patched: BTreeSet<String> = fake
        .requests()
        .iter()
        .filter(|r| r.verb() == "patch")
        .filter_map(|r| r.name.clone())
        .collect();
    assert_eq!(
        patched,
        ["edge-1", "edge-2", "edge-3"].map(String::from).into(),
        "only edge Nodes are patched"
    );

    // SIGTERM: the lease is released for the next connector.
    agent.stop();
    let lease = fake
        .get("coordination.k8s.io/v1", "Lease", Some(NAMESPACE), LEASE)
        .context("the Lease")?;
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "released on SIGTERM: {lease:#}\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("ERROR fabedge_agent"),
        "{}",
        agent.log()
    );
    assert_calls_are_declared(&fake.requests());
    Ok(())
}
