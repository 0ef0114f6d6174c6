use super::*;
use crate::source::manifest::{EXAMPLE_CLUSTER, snapshot};

const KEEPALIVE: Duration = Duration::from_secs(1);

fn intro(node: &str, endpoint: &str) -> Introduction {
    Introduction {
        node: node.into(),
        endpoint: endpoint.parse().unwrap(),
    }
}

/// What `Punch::introduce` returns for a peer now at `endpoint`.
fn moved_to(peer: &str, endpoint: &str) -> (String, (Ipv4Addr, u16)) {
    let at: SocketAddrV4 = endpoint.parse().unwrap();
    (peer.to_owned(), (*at.ip(), at.port()))
}

fn all(_: &str) -> bool {
    true
}

#[test]
fn a_punched_peer_is_relayed_until_both_ends_hear_each_other_and_again_when_hellos_stop() {
    let mut punch = Punch::new(KEEPALIVE);
    let t0 = Instant::now();
    let moved = punch.introduce("cloud-1", &[intro("edge-2", "198.18.0.251:4500")], all, t0);
    assert_eq!(moved, [moved_to("edge-2", "198.18.0.251:4500")]);
    assert_eq!(
        punch.view()["edge-2"],
        Punched {
            endpoint: (Ipv4Addr::new(198, 18, 0, 251), 4500),
            direct: false
        },
        "relayed until proven"
    );
    assert!(punch.settle(all, t0).is_empty());
    assert!(!punch.heard_you("edge-2", t0));

    // We hear it, but it does not hear us yet: still relayed; our hellos
    // now say we hear it (at once: the flag changed).
    let t1 = t0 + Duration::from_millis(300);
    assert!(punch.heard("edge-2", false, t1));
    assert!(punch.heard_you("edge-2", t1));
    assert!(punch.settle(all, t1).is_empty());
    assert!(!punch.heard("edge-2", false, t1), "flag unchanged");

    // It hears us: direct.
    let t2 = t1 + KEEPALIVE;
    punch.heard("edge-2", true, t2);
    assert_eq!(
        punch.settle(all, t2),
        [Change::Direct {
            peer: "edge-2".into(),
            endpoint: (Ipv4Addr::new(198, 18, 0, 251), 4500)
        }]
    );
    assert!(punch.view()["edge-2"].direct);
    assert!(punch.settle(all, t2).is_empty(), "said once");

    // One lost hello is not enough to give up; a window of silence is.
    let t3 = t2 + KEEPALIVE * 2;
    assert!(punch.settle(all, t3).is_empty());
    let t4 = t2 + punch.window();
    assert!(matches!(
        punch.settle(all, t4).as_slice(),
        [Change::Relayed { peer, why }] if peer == "edge-2" && why.contains("no hello")
    ));
    assert!(!punch.view()["edge-2"].direct);
    assert!(!punch.heard_you("edge-2", t4));

    // Hellos again, but it stopped hearing us: still relayed.
    let t5 = t4 + KEEPALIVE;
    punch.heard("edge-2", false, t5);
    assert!(punch.settle(all, t5).is_empty());
}

