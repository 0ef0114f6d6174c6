//! The checks of `model::checks` as a user meets them: a manifest with one
//! conflicting or unreadable object, through [`super::manifest::checked`].

use crate::{
    plan::DEFAULT_SERVICE_CIDR,
    source::manifest::{EXAMPLE_CLUSTER, checked},
};

fn edge(name: &str, cidr: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    \
         node-role.kubernetes.io/edge: \"\"\nspec:\n  podCIDR: {cidr}\nstatus:\n  addresses:\n    \
         - {{type: InternalIP, address: {ip}}}\n"
    )
}

fn service(name: &str, ip: &str, port: u16) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  \
         clusterIP: {ip}\n  ports:\n    - {{port: {port}, protocol: TCP, targetPort: 80}}\n"
    )
}

fn problems_of(extra: &str) -> (crate::source::Checked, Vec<String>) {
    let text = format!("{EXAMPLE_CLUSTER}\n{extra}");
    let checked = checked(&text, DEFAULT_SERVICE_CIDR).expect("a readable manifest");
    let problems = checked.problems.iter().map(|p| p.to_string()).collect();
    (checked, problems)
}

#[test]
fn the_example_cluster_has_no_problems() {
    let (checked, problems) = problems_of("");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(checked.snapshot.nodes.len(), 5);
}

#[test]
fn a_newer_node_overlapping_an_older_pod_cidr_is_left_out_and_the_rest_stays() {
    let (checked, problems) = problems_of(&edge("edge-9", "10.234.1.0/25", "10.2.0.99"));
    assert_eq!(
        problems,
        [
            "Node edge-9: spec.podCIDR 10.234.1.0/25 overlaps node edge-1's 10.234.1.0/24 (older, kept); \
          every node needs its own pod CIDR"
        ]
    );
    assert!(!checked.snapshot.nodes.contains_key("edge-9"));
    assert!(checked.snapshot.nodes.contains_key("edge-1"));
    assert_eq!(checked.snapshot.nodes.len(), 5);
}

#[test]
fn a_pod_cidr_covering_a_node_address_or_the_service_cidr_is_left_out() {
    let (_, problems) = problems_of(&edge("edge-9", "10.2.0.0/24", "10.2.0.99"));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("Node edge-9: spec.podCIDR 10.2.0.0/24 covers node edge-"),
        "{problems:?}"
    );
    let (_, problems) = problems_of(&edge("edge-9", "10.96.0.0/24", "10.2.0.99"));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("overlaps the Service CIDR 10.96.0.0/12"),
        "{problems:?}"
    );
}

#[test]
fn a_duplicate_internal_ip_leaves_the_newer_node_out() {
    let (_, problems) = problems_of(&edge("edge-9", "10.234.9.0/24", "10.2.0.11"));
    assert_eq!(
        problems,
        [
            "Node edge-9: InternalIP 10.2.0.11 is also node edge-1's (older, kept); every node needs \
          its own address"
        ]
    );
}

#[test]
fn services_sharing_a_cluster_ip_and_port_keep_the_older_one() {
    let extra = service("web-a", "10.96.5.5", 80) + &service("web-b", "10.96.5.5", 80);
    let (checked, problems) = problems_of(&extra);
    assert_eq!(
        problems,
        [
            "Service default/web-b: 10.96.5.5:80/Tcp is also Service default/web-a's (older, kept); two \
          Services cannot share a ClusterIP and port"
        ]
    );
    let names: Vec<_> = checked
        .snapshot
        .services
        .keys()
        .map(|k| k.name.as_str())
        .collect();
    assert!(
        names.contains(&"web-a") && !names.contains(&"web-b"),
        "{names:?}"
    );
    // Another port on the same address is no conflict.
    let extra = service("web-a", "10.96.5.5", 80) + &service("web-b", "10.96.5.5", 81);
    assert!(problems_of(&extra).1.is_empty());
}

#[test]
fn a_cluster_ip_outside_the_service_cidr_is_left_out() {
    let (_, problems) = problems_of(&service("odd", "192.0.2.7", 80));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with(
            "Service default/odd: spec.clusterIP 192.0.2.7 is outside the Service CIDR 10.96.0.0/12"
        ),
        "{problems:?}"
    );
}

#[test]
fn an_unreadable_document_is_left_out_with_its_place_and_the_rest_applies() {
    let extra = "---\napiVersion: v1\nkind: node\nmetadata:\n  name: edge-7\n---\n\
                 apiVersion: v1\nkind: Node\nmetadata:\n  name: edge-8\nspec:\n  podCIDR: 10.0.0.0/33\n";
    let (checked, problems) = problems_of(extra);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("(node edge-7)")
            && problems[0].contains("did you mean apiVersion v1, kind Node?"),
        "{problems:?}"
    );
    assert!(
        problems[1].starts_with("manifest doc 10 (Node edge-8) at line"),
        "{problems:?}"
    );
    assert_eq!(checked.snapshot.nodes.len(), 5);
}

#[test]
fn an_empty_file_is_an_error_not_an_empty_cluster() {
    let err = checked("# nothing here\n", DEFAULT_SERVICE_CIDR).unwrap_err();
    assert!(err.to_string().contains("holds no objects"), "{err}");
}
