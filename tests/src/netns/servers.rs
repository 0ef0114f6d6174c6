//! UDP and TCP echo servers inside a namespace, and the clients that check their replies.

use std::io::{self, ErrorKind, Read, Write};
use std::marker::PhantomData;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::namespace::Netns;
use super::{SERVER_POLL_INTERVAL, UDP_RESEND_INTERVAL};

// ---------------------------------------------------------------------------
// Traffic: UDP and TCP echo
// ---------------------------------------------------------------------------

/// Shared state of an echo server and its worker threads.
#[derive(Debug, Default)]
struct ServerState {
    stop: AtomicBool,
    served: AtomicU64,
}

/// An echo server in a namespace, bound to one address, served by a worker
/// thread. Stops (within 50 ms) when dropped. `P` is [`Udp`] or [`Tcp`].
#[derive(Debug)]
pub struct EchoServer<P> {
    local_addr: SocketAddrV4,
    state: Arc<ServerState>,
    worker: Option<JoinHandle<()>>,
    protocol: PhantomData<P>,
}

/// UDP echo: every datagram goes back to its sender.
#[derive(Debug)]
pub enum Udp {}
/// TCP echo: each connection gets back what it sends until it closes its side.
#[derive(Debug)]
pub enum Tcp {}

pub type UdpEchoServer = EchoServer<Udp>;
pub type TcpEchoServer = EchoServer<Tcp>;

impl<P> EchoServer<P> {
    fn running(local_addr: SocketAddrV4, state: Arc<ServerState>, worker: JoinHandle<()>) -> Self {
        EchoServer {
            local_addr,
            state,
            worker: Some(worker),
            protocol: PhantomData,
        }
    }

    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local_addr
    }

    /// UDP: datagrams echoed so far (a client may resend, so this can exceed
    /// the number of `udp_echo` calls). TCP: connections echoed to the end.
    pub fn requests_served(&self) -> u64 {
        self.state.served.load(Ordering::Relaxed)
    }
}

impl<P> Drop for EchoServer<P> {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl EchoServer<Udp> {
    /// Binds `address` inside `netns` (port 0 picks a free port, see `local_addr`).
    pub fn start(netns: &Netns, address: SocketAddrV4) -> Result<Self> {
        let socket = netns.enter(|| {
            UdpSocket::bind(address)
                .with_context(|| format!("binding UDP echo server to {address}"))
        })?;
        socket
            .set_read_timeout(Some(SERVER_POLL_INTERVAL))
            .context("setting UDP echo server read timeout")?;
        let local_addr = v4_local_addr(socket.local_addr())?;
        let state = Arc::new(ServerState::default());
        let worker_state = Arc::clone(&state);
        let worker = thread::spawn(move || {
            let mut buffer = vec![0u8; 65536];
            while !worker_state.stop.load(Ordering::Relaxed) {
                match socket.recv_from(&mut buffer) {
                    Ok((len, peer)) => {
                        // Counted before replying, so a client holding the reply sees it.
                        worker_state.served.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(&buffer[..len], peer);
                    }
                    Err(error) if is_timeout(&error) => {}
                    Err(error) => {
                        eprintln!("UDP echo server on {local_addr} stopped: {error}");
                        break;
                    }
                }
            }
        });
        Ok(Self::running(local_addr, state, worker))
    }
}

/// Sends `payload` from inside `from` to a UDP echo server and returns the reply. The
/// request is resent every 250 ms until a reply arrives from `server` itself (the socket
/// is connected, so replies from any other address are ignored) or `timeout` passes.
pub fn udp_echo(
    from: &Netns,
    server: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    from.enter(|| {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
            .context("binding UDP client")?;
        socket
            .connect(server)
            .with_context(|| format!("connecting UDP client to {server}"))?;
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 65536];
        let mut attempts = 0;
        while let Some(remaining) = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
        {
            socket
                .send(payload)
                .with_context(|| format!("sending {} bytes to {server}", payload.len()))?;
            attempts += 1;
            socket
                .set_read_timeout(Some(remaining.min(UDP_RESEND_INTERVAL)))
                .context("setting read timeout")?;
            match socket.recv(&mut buffer) {
                Ok(len) => return Ok(buffer[..len].to_vec()),
                Err(error) if is_timeout(&error) => {}
                Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
                    bail!("{server} answered ICMP port unreachable: no UDP server listens there")
                }
                Err(error) => {
                    return Err(anyhow!(error).context(format!("receiving from {server}")));
                }
            }
        }
        bail!("no UDP echo from {server} within {timeout:?} ({attempts} requests sent)")
    })
}

