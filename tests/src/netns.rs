//! Network namespaces for tests: the nodes and pods of a mini cluster on one machine.
//!
//! Every namespace a test creates is named `fe-t<pid>-<seq>-<name>` and is deleted, with
//! every process inside it, when its [`Netns`] is dropped — also when the test panics.
//! Links are created directly inside their namespaces, so nothing is ever added to the
//! host's own namespace. [`cleanup_stale`] removes what a killed test run left behind,
//! and runs once by itself before the first namespace of a process is created.
//!
//! ```no_run
//! use std::time::Duration;
//! use fabedge_tests::netns::{Netns, ping, veth_pair};
//!
//! let pod = Netns::new("pod")?;
//! let node = Netns::new("node")?;
//! veth_pair(&pod, "eth0", &node, "veth-pod")?;
//! pod.add_addr("eth0", "10.244.1.2/24")?;
//! node.add_addr("veth-pod", "10.244.1.1/24")?;
//! let result = ping(&pod, "10.244.1.1".parse()?, 3, Duration::from_millis(200))?;
//! assert!(result.all_received(), "{result:?}");
//! # anyhow::Ok(())
//! ```
//!
//! Sockets and aya need the calling thread inside the namespace: [`Netns::enter`] runs a
//! closure on a fresh thread that has joined it. A socket keeps working after the thread
//! ends, because a socket belongs to the namespace it was created in.

use std::fs::{self, File};
use std::io::{self, ErrorKind, Read, Write};
use std::marker::PhantomData;
use std::mem;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::packet::{Mac, format_mac, parse_mac};

/// Every namespace the harness creates starts with this, followed by the creating pid.
pub const NETNS_PREFIX: &str = "fe-t";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Longest interface name Linux accepts (IFNAMSIZ 16 includes the NUL).
const IFNAME_MAX_LEN: usize = 15;
/// No single helper command may take longer than this; a hung one fails the test.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often background echo servers look up from a blocking call to see if they should stop.
const SERVER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a UDP echo client waits for a reply before sending the request again.
const UDP_RESEND_INTERVAL: Duration = Duration::from_millis(250);