#[test]
fn introductions_move_expire_and_only_name_our_community_peers() {
    let mut punch = Punch::new(KEEPALIVE);
    let t0 = Instant::now();
    let ours = |name: &str| name == "edge-2";
    let moved = punch.introduce(
        "cloud-1",
        &[
            intro("edge-2", "198.18.0.251:4500"),
            intro("edge-3", "198.18.0.252:4500"),
        ],
        ours,
        t0,
    );
    assert_eq!(
        moved,
        [moved_to("edge-2", "198.18.0.251:4500")],
        "edge-3 is not our community peer"
    );
    assert!(!punch.contains("edge-3"));
    assert!(
        punch
            .introduce("cloud-1", &[intro("edge-2", "198.18.0.251:4500")], ours, t0)
            .is_empty(),
        "a repeated introduction moves nothing"
    );
    punch.heard("edge-2", true, t0);
    punch.settle(ours, t0);
    assert!(punch.view()["edge-2"].direct);

    // Its NAT moved: the new endpoint is taken, and the path stays as the
    // hellos prove it.
    let t1 = t0 + KEEPALIVE;
    assert_eq!(
        punch.introduce(
            "cloud-1",
            &[intro("edge-2", "198.18.0.251:31000")],
            ours,
            t1
        ),
        [moved_to("edge-2", "198.18.0.251:31000")]
    );
    assert_eq!(
        punch.view()["edge-2"].endpoint,
        (Ipv4Addr::new(198, 18, 0, 251), 31000)
    );

    // Another connector sees another port (a symmetric NAT shows each its
    // own): ignored while cloud-1's keep coming, taken once they stopped.
    let other = [intro("edge-2", "198.18.0.251:40000")];
    assert!(punch.introduce("cloud-9", &other, ours, t1).is_empty());
    assert_eq!(punch.view()["edge-2"].endpoint.1, 31000);
    let quiet = t1 + punch.window();
    assert_eq!(
        punch.introduce("cloud-9", &other, ours, quiet),
        [moved_to("edge-2", "198.18.0.251:40000")]
    );
    assert_eq!(punch.view()["edge-2"].endpoint.1, 40000);
    assert!(
        punch
            .introduce(
                "cloud-1",
                &[intro("edge-2", "198.18.0.251:31000")],
                ours,
                quiet
            )
            .is_empty(),
        "cloud-9's are followed now"
    );

    // Not repeated for the ttl: forgotten.
    let late = quiet + punch.introduction_ttl();
    assert_eq!(
        punch.settle(ours, late),
        [Change::Forgotten {
            peer: "edge-2".into()
        }]
    );
    assert!(punch.view().is_empty());

    // Left the community: forgotten at once.
    punch.introduce(
        "cloud-1",
        &[intro("edge-2", "198.18.0.251:4500")],
        ours,
        late,
    );
    assert_eq!(
        punch.settle(|_| false, late),
        [Change::Forgotten {
            peer: "edge-2".into()
        }]
    );
}

#[test]
fn the_connector_introduces_community_edges_behind_different_nats_only() {
    // beijing = [edge-1, edge-2]; edge-3 is in no community.
    let snapshot = snapshot(EXAMPLE_CLUSTER).unwrap();
    let at = |s: &str| -> (Ipv4Addr, u16) {
        let a: SocketAddrV4 = s.parse().unwrap();
        (*a.ip(), a.port())
    };
    let mut observed = super::super::plan::ObservedEndpoints::new();
    observed.insert("edge-1".into(), at("198.18.0.250:4500"));
    observed.insert("edge-3".into(), at("198.18.0.252:4500"));
    assert!(
        introductions(&snapshot, &observed).is_empty(),
        "edge-2 not seen yet"
    );

    observed.insert("edge-2".into(), at("198.18.0.251:1024"));
    let out = introductions(&snapshot, &observed);
    assert_eq!(
        out.keys().collect::<Vec<_>>(),
        ["edge-1", "edge-2"],
        "{out:?}"
    );
    assert_eq!(out["edge-1"].0, "198.18.0.250:4500".parse().unwrap());
    assert_eq!(
        out["edge-1"].1,
        [intro("edge-2", "198.18.0.251:1024")],
        "sent to edge-1 where its NAT shows it"
    );
    assert_eq!(out["edge-2"].1, [intro("edge-1", "198.18.0.250:4500")]);

    // Behind one NAT: they reach each other on their site.
    observed.insert("edge-2".into(), at("198.18.0.250:1024"));
    assert!(introductions(&snapshot, &observed).is_empty());

    // Seen at its own address (no NAT): reached as before.
    let own = snapshot.nodes["edge-2"].tunnel_endpoint;
    observed.insert("edge-2".into(), (own, 4500));
    assert!(introductions(&snapshot, &observed).is_empty());
}