impl EchoServer<Tcp> {
    /// Listens on `address` inside `netns` (port 0 picks a free port, see `local_addr`).
    pub fn start(netns: &Netns, address: SocketAddrV4) -> Result<Self> {
        let listener = netns.enter(|| {
            TcpListener::bind(address)
                .with_context(|| format!("binding TCP echo server to {address}"))
        })?;
        // Non-blocking accept lets the thread notice `stop` between connections.
        listener
            .set_nonblocking(true)
            .context("making TCP echo listener non-blocking")?;
        let local_addr = v4_local_addr(listener.local_addr())?;
        let state = Arc::new(ServerState::default());
        let acceptor_state = Arc::clone(&state);
        let acceptor = thread::spawn(move || {
            let mut connections = Vec::new();
            while !acceptor_state.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _peer)) => {
                        let connection_state = Arc::clone(&acceptor_state);
                        connections.push(thread::spawn(move || {
                            echo_connection(stream, &connection_state)
                        }));
                    }
                    Err(error) if is_timeout(&error) => thread::sleep(Duration::from_millis(5)),
                    Err(error) => {
                        eprintln!("TCP echo server on {local_addr} stopped accepting: {error}");
                        break;
                    }
                }
            }
            for connection in connections {
                let _ = connection.join();
            }
        });
        Ok(Self::running(local_addr, state, acceptor))
    }
}

/// Echoes one connection until the peer closes its side or the server stops.
fn echo_connection(mut stream: TcpStream, state: &ServerState) {
    // Accepted sockets may inherit non-blocking mode; poll with a short timeout instead.
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(SERVER_POLL_INTERVAL)).is_err()
    {
        return;
    }
    let mut buffer = vec![0u8; 65536];
    while !state.stop.load(Ordering::Relaxed) {
        match stream.read(&mut buffer) {
            Ok(0) => {
                state.served.fetch_add(1, Ordering::Relaxed);
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(len) => {
                if stream.write_all(&buffer[..len]).is_err() {
                    return;
                }
            }
            Err(error) if is_timeout(&error) => {}
            Err(_) => return,
        }
    }
}

/// Connects from inside `from` to a TCP echo server, sends `payload`, closes the sending
/// side and returns everything received until the server closes. The whole exchange
/// must finish within `timeout`.
pub fn tcp_echo(
    from: &Netns,
    server: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    from.enter(|| {
        let deadline = Instant::now() + timeout;
        let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(server), timeout)
            .with_context(|| {
                format!("connecting to TCP echo server {server} (timeout {timeout:?})")
            })?;
        stream
            .set_write_timeout(Some(timeout))
            .context("setting write timeout")?;
        let mut sender = stream
            .try_clone()
            .context("cloning the TCP stream for sending")?;
        // Send and receive at once: a payload larger than the socket buffers would
        // otherwise deadlock, with both sides blocked writing.
        thread::scope(|scope| {
            let sending = scope.spawn(move || -> Result<()> {
                sender
                    .write_all(payload)
                    .with_context(|| format!("sending {} bytes to {server}", payload.len()))?;
                sender
                    .shutdown(Shutdown::Write)
                    .context("closing the sending side")
            });
            let received = read_until_closed(&mut stream, server, deadline, timeout);
            let sent = sending
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            sent?;
            received
        })
    })
}

/// Reads `stream` until the peer closes it, failing at `deadline`.
fn read_until_closed(
    stream: &mut TcpStream,
    server: SocketAddrV4,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let mut reply = Vec::new();
    let mut buffer = vec![0u8; 65536];
    loop {
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .with_context(|| {
                format!(
                    "TCP echo from {server} incomplete after {timeout:?}: {} bytes",
                    reply.len()
                )
            })?;
        stream
            .set_read_timeout(Some(remaining))
            .context("setting read timeout")?;
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(reply),
            Ok(len) => reply.extend_from_slice(&buffer[..len]),
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(anyhow!(error).context(format!("reading echo from {server}"))),
        }
    }
}

pub(super) fn is_timeout(error: &io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn v4_local_addr(address: io::Result<SocketAddr>) -> Result<SocketAddrV4> {
    match address.context("reading the bound address")? {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(v6) => bail!("expected an IPv4 socket, got {v6}"),
    }
}
