//! An agent's `/metrics`, `/healthz` and `/readyz` as a client inside a
//! node's namespace sees them, and a real Prometheus (Debian's
//! `prometheus`) scraping an agent there and answering PromQL over its
//! HTTP API.
//!
//! Prometheus runs in the node's namespace (the agent may serve on
//! loopback) with a generated config, its own storage directory and a free
//! port; it is killed and its directory removed on drop, also after a
//! panic. Directories a killed run left behind are removed by the next
//! [`Prometheus::start`].

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{BackgroundProcess, Netns};

/// Where Debian's package installs it (`cargo xtask setup`).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// How often the generated config scrapes.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// How long Prometheus may take to open its storage and serve.
const PROMETHEUS_READY_TIMEOUT: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
const LEFTOVER_PREFIX: &str = "fabedge-prometheus-";

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

/// `GET path` from inside `netns`. HTTP/1.0, so the body ends at the close
/// (no chunked encoding to undo).
pub fn http_get(netns: &Netns, address: SocketAddrV4, path: &str) -> Result<HttpReply> {
    let request_path = path.to_owned();
    netns
        .enter(move || {
            let path = request_path;
            let mut stream = TcpStream::connect_timeout(&address.into(), HTTP_TIMEOUT)?;
            stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
            stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw)?;
            let text = String::from_utf8_lossy(&raw);
            let (head, body) = text
                .split_once("\r\n\r\n")
                .with_context(|| format!("no end of headers in {text:?}"))?;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("no status in {head:?}"))?;
            Ok(HttpReply {
                status,
                body: body.to_owned(),
            })
        })
        .with_context(|| format!("GET http://{address}{path}"))
}

/// The value of the sample of `family` whose labels include every pair of
/// `labels`, in a text exposition page.
pub fn sample(page: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().find_map(|line| {
        let rest = line.strip_prefix(family)?;
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.rsplit_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            })
            .then(|| value.trim().parse().ok())?
    })
}

/// A port nobody in `netns` listens on now.
pub fn free_port(netns: &Netns) -> Result<u16> {
    netns.enter(|| Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()))
}

/// A Prometheus server in a node's namespace. Killed on drop.
pub struct Prometheus<'ns> {
    process: Option<BackgroundProcess>,
    netns: &'ns Netns,
    address: SocketAddrV4,
    dir: PathBuf,
}

/// One series of an instant vector: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl<'ns> Prometheus<'ns> {
    /// Starts Prometheus in `netns` scraping `targets` (addresses as seen
    /// from `netns`) every [`SCRAPE_INTERVAL`] as job `fabedge`, and waits
    /// until it serves.
    pub fn start(netns: &'ns Netns, targets: &[SocketAddrV4]) -> Result<Self> {
        ensure!(
            std::path::Path::new(PROMETHEUS_BIN).exists(),
            "{PROMETHEUS_BIN} is missing: run `cargo xtask setup` (installs Debian's prometheus)"
        );
        remove_leftovers();
        let dir = std::env::temp_dir().join(format!(
            "{LEFTOVER_PREFIX}{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let secs = SCRAPE_INTERVAL.as_secs().max(1);
        let config = format!(
            "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\n  evaluation_interval: {secs}s\n\
             scrape_configs:\n  - job_name: fabedge\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        fs::write(&config_path, config)?;
        let port = free_port(netns)?;
        let address = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        let mut prometheus = Prometheus {
            process: None,
            netns,
            address,
            dir,
        };
        let args = [
            format!("--config.file={}", config_path.display()),
            format!(
                "--storage.tsdb.path={}",
                prometheus.dir.join("data").display()
            ),
            format!("--web.listen-address={address}"),
            "--log.level=warn".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        prometheus.process = Some(netns.spawn(PROMETHEUS_BIN, &args)?);
        prometheus.wait_ready()?;
        Ok(prometheus)
    }

    pub fn address(&self) -> SocketAddrV4 {
        self.address
    }

    /// What Prometheus printed so far.
    pub fn log(&self) -> String {
        self.process.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + PROMETHEUS_READY_TIMEOUT;
        loop {
            if let Some(process) = self.process.as_mut() {
                process.ensure_running()?;
            }
            if let Ok(reply) = http_get(self.netns, self.address, "/-/ready")
                && reply.status == 200
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "prometheus did not serve /-/ready on {} within {PROMETHEUS_READY_TIMEOUT:?}; its log:\n{}",
                    self.address,
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// An instant query (`/api/v1/query`) evaluated now.
    pub fn query(&self, promql: &str) -> Result<Vec<Series>> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let reply = http_get(self.netns, self.address, &path)?;
        let json: serde_json::Value = serde_json::from_str(&reply.body)
            .with_context(|| format!("prometheus answered {promql:?} with {:?}", reply.body))?;
        ensure!(
            reply.status == 200 && json["status"] == "success",
            "prometheus refused {promql:?} ({}): {}",
            reply.status,
            reply.body
        );
        let mut out = Vec::new();
        for series in json["data"]["result"].as_array().into_iter().flatten() {
            let labels = series["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no value in {series}"))?;
            out.push(Series { labels, value });
        }
        Ok(out)
    }

    /// The one value `promql` evaluates to, once `accept` takes it; polls
    /// until `timeout`, then fails with the last answer.
    pub fn wait_for_value(
        &self,
        promql: &str,
        timeout: Duration,
        accept: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.query(promql);
            if let Ok([series]) = answer.as_deref()
                && accept(series.value)
            {
                return Ok(series.value);
            }
            if Instant::now() >= deadline {
                bail!(
                    "prometheus never gave an acceptable value for {promql:?} within {timeout:?}; last answer: {answer:?}\nits log:\n{}",
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        // Killed and reaped before its storage goes.
        drop(self.process.take());
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: removing {}: {e}", self.dir.display());
        }
    }
}

/// Storage directories of runs whose process is gone.
fn remove_leftovers() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(LEFTOVER_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Everything but RFC 3986's unreserved characters, percent-encoded.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_family_and_labels() {
        let page = "# HELP fabedge_drops_total x\n# TYPE fabedge_drops_total counter\n\
                    fabedge_drops_total{reason=\"drop_malformed\"} 1\n\
                    fabedge_drops_total{reason=\"drop_no_route\"} 7\n\
                    fabedge_drops_total_extra 9\n\
                    fabedge_ready 1\n";
        assert_eq!(
            sample(page, "fabedge_drops_total", &[("reason", "drop_no_route")]),
            Some(7.0)
        );
        assert_eq!(sample(page, "fabedge_ready", &[]), Some(1.0));
        assert_eq!(
            sample(page, "fabedge_drops_total", &[("reason", "drop_spoofed")]),
            None
        );
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            percent_encode("fabedge_drops_total{reason=\"drop_no_route\"}"),
            "fabedge_drops_total%7Breason%3D%22drop_no_route%22%7D"
        );
    }
}
