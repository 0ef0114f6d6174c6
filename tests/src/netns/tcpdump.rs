//! `tcpdump` writing a capture file inside a namespace: what left a node on
//! the wire, read back with pcap filters.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{namespace::Netns, process::BackgroundProcess};

static NEXT_CAPTURE: AtomicU32 = AtomicU32::new(0);

/// How long tcpdump may take to open its interface (long: under qemu TCG it is slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running capture; killed and its file removed on drop.
pub struct Tcpdump {
    /// Held for its drop, which stops the capture.
    _process: BackgroundProcess,
    file: PathBuf,
}

impl Tcpdump {
    /// Starts capturing on `iface` ("any" for every interface) of `netns`,
    /// `snaplen` bytes per packet, and returns once tcpdump says it is
    /// listening (its socket is bound: every later packet is captured).
    pub fn start(netns: &Netns, iface: &str, snaplen: u32) -> Result<Self> {
        let file = std::env::temp_dir().join(format!(
            "fabedge-capture-{}-{}.pcap",
            std::process::id(),
            NEXT_CAPTURE.fetch_add(1, Ordering::Relaxed)
        ));
        let mut process = netns.spawn(
            "tcpdump",
            &[
                "-i",
                iface,
                "-n",
                "-U",
                "-s",
                &snaplen.to_string(),
                "-w",
                &file.display().to_string(),
            ],
        )?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !process.log().contains("listening on") {
            process.ensure_running()?;
            if Instant::now() > deadline {
                bail!(
                    "tcpdump on {iface} in {} did not start listening within {START_TIMEOUT:?}: {}",
                    netns.name(),
                    process.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Tcpdump {
            _process: process,
            file,
        })
    }

    /// The packets captured so far that match pcap `filter`, one line each.
    pub fn packets(&self, filter: &str) -> Result<Vec<String>> {
        let out = Command::new("tcpdump")
            .args(["-r", &self.file.display().to_string(), "-n", filter])
            .output()
            .context("running tcpdump -r")?;
        ensure!(
            out.status.success(),
            "tcpdump -r {} {filter:?} failed: {}",
            self.file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Waits until a packet matching `filter` has been captured (a marker
    /// sent after the packets a test looks for: once it is in the file, so
    /// is everything sent before it on the same link), up to `timeout`.
    pub fn wait_for(&self, filter: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.packets(filter)?.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no packet matching {filter:?} was captured within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        // The process is killed when its handle drops; the file goes here.
        let _ = std::fs::remove_file(&self.file);
    }
}
