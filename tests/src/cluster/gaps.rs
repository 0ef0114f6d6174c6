//! A ping-gap meter: echo requests every 10 ms from one endpoint to another for as long as a test
//! runs something, and the longest silence between replies (how long a failover cut the path).

use std::{
    io, mem,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};

use crate::packet::internet_checksum;

use super::traffic::Endpoint;

/// The probe rate for a failover measurement: one request every 10 ms.
pub const GAP_PING_INTERVAL: Duration = Duration::from_millis(10);
/// How long replies are still awaited after the last request.
const REPLY_GRACE: Duration = Duration::from_secs(1);
const RECV_TIMEOUT: Duration = Duration::from_millis(50);
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
/// Payload: the 32-bit sequence (the ICMP one wraps after 655 s at 10 ms)
/// and padding to ping's default 56 bytes.
const PAYLOAD_LEN: usize = 56;

/// An echo reply: the request's sequence and when the reply arrived.
type Reply = (u32, Instant);

/// Tells meters running at once (and their replies) apart.
static NEXT_IDENTIFIER: AtomicU16 = AtomicU16::new(0);

/// Echo requests from an endpoint every `interval` until [`GapMeter::stop`],
/// each reply's arrival time recorded. A raw ICMP socket in the sender's
/// namespace (ping sockets are off in fresh namespaces), so timing is ours,
/// not `ping`'s, and nothing is parsed.
pub struct GapMeter {
    label: String,
    stop: Arc<AtomicBool>,
    started: Instant,
    /// Arrival of the latest reply, in nanoseconds after `started` (0: none yet).
    last_reply: Arc<AtomicU64>,
    sender: Option<JoinHandle<Result<Vec<Instant>>>>,
    receiver: Option<JoinHandle<Result<Vec<Reply>>>>,
}

impl GapMeter {
    /// Starts pinging `to` from `from`; `label` names the direction in
    /// reports (`edge-1 pod → cloud-2 pod`).
    pub fn start(from: &Endpoint, to: &Endpoint, interval: Duration) -> Result<GapMeter> {
        Self::start_to(from, to.ip(), to.label(), interval)
    }

    /// [`GapMeter::start`] toward an address that `to_label` names.
    pub fn start_to(
        from: &Endpoint,
        destination: Ipv4Addr,
        to_label: &str,
        interval: Duration,
    ) -> Result<GapMeter> {
        let label = format!("{} → {to_label}", from.label());
        let socket = from
            .netns()
            .enter(open_icmp_socket)
            .with_context(|| format!("{label}: opening a raw ICMP socket"))?;
        let socket = Arc::new(socket);
        let identifier = (std::process::id() as u16)
            .wrapping_mul(31)
            .wrapping_add(NEXT_IDENTIFIER.fetch_add(1, Ordering::Relaxed));
        let stop = Arc::new(AtomicBool::new(false));
        let sending = Arc::new(AtomicBool::new(true));
        let last_reply = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let receiver = {
            let (socket, stop, sending, last_reply) = (
                Arc::clone(&socket),
                Arc::clone(&stop),
                Arc::clone(&sending),
                Arc::clone(&last_reply),
            );
            thread::spawn(move || {
                receive_replies(&socket, destination, identifier, &stop, &sending, |at| {
                    let nanos = at.saturating_duration_since(started).as_nanos();
                    last_reply.store(
                        u64::try_from(nanos).unwrap_or(u64::MAX).max(1),
                        Ordering::Relaxed,
                    );
                })
            })
        };
        let sender = {
            let (stop, label) = (Arc::clone(&stop), label.clone());
            thread::spawn(move || {
                let sent =
                    send_requests(&socket, destination, identifier, interval, started, &stop);
                sending.store(false, Ordering::Relaxed);
                sent.with_context(|| format!("{label}: sending echo requests"))
            })
        };
        Ok(GapMeter {
            label,
            stop,
            started,
            last_reply,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// When the latest reply arrived, if any did.
    pub fn last_reply(&self) -> Option<Instant> {
        match self.last_reply.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(self.started + Duration::from_nanos(nanos)),
        }
    }

    /// The direction (`edge-1 pod → cloud-2 pod`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Stops sending, waits up to a second for replies in flight, and returns
    /// what was measured.
    pub fn stop(self) -> Result<PingGaps> {
        let stopped = self.halt();
        self.collect(stopped)
    }

    /// Tells the sender to stop; returns when.
    fn halt(&self) -> Instant {
        self.stop.store(true, Ordering::Relaxed);
        Instant::now()
    }

    /// Waits for the threads of a halted meter and returns what they saw.
    fn collect(mut self, stopped: Instant) -> Result<PingGaps> {
        let sends = join(self.sender.take(), &self.label)?;
        let replies = join(self.receiver.take(), &self.label)?;
        let mut reply_times: Vec<Option<Instant>> = vec![None; sends.len()];
        for (sequence, at) in replies {
            if let Some(slot) = reply_times.get_mut(sequence as usize) {
                // Duplicates count once: the first arrival.
                slot.get_or_insert(at);
            }
        }
        Ok(PingGaps {
            label: self.label.clone(),
            started: self.started,
            stopped,
            sends,
            replies: reply_times,
        })
    }
}

impl Drop for GapMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}

/// Two [`GapMeter`]s at once, `a → b` and `b → a` (the edge pod →
/// cloud pod and cloud pod → edge pod).
pub struct BothWays {
    forward: GapMeter,
    backward: GapMeter,
}

impl BothWays {
    pub fn start(a: &Endpoint, b: &Endpoint) -> Result<BothWays> {
        Ok(BothWays {
            forward: GapMeter::start(a, b, GAP_PING_INTERVAL)?,
            backward: GapMeter::start(b, a, GAP_PING_INTERVAL)?,
        })
    }