static NEXT_SEQUENCE: AtomicU64 = AtomicU64::new(0);
static STALE_CLEANUP: Once = Once::new();

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// A command as a person would type it, for error messages.
fn command_line(program: &str, args: &[&str]) -> String {
    let quote = |word: &str| {
        if word.is_empty() || word.contains(char::is_whitespace) {
            format!("'{word}'")
        } else {
            word.to_owned()
        }
    };
    std::iter::once(program)
        .chain(args.iter().copied())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads a child's pipe to the end on its own thread, so a chatty child cannot block.
fn collect_pipe(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            // A read error only loses output we would have shown in a message.
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Runs `program` to completion and returns its output whatever its exit status; kills
/// it and fails if it runs longer than `timeout`.
fn run_bounded(program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let line = command_line(program, args);
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C") // output parsed below is in the C locale
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`: is {program} installed and on PATH?"))?;
    let stdout = collect_pipe(child.stdout.take());
    let stderr = collect_pipe(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for `{line}`"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` did not finish within {timeout:?}, so it was killed");
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let join = |reader: JoinHandle<Vec<u8>>| reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

/// Stdout of a finished command, or an error with its command line, status and stderr.
fn stdout_if_success(line: &str, output: Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command in the host namespace and returns its stdout if it succeeds.
fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    let output = run_bounded(program, args, COMMAND_TIMEOUT)?;
    stdout_if_success(&command_line(program, args), output)
}

// ---------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------

/// A named network namespace, deleted with every process in it on drop.
/// A new namespace has its loopback up and nothing else.
#[derive(Debug)]
pub struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    /// Creates `fe-t<pid>-<seq>-<name>`. `name` says what the namespace plays in the test
    /// (`edge1`, `pod-a`) and may use letters, digits, `-` and `_`.
    pub fn new(name: &str) -> Result<Self> {
        STALE_CLEANUP.call_once(|| {
            if let Err(error) = cleanup_stale(NETNS_PREFIX) {
                eprintln!("warning: could not remove namespaces of earlier test runs: {error:#}");
            }
        });
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "network namespace name {name:?} must be non-empty and use only letters, digits, '-' and '_'"
        );
        let sequence = NEXT_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let full_name = format!("{NETNS_PREFIX}{}-{sequence}-{name}", std::process::id());
        run_ok("ip", &["netns", "add", &full_name])
            .with_context(|| format!("creating network namespace {full_name} (are we root?)"))?;
        // From here on, dropping `netns` deletes it if anything below fails.
        let netns = Self {
            name: full_name,
            deleted: false,
        };
        netns.set_up("lo")?;
        Ok(netns)
    }

    /// The full name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that keeps the namespace alive (`/run/netns/<name>`).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `program` inside the namespace (`ip netns exec`) and returns its output
    /// whatever its exit status. Fails only if it cannot run or hangs for 30 s.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.exec_bounded(program, args, COMMAND_TIMEOUT)
    }

    fn exec_bounded(&self, program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut full_args = vec!["netns", "exec", self.name.as_str(), program];
        full_args.extend_from_slice(args);
        run_bounded("ip", &full_args, timeout)
    }

    /// Runs `program` inside the namespace and returns its stdout; a non-zero exit is an
    /// error naming the namespace, the command line and its stderr.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> Result<String> {
        let output = self.exec(program, args)?;
        stdout_if_success(
            &format!("{} (in netns {})", command_line(program, args), self.name),
            output,
        )
    }

    /// Runs `ip <args>` against the namespace (`ip -n <name> <args>`) and returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full_args = vec!["-n", self.name.as_str()];
        full_args.extend_from_slice(args);
        run_ok("ip", &full_args)
    }

    /// Starts a long-running `program` inside the namespace. It is killed when the
    /// returned guard is dropped, or at the latest when the namespace is.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<BackgroundProcess> {
        let line = format!("{} (in netns {})", command_line(program, args), self.name);
        let sequence = NEXT_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let program_name = Path::new(program)
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("process");
        let log_path =
            std::env::temp_dir().join(format!("{}-{sequence}-{program_name}.log", self.name));
        let log = File::create(&log_path)
            .with_context(|| format!("creating log {} for `{line}`", log_path.display()))?;
        let log_for_stderr = log
            .try_clone()
            .with_context(|| format!("duplicating log handle for `{line}`"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", self.name.as_str(), program])
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        Ok(BackgroundProcess {
            child,
            command_line: line,
            log_path,
        })
    }

    /// Runs `work` on a new thread that has joined this namespace and returns its result.
    /// Sockets, netlink, `/proc/sys/net` and aya calls made there act inside the
    /// namespace; `/proc/net` does not (it follows the main thread), use
    /// `/proc/thread-self/net`. A panic in `work` is passed on to the caller unchanged,
    /// so assertions inside read normally.
    pub fn enter<R, F>(&self, work: F) -> Result<R>
    where
        F: FnOnce() -> Result<R> + Send,
        R: Send,
    {
        let path = self.path();
        let namespace = File::open(&path).with_context(|| {
            format!(
                "opening {} to enter netns {}: was it deleted?",
                path.display(),
                self.name
            )
        })?;
        let outcome = thread::scope(|scope| {
            scope
                .spawn(move || {
                    // setns moves only this thread; the thread ends with `work`.
                    setns(&namespace, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("joining netns {} (setns)", self.name))?;
                    work()
                })
                .join()
        });
        match outcome {
            Ok(result) => result.with_context(|| format!("in netns {}", self.name)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Creates bridge `name` and brings it up. STP stays off, so ports forward at once.
    pub fn bridge(&self, name: &str) -> Result<()> {
        check_ifname(name)?;
        self.ip(&["link", "add", "name", name, "type", "bridge"])
            .with_context(|| format!("creating bridge {name} in netns {}", self.name))?;
        self.set_up(name)
    }

    /// Makes `port` a port of `bridge`.
    pub fn attach_to_bridge(&self, port: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", port, "master", bridge])
            .with_context(|| format!("adding {port} to bridge {bridge} in netns {}", self.name))
            .map(drop)
    }

    /// Adds an address like `10.244.1.2/24` to `ifname`.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        ensure!(
            cidr.contains('/'),
            "address {cidr:?} for {ifname} needs a prefix length, e.g. {cidr}/24"
        );
        self.ip(&["addr", "add", cidr, "dev", ifname])
            .with_context(|| format!("adding {cidr} to {ifname} in netns {}", self.name))
            .map(drop)
    }

    pub fn set_up(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "up"])
            .with_context(|| format!("bringing {ifname} up in netns {}", self.name))
            .map(drop)
    }

    pub fn set_mac(&self, ifname: &str, mac: Mac) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "address", &format_mac(&mac)])
            .with_context(|| format!("setting the MAC of {ifname} in netns {}", self.name))
            .map(drop)
    }

    pub fn mac(&self, ifname: &str) -> Result<Mac> {
        let address = self.link_field(ifname, "address")?;
        let text = address
            .as_str()
            .with_context(|| format!("{ifname} reports a non-text address {address}"))?;
        parse_mac(text).with_context(|| format!("MAC of {ifname} in netns {}", self.name))
    }

    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let index = self.link_field(ifname, "ifindex")?;
        index
            .as_u64()
            .and_then(|index| u32::try_from(index).ok())
            .with_context(|| {
                format!(
                    "{ifname} in netns {} reports a bad ifindex {index}",
                    self.name
                )
            })
    }

    /// One field of `ip -j link show dev <ifname>`.
    fn link_field(&self, ifname: &str, field: &str) -> Result<serde_json::Value> {
        let json = self
            .ip(&["-j", "link", "show", "dev", ifname])
            .with_context(|| format!("looking up {ifname} in netns {}", self.name))?;
        let links: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("parsing `ip -j link show` output {json:?}"))?;
        links
            .get(0)
            .and_then(|link| link.get(field))
            .cloned()
            .with_context(|| format!("`ip -j link show dev {ifname}` has no {field:?}: {json}"))
    }

    /// Adds a route to `destination` (`10.244.0.0/16`, `default`).
    pub fn add_route(&self, destination: &str, next_hop: NextHop<'_>) -> Result<()> {
        let gateway;
        let mut args = vec!["route", "add", destination];
        match next_hop {
            NextHop::Gateway(address) => {
                gateway = address.to_string();
                args.extend(["via", gateway.as_str()]);
            }
            NextHop::Device(device) => args.extend(["dev", device]),
            NextHop::GatewayOnDevice(address, device) => {
                gateway = address.to_string();
                args.extend(["via", gateway.as_str(), "dev", device]);
            }
        }
        self.ip(&args)
            .with_context(|| format!("adding route {destination} in netns {}", self.name))
            .map(drop)
    }

    /// Writes a sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")` or
    /// `("net/ipv4/conf/eth0.100/rp_filter", "0")` when a name contains dots.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        self.enter(|| {
            // /proc/sys/net resolves to the namespace of the thread that opens it.
            fs::write(&path, value)
                .with_context(|| format!("writing {value:?} to {}", path.display()))
        })
        .with_context(|| format!("setting sysctl {key}={value}"))
    }

    /// Reads a sysctl of this namespace (trimmed).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        self.enter(|| {
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        })
        .map(|value| value.trim().to_owned())
        .with_context(|| format!("reading sysctl {key}"))
    }

    /// Deletes the namespace now and reports failure, instead of warning from `drop`.
    pub fn delete(mut self) -> Result<()> {
        self.deleted = true;
        delete_netns(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        if let Err(error) = delete_netns(&self.name) {
            // Drop cannot fail; the next run's cleanup_stale removes what is left.
            eprintln!("warning: {error:#}");
        }
    }
}

