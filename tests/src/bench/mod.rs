//! Pieces of `cargo xtask bench` (`src/bin/fabedge-bench.rs`) that are more
//! than a table of cases: the figures' JSON keys and the connector's packet
//! rate per datapath variant, edge receive with XDP, connector failover
//! and probe cost, the control plane at 10 k Services in file and kube mode,
//! and the watch traffic an edge receives per Node change
//! in a large cluster.

pub mod connector;
pub mod edge_rx;
pub mod edge_watch;
pub mod ha;
pub mod report;
pub mod scale;
pub mod scale_kube;

use anyhow::{Result, anyhow, bail, ensure};

/// The benchmark's sections, in the order they run.
pub const SECTIONS: [&str; 8] = [
    "verdicts",
    "edge-tunnel",
    "connector",
    "edge-rx",
    "ha",
    "scale",
    "scale-kube",
    "edge-watch",
];

/// `fabedge-bench [--json FILE] [--only SECTION[,SECTION]]`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub json: Option<std::path::PathBuf>,
    pub only: Vec<String>,
}

impl Options {
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            json: None,
            only: Vec::new(),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--json" => {
                    let path = args
                        .next()
                        .ok_or_else(|| anyhow!("--json needs a file name"))?;
                    options.json = Some(path.into());
                }
                "--only" => {
                    let list = args
                        .next()
                        .ok_or_else(|| anyhow!("--only needs sections: {}", SECTIONS.join(",")))?;
                    for section in list.split(',') {
                        ensure!(
                            SECTIONS.contains(&section),
                            "--only: unknown section {section:?}; known: {}",
                            SECTIONS.join(", ")
                        );
                        options.only.push(section.to_owned());
                    }
                }
                other => bail!(
                    "unknown argument {other:?}; usage: fabedge-bench [--json FILE] [--only {}]",
                    SECTIONS.join(",")
                ),
            }
        }
        Ok(options)
    }

    /// Whether `section` runs (all do without `--only`).
    pub fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options> {
        Options::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn options_select_sections_and_the_json_file() -> Result<()> {
        let options = parse(&["--json", "out.json", "--only", "connector,verdicts"])?;
        assert_eq!(options.json, Some("out.json".into()));
        assert!(options.runs("connector") && options.runs("verdicts"));
        assert!(!options.runs("edge-tunnel"));
        assert!(parse(&[])?.runs("edge-tunnel"));
        let error = parse(&["--only", "xdp"]).unwrap_err().to_string();
        assert!(error.contains("unknown section \"xdp\""), "{error}");
        Ok(())
    }
}
