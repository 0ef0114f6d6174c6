//! `ping` from a namespace and the parsing of its summary (iputils and busybox).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::COMMAND_TIMEOUT;
use super::commands::command_line;
use super::namespace::Netns;

// ---------------------------------------------------------------------------
// Traffic: ping
// ---------------------------------------------------------------------------

/// What `ping` reported.
#[derive(Debug, Clone, PartialEq)]
pub struct PingResult {
    pub sent: u32,
    pub received: u32,
    /// Round-trip times of the replies, in arrival order.
    pub rtts: Vec<Duration>,
}

impl PingResult {
    /// At least one request went out and every one was answered.
    pub fn all_received(&self) -> bool {
        self.sent > 0 && self.received >= self.sent
    }
}

/// How to ping; [`ping`] covers the common case.
#[derive(Debug, Clone, PartialEq)]
pub struct PingOptions {
    pub count: u32,
    pub interval: Duration,
    /// ICMP data bytes (`-s`); ping's default of 56 if `None`.
    pub payload_size: Option<u16>,
    /// Set DF and forbid local fragmentation (`-M do`), for path-MTU tests.
    pub dont_fragment: bool,
}

impl Default for PingOptions {
    fn default() -> Self {
        Self {
            count: 3,
            interval: Duration::from_millis(200),
            payload_size: None,
            dont_fragment: false,
        }
    }
}

/// Pings `destination` from inside `from`: exactly `count` requests, one every
/// `interval`, waiting at most a second for the last reply.
pub fn ping(
    from: &Netns,
    destination: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<PingResult> {
    ping_with(
        from,
        destination,
        &PingOptions {
            count,
            interval,
            ..PingOptions::default()
        },
    )
}

pub fn ping_with(from: &Netns, destination: Ipv4Addr, options: &PingOptions) -> Result<PingResult> {
    ensure!(
        options.count >= 1,
        "ping count must be at least 1 (0 would ping forever)"
    );
    ensure!(
        options.interval >= Duration::from_millis(2),
        "ping interval {:?} is below the 2 ms iputils allows",
        options.interval
    );
    // -c with -W sends exactly `count` requests and then waits -W seconds at most for a
    // missing reply. (-w would keep sending until `count` replies or the deadline.)
    let count = options.count.to_string();
    let interval = format!("{:.3}", options.interval.as_secs_f64());
    let destination_text = destination.to_string();
    let size;
    let mut args = vec!["-n", "-c", &count, "-i", &interval, "-W", "1"];
    if let Some(payload_size) = options.payload_size {
        size = payload_size.to_string();
        args.extend(["-s", &size]);
    }
    if options.dont_fragment {
        args.extend(["-M", "do"]);
    }
    args.push(&destination_text);
    let expected_run_time = options.interval * options.count + Duration::from_secs(1);
    // A hang guard, not a measurement: under qemu TCG on a loaded machine
    // ping's timer-driven interval stretches well past the nominal one.
    let output = from.exec_bounded("ping", &args, expected_run_time * 2 + COMMAND_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // ping exits 1 when replies are missing (a result, not a failure) and 2 on errors.
    if !matches!(output.status.code(), Some(0 | 1)) {
        bail!(
            "`{}` in netns {} failed ({}): {} {}",
            command_line("ping", &args),
            from.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            stdout.trim()
        );
    }
    parse_ping_output(&stdout)
        .with_context(|| format!("ping {destination} from netns {}", from.name()))
}

/// Reads the reply lines and summary of iputils or busybox `ping`.
pub fn parse_ping_output(stdout: &str) -> Result<PingResult> {
    let summary = stdout
        .lines()
        .find(|line| line.contains("packets transmitted"))
        .with_context(|| format!("ping printed no \"packets transmitted\" summary:\n{stdout}"))?;
    // iputils: "3 packets transmitted, 3 received, ..."; busybox: "..., 3 packets received, ..."
    let mut counts = summary
        .split(',')
        .map(|part| part.split_whitespace().next().and_then(|n| n.parse().ok()));
    let sent = counts
        .next()
        .flatten()
        .with_context(|| format!("no sent count in ping summary {summary:?}"))?;
    let received = counts
        .next()
        .flatten()
        .with_context(|| format!("no received count in ping summary {summary:?}"))?;
    let rtts = stdout
        .lines()
        .filter_map(|line| line.split_once("time=").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|millis| millis.parse::<f64>().ok())
        .map(|millis| Duration::from_secs_f64(millis / 1000.0))
        .collect();
    Ok(PingResult {
        sent,
        received,
        rtts,
    })
}