/// Turns `net.ipv4.ip_forward` into `/proc/sys/net/ipv4/ip_forward`.
fn sysctl_path(key: &str) -> Result<PathBuf> {
    ensure!(
        !key.contains("..") && (key.starts_with("net.") || key.starts_with("net/")),
        "sysctl {key:?}: only net.* sysctls belong to a network namespace (others would \
         change the host); write it like net.ipv4.ip_forward"
    );
    let relative = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    Ok(Path::new("/proc/sys").join(relative))
}

/// Where a route sends its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop<'a> {
    Gateway(Ipv4Addr),
    Device(&'a str),
    GatewayOnDevice(Ipv4Addr, &'a str),
}

/// Rejects interface names Linux would refuse, with the reason.
fn check_ifname(name: &str) -> Result<()> {
    ensure!(
        name.len() <= IFNAME_MAX_LEN,
        "interface name {name:?} is {} bytes; Linux allows at most {IFNAME_MAX_LEN} (IFNAMSIZ 16 with the NUL): shorten it",
        name.len()
    );
    ensure!(
        !name.is_empty() && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()),
        "interface name {name:?} must be non-empty without '/', ':' or spaces"
    );
    Ok(())
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, both up. Both ends are
/// created inside their namespaces, never in the host's.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    let a_end = ["link", "add", "name", a_if, "netns", a.name()];
    let b_end = ["type", "veth", "peer", "name", b_if, "netns", b.name()];
    let args = [&a_end[..], &b_end[..]].concat();
    run_ok("ip", &args).with_context(|| {
        format!(
            "creating veth {a_if} (netns {}) <-> {b_if} (netns {})",
            a.name(),
            b.name()
        )
    })?;
    a.set_up(a_if)?;
    b.set_up(b_if)
}

/// Names of all named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let listing = run_ok("ip", &["netns", "list"])?;
    // Lines look like "name (id: 3)" or just "name".
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Kills every process in namespace `name`, then deletes it.
fn delete_netns(name: &str) -> Result<()> {
    let own_pid = std::process::id();
    // Processes can fork while we kill; a few rounds catch their children too.
    for _round in 0..20 {
        let pids = run_ok("ip", &["netns", "pids", name])
            .with_context(|| format!("listing processes in netns {name} before deleting it"))?;
        let pids: Vec<i32> = pids
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if u32::try_from(pid) == Ok(own_pid) {
                continue; // never this test process, even if a thread left it behind
            }
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => bail!("killing pid {pid} in netns {name}: {errno}"),
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    run_ok("ip", &["netns", "delete", name])
        .with_context(|| format!("deleting netns {name}"))
        .map(drop)
}

/// Deletes namespaces left by test runs that died without cleaning up: names
/// `<prefix><pid>-…` whose pid no longer runs. Namespaces of live runs (including other
/// test processes running right now) and names without a pid after `prefix` are left
/// alone. Returns the names deleted.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    ensure!(
        !prefix.is_empty(),
        "an empty prefix would match every namespace; pass e.g. {NETNS_PREFIX:?}"
    );
    let mut deleted = Vec::new();
    for name in list_netns()? {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        delete_netns(&name)
            .with_context(|| format!("removing stale netns {name} of dead pid {pid}"))?;
        deleted.push(name);
    }
    Ok(deleted)
}

// ---------------------------------------------------------------------------
// Background processes
// ---------------------------------------------------------------------------

/// A process started with [`Netns::spawn`]; killed on drop. Its stdout and stderr go to a
/// log file, removed on drop, that [`BackgroundProcess::log`] reads.
#[derive(Debug)]
pub struct BackgroundProcess {
    child: Child,
    command_line: String,
    log_path: PathBuf,
}

impl BackgroundProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process printed so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Fails, with its output, if the process has already exited — e.g. after giving it
    /// a moment to bind its port.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "`{}` exited early ({status}): {}",
                self.command_line,
                self.log().trim()
            ),
            Err(error) => {
                Err(anyhow!(error).context(format!("checking on `{}`", self.command_line)))
            }
        }
    }

    /// Kills the process and returns what it printed.
    pub fn stop(mut self) -> String {
        self.kill_and_reap();
        self.log()
    }

    fn kill_and_reap(&mut self) {
        // Errors mean it already exited; waiting reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackgroundProcess {
    fn drop(&mut self) {
        self.kill_and_reap();
        let _ = fs::remove_file(&self.log_path);
    }
}

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

