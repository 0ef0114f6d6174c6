//! Traffic between endpoints of the cluster: ping, TCP and UDP echo exchanges and what the kernel
//! counted for them.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::netns::{Netns, PingResult, TcpEchoServer, UdpEchoServer, ping, tcp_echo, udp_echo};

use super::{
    ECHO_PORT, ECHO_TIMEOUT, MAX_TCP_RETRANSMISSIONS, PING_COUNT, PING_INTERVAL,
    PMTU_DISCOVERY_RETRANSMISSIONS, POLL, SETTLE_TIMEOUT, TCP_PAYLOAD_LEN, TCP_RTO_MIN,
    UDP_PAYLOAD_LEN,
};

// ---------------------------------------------------------------------------
// Endpoints: pods and hostNetwork endpoints, each with echo servers
// ---------------------------------------------------------------------------

/// Something traffic is sent from and to: a pod, or a node's hostNetwork
/// endpoint (the node's namespace, addressed at its InternalIP). It answers
/// ping and runs TCP and UDP echo servers on [`ECHO_PORT`].
pub struct Endpoint {
    label: String,
    ip: Ipv4Addr,
    // Servers before the namespace: their sockets close before it is deleted.
    tcp: TcpEchoServer,
    udp: UdpEchoServer,
    netns: Arc<Netns>,
}

impl Endpoint {
    /// Servers are bound to `ip` itself: replies then leave from the address
    /// the client talks to (an unbound UDP reply on a cloud node would take
    /// `flannel.1`'s address as its source, and the client would ignore it).
    pub(super) fn start(label: String, netns: Arc<Netns>, ip: Ipv4Addr) -> Result<Self> {
        quiet_tcp_timers(&netns).with_context(|| format!("{label}: TCP timers"))?;
        let address = SocketAddrV4::new(ip, ECHO_PORT);
        let tcp = TcpEchoServer::start(&netns, address)
            .with_context(|| format!("{label}: TCP echo server"))?;
        let udp = UdpEchoServer::start(&netns, address)
            .with_context(|| format!("{label}: UDP echo server"))?;
        Ok(Endpoint {
            label,
            ip,
            tcp,
            udp,
            netns,
        })
    }

    /// `edge-1 pod`, `cloud-2 node`.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// TCP connections and UDP datagrams its echo servers have answered
    /// (which backend of a Service served a client).
    pub fn requests_served(&self) -> u64 {
        self.tcp.requests_served() + self.udp.requests_served()
    }

    pub fn ping(&self, to: Ipv4Addr, count: u32) -> Result<PingResult> {
        ping(&self.netns, to, count, PING_INTERVAL)
            .with_context(|| format!("{} pinging {to}", self.label))
    }

