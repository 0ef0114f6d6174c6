//! Control-plane scale in kube mode (issue #16): the Services of
//! [`super::scale`] ([`SERVICES`] Services of [`ENDPOINTS`] endpoints, one
//! EndpointSlice each) created in the in-test API server
//! ([`crate::apiserver`]) next to the mini cluster's Nodes and Community,
//! and a release agent on edge-1 watching them through a relay into its
//! namespace (admin credentials: RBAC is not what is measured).
//!
//! - `scale.kube.create_objects_s`: creating the Services and slices
//!   ([`IN_FLIGHT`] requests at a time; informational: the API server's
//!   cost, not the agent's);
//! - `scale.kube.full_sync_ms`, `scale.kube.rss_mb` (`.rss_anon_mb`,
//!   `.rss_file_mb`), `scale.kube.peak_rss_mb`,
//!   `scale.kube.idle_cpu_pct`: as in file mode, the sync from starting the
//!   agent (its first lists included) to the last Service's last backend in
//!   `FE_BACKENDS`; memory and idle CPU once the agent has finished that
//!   pass (see below);
//! - `scale.kube.endpoint_change_ms.{median,p99}`: [`CHANGES`] times, one
//!   endpoint address of one EndpointSlice replaced by a PATCH, timed from
//!   just before the request to the new address being in one of that
//!   Service's slots, read from the pinned maps in a tight loop. Each change
//!   waits until the agent has finished with the one before (no CPU used
//!   for [`QUIET`]), so a sample is one change, not a queue of them.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use fabedge_agent::source::manifest::EXAMPLE_CLUSTER;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};

use super::{
    edge_watch::{CREATE_CONCURRENCY as IN_FLIGHT, install_crd},
    report::Report,
    scale::{
        CHANGE_TIMEOUT, CHANGED, CHANGES, ENDPOINTS, Node, SERVICES, changed_address, cluster_ip,
        endpoint, record_changes, record_synced, release_agent_bin, wait_for_backend,
        wait_for_full_sync, wait_quiet,
    },
};
use crate::{
    agent::kube_edge_1,
    apiserver::{ApiServer, User, create_all},
};

/// The namespace of the generated Services.
const NAMESPACE: &str = "bench";
const KEYS: [&str; 9] = [
    "scale.kube.create_objects_s",
    "scale.kube.full_sync_ms",
    "scale.kube.rss_mb",
    "scale.kube.rss_anon_mb",
    "scale.kube.rss_file_mb",
    "scale.kube.peak_rss_mb",
    "scale.kube.idle_cpu_pct",
    "scale.kube.endpoint_change_ms.median",
    "scale.kube.endpoint_change_ms.p99",
];

