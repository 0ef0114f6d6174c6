//! An edge watches only what it needs, against a real kube-apiserver
//! (`fabedge_tests::apiserver`; `cargo xtask setup` builds it): a Node
//! change outside its community and its connectors reaches it not at all,
//! a change of a community peer or a connector does, and a Node joining its
//! community is watched as soon as the Community says so (one leaving it,
//! no longer).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fabedge_agent::source::{
    Objects,
    kube::{KubeSource, NodeView, NodeWatch},
};
use fabedge_tests::{
    apiserver::ApiServer,
    bench::edge_watch::{
        SimulatedCluster, change_nodes, create_nodes, edge_watches, install_crd, watch_traffic,
    },
};

/// A small cluster on a fresh server: 2 connectors, 30 edges, community
/// `site-0` = edge-0..edge-2.
fn small_cluster() -> Result<(ApiServer, SimulatedCluster)> {
    let server = ApiServer::start()?;
    let cluster = SimulatedCluster::new(2, 30, 3);
    server.block_on(create_nodes(&server.client(), cluster.nodes()))?;
    install_crd(&server)?;
    server.apply(&cluster.community_object())?;
    Ok((server, cluster))
}

#[test]
fn an_edge_receives_no_event_for_nodes_outside_its_community_and_every_peer_change() -> Result<()> {
    let (server, cluster) = small_cluster()?;
    let client = server.client();
    let outsiders: Vec<&str> = cluster.outsiders().map(String::as_str).collect();
    let fences = cluster.fence_nodes();
    let watches = edge_watches(&cluster)?;
    assert_eq!(
        watches.len(),
        4,
        "its own Node, the connectors, two peers: {watches:?}"
    );

    server.block_on(async {
        // Every Node watched (as before): each change is one event.
        let all = [NodeWatch::All].into();
        let before = watch_traffic(
            &client,
            &all,
            &fences,
            change_nodes(&client, &outsiders, 10),
        )
        .await?;
        assert_eq!(before.events, 10, "{before:?}");

        let outside = watch_traffic(
            &client,
            &watches,
            &fences,
            change_nodes(&client, &outsiders, 10),
        )
        .await?;
        assert_eq!((outside.events, outside.bytes), (0, 0), "{outside:?}");

        let peer = cluster.community[1].as_str();
        let connector = cluster.connectors[1].as_str();
        let inside = watch_traffic(
            &client,
            &watches,
            &fences,
            change_nodes(&client, &[peer, connector], 2),
        )
        .await?;
        assert_eq!(
            inside.events, 2,
            "{peer} and {connector} changed once each: {inside:?}"
        );
        anyhow::Ok(())
    })
}

/// Waits until `source`'s Nodes are `names` (sorted).
async fn wait_for_nodes(source: &mut KubeSource, names: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let node_names = |objects: &Objects| -> Vec<String> {
        objects
            .nodes
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect()
    };
    loop {
        let seen = source.objects().map(|o| node_names(&o));
        if seen.as_deref().is_some_and(|seen| seen == names) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, source.changed()).await.is_err() {
            bail!("the edge's Nodes are {seen:?}, not {names:?}");
        }
    }
}

/// Node watches open on the server now (its `apiserver_longrunning_requests`,
/// which count its own too).
async fn node_watches_open(client: &kube::Client) -> Result<u64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let metrics = client.request_text(request).await?;
    let open = metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_longrunning_requests{"))
        .filter(|l| l.contains(r#"resource="nodes""#) && l.contains(r#"verb="WATCH""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Ok(open as u64)
}

/// Waits until the server holds `count` Node watches.
async fn wait_for_node_watches(client: &kube::Client, count: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open = node_watches_open(client).await?;
        if open == count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the server holds {open} Node watches, not {count}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_node_joining_the_community_is_watched_by_its_peers_and_one_leaving_is_dropped() -> Result<()> {
    let (server, cluster) = small_cluster()?;
    let view = NodeView::OwnCommunity {
        me: cluster.me().to_owned(),
        role_override: None,
    };
    let client = server.client();
    // The API server's own Node informers.
    let baseline = server.block_on(node_watches_open(&client))?;
    let mut source = server.block_on(async { KubeSource::start_viewing(server.client(), view) });
    let mut expected = vec!["connector-0", "connector-1", "edge-0", "edge-1", "edge-2"];
    server.block_on(wait_for_nodes(&mut source, &expected))?;
    // One watch each: its own Node, the connectors, edge-1, edge-2; none of every Node.
    server.block_on(wait_for_node_watches(&client, baseline + 4))?;

    // edge-17 joins site-0, edge-1 leaves it.
    let mut joined = cluster.community_object();
    joined["spec"]["members"] = serde_json::json!(["edge-0", "edge-2", "edge-17"]);
    server.apply(&joined)?;
    expected = vec!["connector-0", "connector-1", "edge-0", "edge-17", "edge-2"];
    server.block_on(wait_for_nodes(&mut source, &expected))?;

    // One watch each: its own Node, the connectors, edge-2, edge-17
    // (edge-1's is closed).
    server.block_on(wait_for_node_watches(&client, baseline + 4))?;

    // The newcomer's changes now reach the edge.
    let watches = server.block_on(async {
        let own = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .get(cluster.me())
            .await?;
        let communities = [serde_json::from_value(joined.clone())?];
        let view = NodeView::OwnCommunity {
            me: cluster.me().to_owned(),
            role_override: None,
        };
        anyhow::Ok(view.watches(Some(&own), &communities))
    })?;
    let fences = ["edge-0", "edge-2", "edge-17", "connector-0"];
    let traffic = server.block_on(watch_traffic(
        &client,
        &watches,
        &fences,
        change_nodes(&client, &["edge-17", "edge-1"], 2),
    ))?;
    assert_eq!(traffic.events, 1, "edge-17's change only: {traffic:?}");
    // A stopped source leaves no watch behind.
    drop(source);
    server.block_on(wait_for_node_watches(&client, baseline))
}