    /// A 64 KiB TCP echo to `to` (connect to close), reply checked byte for
    /// byte, with what the ends' TCP/ICMP statistics say happened meanwhile.
    pub fn tcp_echo(&self, to: &Endpoint) -> Result<TcpEcho> {
        let payload = test_payload(TCP_PAYLOAD_LEN);
        let before = TransportStats::read(&self.netns)?.plus(TransportStats::read(&to.netns)?);
        let started = Instant::now();
        let reply = tcp_echo(&self.netns, to.tcp.local_addr(), &payload, ECHO_TIMEOUT)
            .with_context(|| format!("TCP echo {} → {}", self.label, to.label))?;
        let elapsed = started.elapsed();
        ensure!(
            reply == payload,
            "TCP echo {} → {}: sent {} bytes, got back {} different ones",
            self.label,
            to.label,
            payload.len(),
            reply.len()
        );
        let stats = || -> Result<TcpEcho> {
            let after = TransportStats::read(&self.netns)?.plus(TransportStats::read(&to.netns)?);
            Ok(TcpEcho {
                elapsed,
                retransmitted: after
                    .tcp_retransmitted
                    .saturating_sub(before.tcp_retransmitted),
                duplicates_reported: after
                    .tcp_dsack_received
                    .saturating_sub(before.tcp_dsack_received),
                loss_probes: after.tcp_loss_probes.saturating_sub(before.tcp_loss_probes),
                path_mtu_discovered: after.icmp_unreachable_received
                    > before.icmp_unreachable_received,
            })
        };
        // The echo is back when the client has the last byte; a D-SACK for
        // a tail segment the server sent again may still be on its way to
        // the server. Retransmissions beyond the allowance wait for it.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let echo = stats()?;
            if echo.excess_retransmissions().is_none() || Instant::now() >= deadline {
                return Ok(echo);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Round trip of one UDP datagram to `to`, reply checked byte for byte.
    pub fn udp_echo(&self, to: &Endpoint) -> Result<Duration> {
        let payload = test_payload(UDP_PAYLOAD_LEN);
        let started = Instant::now();
        let reply = udp_echo(&self.netns, to.udp.local_addr(), &payload, ECHO_TIMEOUT)
            .with_context(|| format!("UDP echo {} → {}", self.label, to.label))?;
        let elapsed = started.elapsed();
        ensure!(
            reply == payload,
            "UDP echo {} → {}: the reply differs from the request",
            self.label,
            to.label
        );
        Ok(elapsed)
    }

    /// Ping, TCP and UDP from here to `to`; every outcome is kept, failed or not.
    pub fn exchange(&self, to: &Endpoint) -> Exchange {
        let ping = self.ping(to.ip, PING_COUNT).and_then(|result| {
            if result.all_received() {
                Ok(result)
            } else {
                Err(anyhow!(
                    "ping {} → {} ({}): {result:?}",
                    self.label,
                    to.label,
                    to.ip
                ))
            }
        });
        Exchange {
            from: self.label.clone(),
            to: to.label.clone(),
            ping,
            tcp: self.tcp_echo(to),
            udp: self.udp_echo(to),
        }
    }
}

/// A stalled test machine (a descheduled TCG guest stops for up to a
/// second) must not make a TCP echo look lossy: no tail-loss probes, and no
/// retransmission timeout under [`TCP_RTO_MIN`] where the kernel lets a
/// namespace set it (6.11 on; 6.1 keeps 200 ms, and D-SACKs explain its
/// early retransmissions). A lost segment is still retransmitted, by fast
/// retransmit or the timeout, and counted.
fn quiet_tcp_timers(netns: &Netns) -> Result<()> {
    netns.set_sysctl("net.ipv4.tcp_early_retrans", "0")?;
    if netns.sysctl("net.ipv4.tcp_rto_min_us").is_ok() {
        let micros = TCP_RTO_MIN.as_micros().to_string();
        netns.set_sysctl("net.ipv4.tcp_rto_min_us", &micros)?;
    }
    Ok(())
}

/// The part of a namespace's `/proc/net/snmp` that explains a TCP echo. Only
/// the tests' own connections run in pod and node namespaces, so its growth
/// over an exchange belongs to that exchange.
#[derive(Debug, Clone, Copy)]
struct TransportStats {
    /// `Tcp: RetransSegs`.
    tcp_retransmitted: u64,
    /// `TcpExt: TCPDSACKRecvSegs` (`/proc/net/netstat`): segments the other
    /// end reported, by D-SACK, as arrived twice. Not `TCPDSACKRecv`, which
    /// counts ACKs: one D-SACK block covers every segment a receiver's GRO
    /// merged, so a stall's burst of early retransmissions is one ACK.
    tcp_dsack_received: u64,
    /// `TcpExt: TCPLossProbes`: tail-loss probes sent.
    tcp_loss_probes: u64,
    /// `Icmp: InDestUnreachs`, which counts fragmentation-needed.
    icmp_unreachable_received: u64,
}

impl TransportStats {
    fn read(netns: &Netns) -> Result<Self> {
        let (snmp, netstat) = netns.enter(|| {
            let read = |file: &str| {
                fs::read_to_string(format!("/proc/thread-self/net/{file}"))
                    .with_context(|| format!("reading /proc/thread-self/net/{file}"))
            };
            Ok((read("snmp")?, read("netstat")?))
        })?;
        let field = |protocol: &str, name: &str| -> Result<u64> {
            let prefix = format!("{protocol}:");
            let text = if protocol == "TcpExt" {
                &netstat
            } else {
                &snmp
            };
            let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
            let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
                bail!(
                    "netns {}: no {protocol} lines in /proc/net/snmp or netstat",
                    netns.name()
                );
            };
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == name)
                .and_then(|(_, value)| value.parse().ok())
                .with_context(|| {
                    format!(
                        "netns {}: no {protocol} {name} in /proc/net/snmp or netstat",
                        netns.name()
                    )
                })
        };
        Ok(TransportStats {
            tcp_retransmitted: field("Tcp", "RetransSegs")?,
            tcp_dsack_received: field("TcpExt", "TCPDSACKRecvSegs")?,
            tcp_loss_probes: field("TcpExt", "TCPLossProbes")?,
            icmp_unreachable_received: field("Icmp", "InDestUnreachs")?,
        })
    }