fn is_timeout(error: &io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn v4_local_addr(address: io::Result<SocketAddr>) -> Result<SocketAddrV4> {
    match address.context("reading the bound address")? {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(v6) => bail!("expected an IPv4 socket, got {v6}"),
    }
}

// ---------------------------------------------------------------------------
// Raw frames on an interface (AF_PACKET)
// ---------------------------------------------------------------------------

/// A raw socket on one interface of a namespace: sends frames built with
/// [`crate::packet`] as if they arrived from the wire at the peer, and captures the
/// frames that come in.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    description: String,
}

impl PacketSocket {
    pub fn open(netns: &Netns, ifname: &str) -> Result<Self> {
        let description = format!("packet socket on {ifname} in netns {}", netns.name());
        let fd = netns
            .enter(|| open_packet_socket(ifname))
            .with_context(|| format!("opening {description}"))?;
        Ok(Self { fd, description })
    }

    /// Sends one whole Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: the pointer and length describe `frame`, which outlives the call.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent < 0 {
            return Err(anyhow!(io::Error::last_os_error())
                .context(format!("sending a frame on {}", self.description)));
        }
        ensure!(
            sent as usize == frame.len(),
            "{} sent {sent} of {} bytes",
            self.description,
            frame.len()
        );
        Ok(())
    }

    /// The next frame that arrives on the interface (its own sends are skipped), or
    /// `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.recv_matching(timeout, |_| true)
    }

    /// The next arriving frame for which `wanted` is true, or `None` after `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 65536];
        loop {
            let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(None);
            };
            if !self.wait_readable(remaining)? {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut from_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buffer and address pointers are valid for the lengths passed.
            let received = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                if is_timeout(&error) || error.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(anyhow!(error).context(format!("receiving on {}", self.description)));
            }
            let len = received as usize;
            ensure!(
                len <= buffer.len(),
                "{} got a {len}-byte frame, larger than the buffer",
                self.description
            );
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buffer[..len];
            if wanted(frame) {
                return Ok(Some(frame.to_vec()));
            }
        }
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        let mut poll_fd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, millis) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == ErrorKind::Interrupted {
                return Ok(true); // let the caller retry
            }
            return Err(anyhow!(error).context(format!("waiting on {}", self.description)));
        }
        Ok(ready > 0)
    }
}