    /// Whether both directions have had a reply after `since`.
    pub fn both_replied_since(&self, since: Instant) -> bool {
        [&self.forward, &self.backward]
            .iter()
            .all(|meter| meter.last_reply().is_some_and(|at| at > since))
    }

    /// (`a → b`, `b → a`), both stopped at the same moment.
    pub fn stop(self) -> Result<(PingGaps, PingGaps)> {
        let stopped = self.forward.halt();
        self.backward.halt();
        Ok((
            self.forward.collect(stopped)?,
            self.backward.collect(stopped)?,
        ))
    }
}

fn join<T>(handle: Option<JoinHandle<Result<T>>>, label: &str) -> Result<T> {
    handle
        .with_context(|| format!("{label}: the meter was stopped twice"))?
        .join()
        .map_err(|_| anyhow!("{label}: a meter thread panicked"))?
}

/// What a [`GapMeter`] saw.
#[derive(Debug, Clone)]
pub struct PingGaps {
    /// The direction (`edge-1 pod → cloud-2 pod`).
    pub label: String,
    pub started: Instant,
    pub stopped: Instant,
    /// When each request went out, by sequence.
    sends: Vec<Instant>,
    /// When its reply arrived, by sequence.
    replies: Vec<Option<Instant>>,
}

impl PingGaps {
    pub fn sent(&self) -> usize {
        self.sends.len()
    }

    pub fn received(&self) -> usize {
        self.replies.iter().flatten().count()
    }

    pub fn lost(&self) -> usize {
        self.sent() - self.received()
    }

    /// When each unanswered request went out, after the start.
    pub fn lost_sends(&self) -> Vec<Duration> {
        self.sends
            .iter()
            .zip(&self.replies)
            .filter(|(_, reply)| reply.is_none())
            .map(|(sent, _)| sent.saturating_duration_since(self.started))
            .collect()
    }

    /// The longest round trip of an answered request.
    pub fn slowest_reply(&self) -> Option<Duration> {
        self.sends
            .iter()
            .zip(&self.replies)
            .filter_map(|(sent, reply)| Some(reply.as_ref()?.saturating_duration_since(*sent)))
            .max()
    }

