//! One agent applies on a node at a time, and a restart hands over without
//! a moment in which no process holds UDP 4500.
//!
//! The new agent starts before the old one exits (the DaemonSet's
//! `maxSurge: 1`, or by hand: start the new one, wait for it to stand by,
//! then stop the old one). In ESP mode it first binds UDP 4500 beside the
//! old agent's socket (`SO_REUSEPORT`, both with `UDP_ENCAP_ESPINUDP`: the
//! kernel decapsulates on either), then waits for the lock on
//! `<state-dir>/agent.lock`, which an agent holds for as long as it lives.
//! Meanwhile it reads no socket, writes no state, loads and attaches
//! nothing: the old agent goes on alone. When the old one exits (SIGTERM)
//! the kernel releases its lock and the new one takes over: metrics port,
//! datapath, apply.
//!
//! Stopping first and starting after (no overlap) still works, but ESP in
//! UDP arriving between the two meets a port without a socket and is
//! dropped by the kernel: only the overlap makes a restart lossless.

use std::{
    fs::{File, OpenOptions},
    future::Future,
    io::{Read, Seek, Write},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use log::{info, warn};

/// The lock file in the state dir; it holds the pid of the agent that applies.
pub const LOCK_FILE: &str = "agent.lock";

/// What `run` logs when it stands by; the test harness waits for it before
/// it stops the old agent.
pub const STANDING_BY: &str = "standing by";

/// How long a port held by something that takes no part in the handover (an
/// agent of a version before it, during an upgrade) is waited for before the
/// start fails: the old pod goes once the new one is Ready.
pub const PORT_WAIT: Duration = Duration::from_secs(60);
const PORT_RETRY: Duration = Duration::from_millis(100);

/// This agent's turn: the lock, held until the process exits.
pub struct NodeLock {
    _file: File,
}

/// Take the node's lock, waiting (standing by) while another agent holds it.
/// `Ok(None)`: `stop` completed first (told to stop while standing by).
pub async fn wait_for_turn(
    state_dir: &Path,
    holds: &str,
    stop: impl Future<Output = ()>,
) -> Result<Option<NodeLock>> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state dir {}", state_dir.display()))?;
    let path = state_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if !flock(&file, libc::LOCK_EX | libc::LOCK_NB)
        .with_context(|| format!("locking {}", path.display()))?
    {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        info!(
            "{STANDING_BY}: {holds}; waiting for the agent that applies on this node (pid {}) to exit",
            if holder.is_empty() { "?" } else { holder }
        );
        // flock blocks: on a thread of its own, which the process's exit ends
        // if the wait is cut short by `stop`.
        let (send, receive) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("fe-handover".into())
            .spawn(move || {
                let locked = flock(&file, libc::LOCK_EX).map(|_| file);
                let _ = send.send(locked);
            })
            .context("starting the handover thread")?;
        tokio::select! {
            locked = receive => {
                file = locked
                    .context("the handover thread ended")?
                    .with_context(|| format!("locking {}", path.display()))?;
                info!("taking over from pid {}", if holder.is_empty() { "?" } else { holder });
            }
            () = stop => {
                info!("stopping while standing by: the agent that applies stays");
                return Ok(None);
            }
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing our pid into {}", path.display()))?;
    Ok(Some(NodeLock { _file: file }))
}

/// `flock(2)`: `Ok(false)` when `LOCK_NB` finds the lock taken.
fn flock(file: &File, operation: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on an fd the File keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(error),
        }
    }
}

/// `bind()`, tried again while its port is in use, for at most [`PORT_WAIT`]:
/// a process that takes no part in the handover (an agent of an earlier
/// version, during an upgrade) may hold it until it is told to go.
pub async fn bind_when_free<T>(what: &str, mut bind: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + PORT_WAIT;
    let mut said = false;
    loop {
        match bind() {
            Err(e) if in_use(&e) && Instant::now() < deadline => {
                if !said {
                    warn!(
                        "{what}: {e:#}; waiting up to {PORT_WAIT:?} for it (an agent of an earlier \
                         version may hold it until its pod goes)"
                    );
                    said = true;
                }
                tokio::time::sleep(PORT_RETRY).await;
            }
            result => return result,
        }
    }
}

fn in_use(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_second_agent_waits_for_the_first_and_records_its_pid() {
        let dir = std::env::temp_dir().join(format!("fe-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let runtime = runtime();
        let first = runtime
            .block_on(wait_for_turn(&dir, "test", std::future::pending()))
            .unwrap()
            .expect("nobody holds the lock");
        let pid = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // A second agent stands by; told to stop, it leaves the lock alone.
        let stopped = runtime
            .block_on(wait_for_turn(&dir, "test", async {}))
            .unwrap();
        assert!(stopped.is_none());
        // The first one goes: the next one takes over at once.
        drop(first);
        let second = runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                wait_for_turn(&dir, "test", std::future::pending()),
            )
            .await
        });
        assert!(matches!(second, Ok(Ok(Some(_)))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_port_in_use_is_recognised_through_the_error_chain() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let again = std::net::TcpListener::bind(taken.local_addr().unwrap())
            .context("binding")
            .context("serving metrics");
        assert!(in_use(&again.unwrap_err()));
        assert!(!in_use(&anyhow::anyhow!("other")));
    }
}