/// The `scale-kube` section of `cargo xtask bench`.
pub fn run(report: &mut Report) -> Result<()> {
    println!();
    println!(
        "control plane at scale: {SERVICES} Services x {ENDPOINTS} endpoints, kube mode (in-test API server), release agent"
    );
    let bin = release_agent_bin()?;
    let server = match ApiServer::start() {
        Ok(server) => server,
        Err(e) => {
            println!("  skipped ({e:#})");
            for key in KEYS {
                report.unavailable(key);
            }
            return Ok(());
        }
    };
    install_crd(&server)?;
    server.apply_yaml(EXAMPLE_CLUSTER)?;
    server.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )?;
    let client = server.client();
    let started = Instant::now();
    server.block_on(create_services(&client))?;
    let created = started.elapsed().as_secs_f64();
    println!(
        "  {} Services and EndpointSlices created in {created:.1} s ({IN_FLIGHT} requests in flight)",
        SERVICES
    );
    report.record("scale.kube.create_objects_s", created);

    let node = Node::new("scale-kube")?;
    let relay = server.expose_in(&node.ns)?;
    let kubeconfig = node.work.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, &User::Admin, Some(relay.port))?;
    let started = Instant::now();
    let agent = node.spawn(kube_edge_1(
        &node.ns,
        &bin,
        &node.root,
        &node.work,
        &kubeconfig,
    )?)?;
    let maps = node.maps(&agent, started)?;
    wait_for_full_sync(&maps, &agent)?;
    let full_sync = started.elapsed();
    // The pass goes on after the maps (the saved state): idle is after it.
    wait_quiet(&agent)?;
    record_synced(report, "scale.kube", &agent, full_sync)?;

    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    let mut addresses: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|e| endpoint(CHANGED, e)).collect();
    let mut samples = Vec::with_capacity(CHANGES);
    for n in 0..CHANGES {
        addresses[0] = changed_address(n);
        // A merge patch replaces the whole list (it has no merge key).
        let patch = json!({"endpoints": endpoints(&addresses)});
        wait_quiet(&agent)?;
        let sent = Instant::now();
        server
            .block_on(slices.patch(
                &slice_name(CHANGED),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ))
            .with_context(|| format!("patching EndpointSlice {}", slice_name(CHANGED)))?;
        wait_for_backend(&maps, CHANGED, addresses[0], CHANGE_TIMEOUT, Duration::ZERO)
            .with_context(|| format!("change {n}\n{}", agent.log()))?;
        samples.push(sent.elapsed());
    }
    record_changes(report, "scale.kube", "PATCH to map entry", samples);
    drop(agent);
    Ok(())
}

fn slice_name(service: usize) -> String {
    format!("svc-{service}-a")
}

/// Endpoints of a slice: ready, on edge-2 (a community peer of edge-1).
fn endpoints(addresses: &[Ipv4Addr]) -> Value {
    addresses
        .iter()
        .map(|address| {
            json!({
                "addresses": [address.to_string()],
                "conditions": {"ready": true},
                "nodeName": "edge-2",
            })
        })
        .collect()
}

/// Service `service` and its EndpointSlice: the ones file mode's manifest holds.
fn service_objects(service: usize) -> Result<(Service, EndpointSlice)> {
    let ip = cluster_ip(service).to_string();
    let name = format!("svc-{service}");
    let addresses: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|e| endpoint(service, e)).collect();
    let object = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "clusterIP": ip, "clusterIPs": [ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(service), "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(&addresses),
    });
    Ok((
        serde_json::from_value(object)?,
        serde_json::from_value(slice)?,
    ))
}

/// Every Service, then every EndpointSlice.
async fn create_services(client: &Client) -> Result<()> {
    let (services, slices): (Vec<Service>, Vec<EndpointSlice>) = (0..SERVICES)
        .map(service_objects)
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    create_all(
        &Api::namespaced(client.clone(), NAMESPACE),
        services,
        IN_FLIGHT,
    )
    .await?;
    create_all(
        &Api::namespaced(client.clone(), NAMESPACE),
        slices,
        IN_FLIGHT,
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ipnet::Ipv4Net;

    use super::*;
    use crate::apiserver::SERVICE_CIDR;

    #[test]
    fn generated_cluster_ips_are_distinct_inside_the_api_servers_service_cidr_and_clear_of_the_fixture()
    -> Result<()> {
        let cidr: Ipv4Net = SERVICE_CIDR.parse()?;
        let fixture: Ipv4Net = "10.96.0.0/24".parse()?;
        let mut seen = BTreeSet::new();
        for s in 0..SERVICES {
            let (service, slice) = service_objects(s)?;
            let spec = service.spec.context("a spec")?;
            let ip: Ipv4Addr = spec.cluster_ip.context("a clusterIP")?.parse()?;
            assert!(
                cidr.contains(&ip) && !fixture.contains(&ip),
                "svc-{s}: {ip}"
            );
            assert!(seen.insert(ip), "svc-{s}: {ip} given twice");
            assert_eq!(slice.endpoints.unwrap_or_default().len(), ENDPOINTS);
        }
        Ok(())
    }
}