    /// Requests sent in `[from, to)` that got no reply.
    pub fn lost_sent_between(&self, from: Instant, to: Instant) -> usize {
        self.sends
            .iter()
            .zip(&self.replies)
            .filter(|(sent, reply)| **sent >= from && **sent < to && reply.is_none())
            .count()
    }

    /// Requests sent in `[from, to)`.
    pub fn sent_between(&self, from: Instant, to: Instant) -> usize {
        self.sends
            .iter()
            .filter(|sent| **sent >= from && **sent < to)
            .count()
    }

    /// The longest time without a reply between the start and the stop of
    /// the meter (the start and the stop count as replies: a path that never
    /// answers, or stops answering for good, shows the whole silence), and
    /// when it began, measured from the start.
    pub fn longest_gap(&self) -> (Duration, Duration) {
        self.longest_gap_between(self.started, self.stopped)
    }

    /// [`PingGaps::longest_gap`] within `[from, to]`.
    pub fn longest_gap_between(&self, from: Instant, to: Instant) -> (Duration, Duration) {
        let mut arrivals: Vec<Instant> = self
            .replies
            .iter()
            .flatten()
            .copied()
            .filter(|at| *at > from && *at < to)
            .collect();
        arrivals.sort();
        let mut previous = from;
        let mut longest = (Duration::ZERO, Duration::ZERO);
        for at in arrivals.into_iter().chain([to]) {
            let gap = at.saturating_duration_since(previous);
            if gap > longest.0 {
                longest = (gap, previous.saturating_duration_since(self.started));
            }
            previous = at;
        }
        longest
    }

    /// `edge-1 pod → cloud-2 pod: longest gap 412 ms (at 3.02 s), 38 of 612 lost`.
    pub fn summary(&self) -> String {
        let (gap, at) = self.longest_gap();
        format!(
            "{}: longest gap {} ms (at {:.2} s), {} of {} lost",
            self.label,
            gap.as_millis(),
            at.as_secs_f64(),
            self.lost(),
            self.sent()
        )
    }
}

fn open_icmp_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(anyhow!(io::Error::last_os_error()).context("socket(AF_INET, SOCK_RAW, ICMP)"));
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: RECV_TIMEOUT.as_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value points at a timeval of the size passed.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set < 0 {
        return Err(anyhow!(io::Error::last_os_error()).context("SO_RCVTIMEO on the ICMP socket"));
    }
    Ok(socket)
}

fn echo_request(identifier: u16, sequence: u32) -> Vec<u8> {
    let mut message = vec![0u8; 8 + PAYLOAD_LEN];
    message[0] = ICMP_ECHO_REQUEST;
    message[4..6].copy_from_slice(&identifier.to_be_bytes());
    message[6..8].copy_from_slice(&(sequence as u16).to_be_bytes());
    message[8..12].copy_from_slice(&sequence.to_be_bytes());
    for (i, byte) in message[12..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    let checksum = internet_checksum(&message);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    message
}

/// Sends on a fixed schedule (`started + n × interval`), so a late wake-up
/// does not stretch the schedule; returns each request's send time.
fn send_requests(
    socket: &OwnedFd,
    destination: Ipv4Addr,
    identifier: u16,
    interval: Duration,
    started: Instant,
    stop: &AtomicBool,
) -> Result<Vec<Instant>> {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut address: libc::sockaddr_in = unsafe { mem::zeroed() };
    address.sin_family = libc::AF_INET as libc::sa_family_t;
    address.sin_addr.s_addr = u32::from(destination).to_be();
    let mut sends = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let sequence = u32::try_from(sends.len()).context("too many echo requests")?;
        let message = echo_request(identifier, sequence);
        let at = Instant::now();
        // SAFETY: message and address outlive the call; lengths match.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&raw const address).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        // A dead next hop makes sendto fail (EHOSTUNREACH after failed ARP,
        // ENETUNREACH while routes are gone): a request lost, not an error.
        if sent < 0 {
            let error = io::Error::last_os_error();
            let kind = error.raw_os_error().unwrap_or(0);
            ensure!(
                [
                    libc::EHOSTUNREACH,
                    libc::ENETUNREACH,
                    libc::EHOSTDOWN,
                    libc::ENOBUFS,
                    libc::EPERM
                ]
                .contains(&kind),
                "sendto {destination}: {error}"
            );
        }
        sends.push(at);
        let next = started + interval * (sequence + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    Ok(sends)
}

/// Collects (sequence, arrival) of the echo replies from `from` carrying
/// `identifier`, until sending has stopped and [`REPLY_GRACE`] has passed.
fn receive_replies(
    socket: &OwnedFd,
    from: Ipv4Addr,
    identifier: u16,
    stop: &AtomicBool,
    sending: &AtomicBool,
    mut on_reply: impl FnMut(Instant),
) -> Result<Vec<Reply>> {
    let mut replies = Vec::new();
    let mut buffer = [0u8; 2048];
    let mut grace_ends: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) && !sending.load(Ordering::Relaxed) {
            let ends = *grace_ends.get_or_insert_with(|| Instant::now() + REPLY_GRACE);
            if Instant::now() >= ends {
                return Ok(replies);
            }
        }
        // SAFETY: the buffer is valid for its length.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        let at = Instant::now();
        if received < 0 {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => {
                    continue;
                }
                _ => return Err(anyhow!(error).context("receiving echo replies")),
            }
        }
        if let Some(sequence) = parse_reply(&buffer[..received as usize], from, identifier) {
            on_reply(at);
            replies.push((sequence, at));
        }
    }
}