/// Must run inside the target namespace: the ifindex and the socket belong to it.
fn open_packet_socket(ifname: &str) -> Result<OwnedFd> {
    check_ifname(ifname)?;
    let ifindex = nix::net::if_::if_nametoindex(ifname)
        .with_context(|| format!("no interface {ifname} in this namespace"))?;
    let all_protocols = (libc::ETH_P_ALL as u16).to_be();
    // Protocol 0 at creation receives nothing; binding below starts capture on this one
    // interface only, so no frame from another interface slips in between.
    // SAFETY: plain syscall with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(anyhow!(io::Error::last_os_error())
            .context("creating AF_PACKET socket (needs CAP_NET_RAW)"));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = all_protocols;
    address.sll_ifindex = i32::try_from(ifindex).context("ifindex out of range")?;
    // SAFETY: `address` is a valid sockaddr_ll and the length matches it.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const address).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(anyhow!(io::Error::last_os_error())
            .context(format!("binding AF_PACKET socket to {ifname}")));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::packet::{
        ETH_HEADER_LEN, Frame, IcmpError, TcpFlags, UdpChecksum, icmp_code, icmp_type, ip_proto,
        parse_eth,
    };

    const SHORT: Duration = Duration::from_secs(3);

    fn addr(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    /// Two namespaces joined by a veth: a = 10.99.0.1/24 on eth0, b = 10.99.0.2/24 on eth0.
    fn joined_pair(test: &str) -> (Netns, Netns) {
        let a = Netns::new(&format!("{test}-a")).unwrap();
        let b = Netns::new(&format!("{test}-b")).unwrap();
        veth_pair(&a, "eth0", &b, "eth0").unwrap();
        a.add_addr("eth0", "10.99.0.1/24").unwrap();
        b.add_addr("eth0", "10.99.0.2/24").unwrap();
        (a, b)
    }

    /// Whether `condition` becomes true within 5 seconds.
    fn eventually(mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn assert_absent_from_ip_netns_list(names: &[String]) {
        let listed = list_netns().unwrap();
        for name in names {
            assert!(
                !listed.contains(name),
                "{name} is still in `ip netns list`: {listed:?}"
            );
        }
    }

    #[test]
    fn two_namespaces_joined_by_a_veth_ping_each_other() {
        let (a, b) = joined_pair("veth");
        let there = ping(&a, addr("10.99.0.2"), 3, Duration::from_millis(50)).unwrap();
        assert_eq!(
            (there.sent, there.received, there.rtts.len()),
            (3, 3, 3),
            "{there:?}"
        );
        let back = ping(&b, addr("10.99.0.1"), 2, Duration::from_millis(50)).unwrap();
        assert!(back.all_received(), "{back:?}");
    }

    #[test]
    fn ping_to_a_silent_address_reports_loss_within_its_deadline() {
        let (a, _b) = joined_pair("loss");
        let started = Instant::now();
        let result = ping(&a, addr("10.99.0.77"), 2, Duration::from_millis(100)).unwrap();
        assert_eq!((result.sent, result.received), (2, 0), "{result:?}");
        assert!(!result.all_received());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn ping_without_a_route_is_an_error_naming_the_command() {
        let lonely = Netns::new("noroute").unwrap();
        let error = ping(&lonely, addr("192.0.2.1"), 1, Duration::from_millis(100)).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("ping") && message.contains(lonely.name()),
            "{message}"
        );
    }

    #[test]
    fn bridge_joins_three_namespaces() {
        let switch = Netns::new("switch").unwrap();
        switch.bridge("br0").unwrap();
        let hosts: Vec<Netns> = (1..=3)
            .map(|i| Netns::new(&format!("host{i}")).unwrap())
            .collect();
        for (i, host) in hosts.iter().enumerate() {
            let port = format!("port{}", i + 1);
            veth_pair(host, "eth0", &switch, &port).unwrap();
            switch.attach_to_bridge(&port, "br0").unwrap();
            host.add_addr("eth0", &format!("10.98.0.{}/24", i + 1))
                .unwrap();
        }
        for (i, host) in hosts.iter().enumerate() {
            for j in (1..=3).filter(|j| *j != i + 1) {
                let result = ping(
                    host,
                    addr(&format!("10.98.0.{j}")),
                    2,
                    Duration::from_millis(50),
                )
                .unwrap();
                assert!(
                    result.all_received(),
                    "host{} → 10.98.0.{j}: {result:?}",
                    i + 1
                );
            }
        }
        let ports = switch.ip(&["-j", "link", "show", "master", "br0"]).unwrap();
        for port in ["port1", "port2", "port3"] {
            assert!(ports.contains(port), "{port} missing from br0: {ports}");
        }
    }

    #[test]
    fn router_namespace_forwards_between_two_subnets() {
        let left = Netns::new("left").unwrap();
        let router = Netns::new("router").unwrap();
        let right = Netns::new("right").unwrap();
        veth_pair(&left, "eth0", &router, "to-left").unwrap();
        veth_pair(&right, "eth0", &router, "to-right").unwrap();
        left.add_addr("eth0", "10.97.1.2/24").unwrap();
        router.add_addr("to-left", "10.97.1.1/24").unwrap();
        right.add_addr("eth0", "10.97.2.2/24").unwrap();
        router.add_addr("to-right", "10.97.2.1/24").unwrap();
        left.add_route("default", NextHop::Gateway(addr("10.97.1.1")))
            .unwrap();
        right
            .add_route(
                "10.97.1.0/24",
                NextHop::GatewayOnDevice(addr("10.97.2.1"), "eth0"),
            )
            .unwrap();

        router.set_sysctl("net.ipv4.ip_forward", "0").unwrap();
        let blocked = ping(&left, addr("10.97.2.2"), 1, Duration::from_millis(100)).unwrap();
        assert_eq!(blocked.received, 0, "forwarding is off: {blocked:?}");

        router.set_sysctl("net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(router.sysctl("net.ipv4.ip_forward").unwrap(), "1");
        assert_eq!(
            left.sysctl("net.ipv4.ip_forward").unwrap(),
            "0",
            "sysctls are per namespace"
        );
        let through = ping(&left, addr("10.97.2.2"), 2, Duration::from_millis(50)).unwrap();
        assert!(through.all_received(), "{through:?}");
    }

    #[test]
    fn udp_echo_round_trip() {
        let (a, b) = joined_pair("udp");
        let server = UdpEchoServer::start(&b, SocketAddrV4::new(addr("10.99.0.2"), 0)).unwrap();
        let reply = udp_echo(&a, server.local_addr(), b"hello over udp", SHORT).unwrap();
        assert_eq!(reply, b"hello over udp");
        assert!(server.requests_served() >= 1);
    }

    #[test]
    fn udp_echo_without_a_server_fails_quickly() {
        let (a, _b) = joined_pair("udpnone");
        let started = Instant::now();
        let error = udp_echo(
            &a,
            SocketAddrV4::new(addr("10.99.0.2"), 9),
            b"anyone?",
            SHORT,
        )
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("port unreachable"),
            "{error:#}"
        );
        assert!(started.elapsed() < SHORT);
    }

    #[test]
    fn tcp_echo_round_trip() {
        let (a, b) = joined_pair("tcp");
        let server =
            TcpEchoServer::start(&b, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7007)).unwrap();
        let big: Vec<u8> = (0..4_000_000u32).map(|i| i as u8).collect();
        for payload in [&b"hello over tcp"[..], &big] {
            let reply = tcp_echo(
                &a,
                SocketAddrV4::new(addr("10.99.0.2"), 7007),
                payload,
                SHORT,
            )
            .unwrap();
            assert!(
                reply == payload,
                "echo of {} bytes came back as {} bytes",
                payload.len(),
                reply.len()
            );
        }
        drop(server);
        // Usually "connection refused"; a reset if a child forked by a concurrent test
        // briefly held the listening socket open.
        let late = tcp_echo(
            &a,
            SocketAddrV4::new(addr("10.99.0.2"), 7007),
            b"late",
            SHORT,
        );
        assert!(late.is_err(), "echo after the server stopped: {late:?}");
    }

    #[test]
    fn enter_runs_inside_the_namespace_and_returns_the_result() {
        let ns = Netns::new("enter").unwrap();
        // /proc/net follows the process's main thread; thread-self follows this thread.
        let links = ns
            .enter(|| Ok(fs::read_to_string("/proc/thread-self/net/dev")?))
            .unwrap();
        assert!(links.contains("lo:"));
        assert!(
            !links.contains("eth0"),
            "only loopback exists in a fresh namespace: {links}"
        );
        let error = ns
            .enter(|| -> Result<()> { bail!("inner failure") })
            .unwrap_err();
        assert!(
            format!("{error:#}").contains(ns.name())
                && format!("{error:#}").contains("inner failure")
        );
    }

    #[test]
    fn exec_spawn_and_errors_name_the_command() {
        let ns = Netns::new("exec").unwrap();
        assert_eq!(ns.run_ok("echo", &["inside"]).unwrap().trim(), "inside");
        let error = ns
            .run_ok("sh", &["-c", "echo oops >&2; exit 3"])
            .unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("exit 3") || message.contains("exit status: 3"),
            "{message}"
        );
        assert!(
            message.contains("oops") && message.contains(ns.name()),
            "{message}"
        );

        let mut sleeper = ns.spawn("sleep", &["600"]).unwrap();
        sleeper.ensure_running().unwrap();
        // The child joins the namespace a moment after it starts.
        let sleeper_pid = sleeper.pid().to_string();
        let in_namespace = || {
            let listed = run_ok("ip", &["netns", "pids", ns.name()]).unwrap();
            listed.lines().any(|pid| pid.trim() == sleeper_pid)
        };
        assert!(
            eventually(in_namespace),
            "sleep (pid {sleeper_pid}) never showed up in {}",
            ns.name()
        );

        let mut quitter = ns.spawn("sh", &["-c", "echo bye; exit 1"]).unwrap();
        assert!(
            eventually(|| quitter.ensure_running().is_err()),
            "sh should have exited"
        );
        let error = quitter.ensure_running().unwrap_err();
        assert!(format!("{error:#}").contains("bye"), "{error:#}");
    }

    #[test]
    fn bad_names_are_refused_with_the_fix() {
        assert!(
            Netns::new("a/b")
                .unwrap_err()
                .to_string()
                .contains("letters, digits")
        );
        let (a, b) = (
            Netns::new("names-a").unwrap(),
            Netns::new("names-b").unwrap(),
        );
        let error = veth_pair(&a, "a-very-long-ifname", &b, "eth0").unwrap_err();
        assert!(error.to_string().contains("at most 15"), "{error}");
        let error = a.add_addr("lo", "10.0.0.1").unwrap_err();
        assert!(error.to_string().contains("prefix length"), "{error}");
        let error = a.set_sysctl("kernel.panic", "1").unwrap_err();
        assert!(error.to_string().contains("only net.*"), "{error}");
        let error = a.set_sysctl("net.ipv4.no_such_knob", "1").unwrap_err();
        assert!(
            format!("{error:#}").contains("net.ipv4.no_such_knob"),
            "{error:#}"
        );
    }

    #[test]
    fn dropped_namespaces_disappear_with_their_processes() {
        let (a, b) = joined_pair("drop");
        let names = vec![a.name().to_owned(), b.name().to_owned()];
        // A process the harness did not start itself, detached from our pipes.
        let orphan: i32 = a
            .run_ok("sh", &["-c", "sleep 600 >/dev/null 2>&1 & echo $!"])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let listed = list_netns().unwrap();
        assert!(names.iter().all(|name| listed.contains(name)), "{listed:?}");
        drop(a);
        b.delete().unwrap();
        assert_absent_from_ip_netns_list(&names);
        let gone = eventually(|| {
            !Path::new(&format!("/proc/{orphan}")).exists()
                || fs::read_to_string(format!("/proc/{orphan}/stat"))
                    .is_ok_and(|stat| stat.contains(") Z "))
        });
        assert!(gone, "sleep (pid {orphan}) survived its namespace");
    }

    #[test]
    fn namespaces_are_removed_even_when_the_test_panics() {
        let names = Mutex::new(Vec::new());
        let outcome = std::panic::catch_unwind(|| {
            let (a, b) = joined_pair("panic");
            names
                .lock()
                .unwrap()
                .extend([a.name().to_owned(), b.name().to_owned()]);
            panic!("a failing assertion");
        });
        assert!(outcome.is_err());
        let names = names.into_inner().unwrap();
        assert_eq!(names.len(), 2);
        assert_absent_from_ip_netns_list(&names);
    }

    /// A namespace made with plain `ip netns add`, deleted on drop.
    struct RawNamespace(String);

    impl RawNamespace {
        fn add(name: String) -> Self {
            run_ok("ip", &["netns", "add", &name]).unwrap();
            Self(name)
        }
    }

    impl Drop for RawNamespace {
        fn drop(&mut self) {
            if list_netns().is_ok_and(|names| names.contains(&self.0)) {
                let _ = delete_netns(&self.0);
            }
        }
    }

    #[test]
    fn cleanup_stale_removes_only_namespaces_of_dead_runs() {
        // A prefix of this process's own, so test runs going on at the same time
        // neither see these namespaces nor are touched by this cleanup.
        let own_pid = std::process::id();
        let prefix = format!("fe-x{own_pid}-");
        let dead_pid = (2..32768)
            .rev()
            .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            .unwrap();
        let stale = RawNamespace::add(format!("{prefix}{dead_pid}-0-stale"));
        let live = RawNamespace::add(format!("{prefix}{own_pid}-0-live"));
        let unnumbered = RawNamespace::add(format!("{prefix}manual"));

        let removed = cleanup_stale(&prefix).unwrap();
        assert_eq!(removed, vec![stale.0.clone()]);
        let listed = list_netns().unwrap();
        assert!(!listed.contains(&stale.0), "{listed:?}");
        assert!(
            listed.contains(&live.0) && listed.contains(&unnumbered.0),
            "{listed:?}"
        );
        assert!(cleanup_stale("").is_err());
    }

    #[test]
    fn ping_output_of_iputils_and_busybox_parses() {
        let iputils = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
            64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.051 ms\n\
            64 bytes from 10.0.0.2: icmp_seq=3 ttl=64 time=1.50 ms\n\n\
            --- 10.0.0.2 ping statistics ---\n\
            3 packets transmitted, 2 received, 33.3333% packet loss, time 2003ms\n\
            rtt min/avg/max/mdev = 0.051/0.775/1.500/0.724 ms\n";
        let parsed = parse_ping_output(iputils).unwrap();
        assert_eq!((parsed.sent, parsed.received), (3, 2));
        assert_eq!(
            parsed.rtts,
            vec![Duration::from_micros(51), Duration::from_micros(1500)]
        );

        let busybox = "PING 10.0.0.2 (10.0.0.2): 56 data bytes\n\
            64 bytes from 10.0.0.2: seq=0 ttl=64 time=0.088 ms\n\n\
            --- 10.0.0.2 ping statistics ---\n\
            1 packets transmitted, 1 packets received, 0% packet loss\n";
        let parsed = parse_ping_output(busybox).unwrap();
        assert_eq!((parsed.sent, parsed.received, parsed.rtts.len()), (1, 1, 1));

        assert!(parse_ping_output("ping: unknown host").is_err());
    }

    // --- The kernel as an independent oracle for crate::packet ---

    /// The MACs and addresses of a joined pair, for building frames a → b.
    fn wire(a: &Netns, b: &Netns) -> (Mac, Mac, Ipv4Addr, Ipv4Addr) {
        (
            a.mac("eth0").unwrap(),
            b.mac("eth0").unwrap(),
            addr("10.99.0.1"),
            addr("10.99.0.2"),
        )
    }

    #[test]
    fn kernel_accepts_udp_checksums_built_here_and_drops_corrupt_ones() {
        let (a, b) = joined_pair("kudp");
        let (mac_a, mac_b, ip_a, ip_b) = wire(&a, &b);
        let receiver = b
            .enter(|| Ok(UdpSocket::bind(SocketAddrV4::new(ip_b, 5555))?))
            .unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let injector = PacketSocket::open(&a, "eth0").unwrap();
        let udp = |payload: &[u8]| {
            Frame::eth(mac_a, mac_b)
                .ipv4(ip_a, ip_b)
                .udp(4444, 5555)
                .payload(payload)
        };
        let mut buffer = [0u8; 64];

        // The kernel verifies UDP checksums of frames from a packet socket; a corrupt one
        // must vanish, or the good case would prove nothing.
        injector
            .send(&udp(b"corrupt").checksum(0x1234).build())
            .unwrap();
        assert!(
            receiver.recv_from(&mut buffer).is_err(),
            "the kernel accepted a corrupt UDP checksum"
        );

        for payload in [&b"odd"[..], b"even", b""] {
            injector.send(&udp(payload).build()).unwrap();
            let (len, from) = receiver
                .recv_from(&mut buffer)
                .expect("the kernel dropped a UDP datagram built here");
            assert_eq!(
                (&buffer[..len], from),
                (payload, SocketAddr::V4(SocketAddrV4::new(ip_a, 4444)))
            );
        }
    }

    #[test]
    fn kernel_answers_a_tcp_syn_built_here_and_ignores_a_corrupt_one() {
        let (a, b) = joined_pair("ktcp");
        let (mac_a, mac_b, ip_a, ip_b) = wire(&a, &b);
        let _listener = b
            .enter(|| Ok(TcpListener::bind(SocketAddrV4::new(ip_b, 8080))?))
            .unwrap();
        let injector = PacketSocket::open(&a, "eth0").unwrap();
        let syn = |seq: u32| {
            Frame::eth(mac_a, mac_b)
                .ipv4(ip_a, ip_b)
                .dont_fragment(true)
                .tcp(40000, 8080)
                .seq(seq)
                .flags(TcpFlags::SYN)
                .mss(1460)
                .window(64240)
        };
        let syn_ack_to = |seq: u32| {
            move |frame: &[u8]| {
                let Ok(ip) = parse_eth(frame).and_then(|eth| eth.ipv4()) else {
                    return false;
                };
                ip.tcp().is_ok_and(|tcp| {
                    tcp.flags.contains(TcpFlags::SYN | TcpFlags::ACK)
                        && tcp.ack == seq.wrapping_add(1)
                })
            }
        };

        injector.send(&syn(1000).checksum(0xbad0).build()).unwrap();
        let reply = injector
            .recv_matching(Duration::from_millis(500), syn_ack_to(1000))
            .unwrap();
        assert!(
            reply.is_none(),
            "the kernel answered a SYN with a corrupt checksum"
        );

        injector.send(&syn(2000).build()).unwrap();
        let reply = injector.recv_matching(SHORT, syn_ack_to(2000)).unwrap();
        let reply = reply.expect("no SYN-ACK: the kernel rejected the TCP checksum built here");
        let ip = parse_eth(&reply).unwrap().ipv4().unwrap();
        assert!(
            ip.checksum_valid,
            "kernel-built IPv4 header fails our checksum check"
        );
        assert_eq!(
            (ip.src, ip.dst, ip.tcp().unwrap().src_port),
            (ip_b, ip_a, 8080)
        );
    }

    #[test]
    fn kernel_answers_an_icmp_echo_built_here_with_checksums_we_accept() {
        let (a, b) = joined_pair("kicmp");
        let (mac_a, mac_b, ip_a, ip_b) = wire(&a, &b);
        let injector = PacketSocket::open(&a, "eth0").unwrap();
        let reply_to = |id: u16| {
            move |frame: &[u8]| {
                let Ok(ip) = parse_eth(frame).and_then(|eth| eth.ipv4()) else {
                    return false;
                };
                ip.icmp().is_ok_and(|icmp| {
                    icmp.icmp_type == icmp_type::ECHO_REPLY && icmp.echo_id() == Some(id)
                })
            }
        };
        let request = |id: u16| {
            Frame::eth(mac_a, mac_b)
                .ipv4(ip_a, ip_b)
                .icmp_echo_request(id, 1)
                .payload(b"abcdefghijklmnopq")
        };

        injector.send(&request(7).checksum(0xbeef).build()).unwrap();
        let reply = injector
            .recv_matching(Duration::from_millis(500), reply_to(7))
            .unwrap();
        assert!(
            reply.is_none(),
            "the kernel answered an echo request with a corrupt checksum"
        );

        injector.send(&request(8).build()).unwrap();
        let reply = injector
            .recv_matching(SHORT, reply_to(8))
            .unwrap()
            .expect("no echo reply from the kernel");
        let eth = parse_eth(&reply).unwrap();
        assert_eq!((eth.src, eth.dst), (mac_b, mac_a));
        let ip = eth.ipv4().unwrap();
        let icmp = ip.icmp().unwrap();
        // Linux computes both checksums of an echo reply in software, so they are real.
        assert!(
            ip.checksum_valid && icmp.checksum_valid,
            "{}",
            crate::packet::hexdump(&reply)
        );
        assert_eq!(
            (icmp.echo_seq(), icmp.body),
            (Some(1), &b"abcdefghijklmnopq"[..])
        );
    }

    #[test]
    fn kernel_port_unreachable_quotes_the_datagram_built_here() {
        let (a, b) = joined_pair("kunreach");
        let (mac_a, mac_b, ip_a, ip_b) = wire(&a, &b);
        let injector = PacketSocket::open(&a, "eth0").unwrap();
        let datagram = Frame::eth(mac_a, mac_b)
            .ipv4(ip_a, ip_b)
            .id(77)
            .udp(4444, 9)
            .payload(b"nobody home")
            .build();
        injector.send(&datagram).unwrap();
        let is_unreachable = |frame: &[u8]| {
            parse_eth(frame)
                .and_then(|eth| eth.ipv4())
                .is_ok_and(|ip| ip.protocol == ip_proto::ICMP)
        };
        let reply = injector
            .recv_matching(SHORT, is_unreachable)
            .unwrap()
            .expect("no ICMP error from the kernel");
        let ip = parse_eth(&reply).unwrap().ipv4().unwrap();
        let icmp = ip.icmp().unwrap();
        assert_eq!(
            (icmp.icmp_type, icmp.code),
            (icmp_type::DEST_UNREACHABLE, icmp_code::PORT_UNREACHABLE)
        );
        assert!(icmp.checksum_valid);
        // Linux quotes the whole small datagram, not just 8 bytes.
        assert_eq!(icmp.body, &datagram[ETH_HEADER_LEN..]);
        let quoted = icmp.quoted_packet().unwrap();
        assert_eq!(
            (quoted.src, quoted.dst, quoted.id, quoted.ports().unwrap()),
            (ip_a, ip_b, 77, (4444, 9))
        );
        assert_eq!(quoted.udp().unwrap().checksum_status, UdpChecksum::Valid);

        // And our own port-unreachable for the same datagram matches the kernel's
        // header byte for byte once it quotes as much as the kernel did.
        let ours = Frame::eth(mac_b, mac_a)
            .ipv4(ip_b, ip_a)
            .icmp_error(IcmpError::PortUnreachable, &datagram[ETH_HEADER_LEN..])
            .payload(icmp.body)
            .build();
        let ours_icmp = parse_eth(&ours).unwrap().ipv4().unwrap().icmp().unwrap();
        assert_eq!(
            (
                ours_icmp.icmp_type,
                ours_icmp.code,
                ours_icmp.checksum,
                ours_icmp.rest_of_header
            ),
            (
                icmp.icmp_type,
                icmp.code,
                icmp.checksum,
                icmp.rest_of_header
            )
        );
    }
}
