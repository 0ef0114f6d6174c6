//! Every figure `cargo xtask bench` prints, under a stable key, for
//! `cargo xtask bench --json FILE`: one flat JSON object, keys sorted,
//! dotted by section (`datapath.verdict_ns.<case>`, `xdp.connector_mpps.<dir>.<size>.<variant>`).
//! A figure that could not be measured is `null`, never left out, so a
//! consumer can tell "not measured" from "renamed".

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{Context, Result};

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    figures: BTreeMap<String, Option<f64>>,
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `value` under `key` (a non-finite value is recorded as unavailable).
    pub fn record(&mut self, key: impl Into<String>, value: f64) {
        self.figures
            .insert(key.into(), value.is_finite().then_some(value));
    }

    /// Records that `key` could not be measured in this run.
    pub fn unavailable(&mut self, key: impl Into<String>) {
        self.figures.insert(key.into(), None);
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.get(key).copied().flatten()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.figures
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect(),
        )
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json())?;
        fs::write(path, text + "\n")
            .with_context(|| format!("writing the benchmark figures to {}", path.display()))
    }
}

/// A key segment from a human label: lowercase ASCII letters and digits,
/// every other run of characters one `_` ("edge: pod → peer pod (TTL,
/// redirect)" → "edge_pod_peer_pod_ttl_redirect").
pub fn key_part(label: &str) -> String {
    let mut out = String::with_capacity(label.len());
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_labels_are_stable_identifiers() {
        assert_eq!(
            key_part("edge: pod → peer pod (TTL, redirect)"),
            "edge_pod_peer_pod_ttl_redirect"
        );
        assert_eq!(
            key_part("connector: Flannel decap → tunnel"),
            "connector_flannel_decap_tunnel"
        );
    }

    #[test]
    fn unmeasured_figures_are_null_not_missing() {
        let mut report = Report::new();
        report.record("xdp.tcp_ratio_vs_kernel", 1.25);
        report.unavailable("xdp.connector_pps_ratio_vs_tc");
        report.record("x.nan", f64::NAN);
        let json = report.to_json();
        assert_eq!(json["xdp.tcp_ratio_vs_kernel"], serde_json::json!(1.25));
        assert!(json["xdp.connector_pps_ratio_vs_tc"].is_null());
        assert!(json.get("xdp.connector_pps_ratio_vs_tc").is_some());
        assert!(json["x.nan"].is_null());
    }
}