    fn plus(self, other: Self) -> Self {
        TransportStats {
            tcp_retransmitted: self.tcp_retransmitted + other.tcp_retransmitted,
            tcp_dsack_received: self.tcp_dsack_received + other.tcp_dsack_received,
            tcp_loss_probes: self.tcp_loss_probes + other.tcp_loss_probes,
            icmp_unreachable_received: self.icmp_unreachable_received
                + other.icmp_unreachable_received,
        }
    }
}

fn test_payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A TCP echo that got its bytes back.
#[derive(Debug, Clone, Copy)]
pub struct TcpEcho {
    pub elapsed: Duration,
    /// Segments either end retransmitted during the echo.
    pub retransmitted: u64,
    /// Of those, how many the other end reported receiving twice (D-SACK):
    /// sent again too early (a descheduled receiver's late ACK), not lost.
    pub duplicates_reported: u64,
    /// Tail-loss probes either end sent (counted in `retransmitted`).
    pub loss_probes: u64,
    /// An end received ICMP destination-unreachable meanwhile: path-MTU
    /// discovery toward a narrower tunnel, which costs retransmissions.
    pub path_mtu_discovered: bool,
}

impl TcpEcho {
    /// Retransmissions beyond what a lossless path explains: those the
    /// receiver reported as duplicates arrived, so only the others count.
    pub fn excess_retransmissions(&self) -> Option<u64> {
        let allowed = MAX_TCP_RETRANSMISSIONS
            + if self.path_mtu_discovered {
                PMTU_DISCOVERY_RETRANSMISSIONS
            } else {
                0
            };
        let unexplained = self.retransmitted.saturating_sub(self.duplicates_reported);
        (unexplained > allowed).then_some(unexplained)
    }
}

/// What ping, TCP echo and UDP echo from one endpoint to another did.
#[derive(Debug)]
pub struct Exchange {
    pub from: String,
    pub to: String,
    pub ping: Result<PingResult>,
    pub tcp: Result<TcpEcho>,
    pub udp: Result<Duration>,
}

impl Exchange {
    pub fn succeeded(&self) -> bool {
        self.failures().is_empty()
    }

    /// Average ping round trip, if every ping was answered.
    pub fn ping_rtt(&self) -> Option<Duration> {
        let rtts = &self.ping.as_ref().ok()?.rtts;
        let count = u32::try_from(rtts.len()).ok().filter(|n| *n > 0)?;
        Some(rtts.iter().sum::<Duration>() / count)
    }

    /// One line per failed check.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if let Err(e) = &self.ping {
            failures.push(format!("ping failed: {e:#}"));
        }
        match &self.tcp {
            Err(e) => failures.push(format!("TCP failed: {e:#}")),
            Ok(echo) => {
                if let Some(unexplained) = echo.excess_retransmissions() {
                    failures.push(format!(
                        "TCP needed {unexplained} retransmitted segments for a {} KiB echo on a lossless path{} \
                         ({} retransmitted, {} reported as duplicates, {} tail-loss probes): \
                         the path loses packets",
                        TCP_PAYLOAD_LEN / 1024,
                        if echo.path_mtu_discovered { " (path-MTU discovery included)" } else { "" },
                        echo.retransmitted,
                        echo.duplicates_reported,
                        echo.loss_probes,
                    ));
                }
            }
        }
        if let Err(e) = &self.udp {
            failures.push(format!("UDP failed: {e:#}"));
        }
        failures
    }
}