/// The sequence of an echo reply from `from` with `identifier` (a raw ICMP
/// socket gets the IPv4 header too, and every ICMP message of the namespace).
fn parse_reply(packet: &[u8], from: Ipv4Addr, identifier: u16) -> Option<u32> {
    let header_len = usize::from(packet.first()? & 0x0f) * 4;
    let source = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(header_len..)?;
    if source != from || *icmp.first()? != ICMP_ECHO_REPLY {
        return None;
    }
    if u16::from_be_bytes([*icmp.get(4)?, *icmp.get(5)?]) != identifier {
        return None;
    }
    Some(u32::from_be_bytes(icmp.get(8..12)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(replies_ms: &[Option<u64>], stop_ms: u64) -> PingGaps {
        let started = Instant::now();
        let at = |ms: u64| started + Duration::from_millis(ms);
        PingGaps {
            label: "a → b".into(),
            started,
            stopped: at(stop_ms),
            sends: (0..replies_ms.len() as u64).map(|i| at(i * 10)).collect(),
            replies: replies_ms.iter().map(|r| r.map(at)).collect(),
        }
    }

    #[test]
    fn the_longest_gap_is_the_longest_silence_between_replies() {
        let measured = gaps(&[Some(1), Some(11), None, None, Some(41), Some(51)], 60);
        assert_eq!(
            measured.longest_gap(),
            (Duration::from_millis(30), Duration::from_millis(11))
        );
        assert_eq!(
            (measured.sent(), measured.received(), measured.lost()),
            (6, 4, 2)
        );
        let start = measured.started;
        assert_eq!(
            measured.lost_sent_between(start + Duration::from_millis(30), measured.stopped),
            1
        );
    }

    #[test]
    fn a_path_that_never_comes_back_shows_the_silence_up_to_the_stop() {
        let measured = gaps(&[Some(1), None, None], 500);
        assert_eq!(measured.longest_gap().0, Duration::from_millis(499));
        assert_eq!(
            gaps(&[None, None], 20).longest_gap().0,
            Duration::from_millis(20)
        );
    }

    #[test]
    fn replies_are_matched_by_source_identifier_and_sequence() {
        let mut packet = vec![
            0x45, 0, 0, 84, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        let mut reply = echo_request(7, 70_000);
        reply[0] = ICMP_ECHO_REPLY;
        packet.extend(&reply);
        let from = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(parse_reply(&packet, from, 7), Some(70_000));
        assert_eq!(parse_reply(&packet, from, 8), None);
        assert_eq!(parse_reply(&packet, Ipv4Addr::new(10, 0, 0, 3), 7), None);
        assert_eq!(parse_reply(&packet[..30], from, 7), None);
    }
}
