//! A network namespace that deletes itself, commands run inside it, and threads that enter it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sched::{CloneFlags, setns};

use super::cleanup::{cleanup_stale, delete_netns};
use super::commands::{command_line, run_bounded, run_ok, stdout_if_success};
use super::process::BackgroundProcess;
use super::{COMMAND_TIMEOUT, NETNS_DIR, NETNS_PREFIX, NEXT_SEQUENCE, STALE_CLEANUP};

// ---------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------

/// A named network namespace, deleted with every process in it on drop.
/// A new namespace has its loopback up and nothing else.
#[derive(Debug)]
pub struct Netns {
    pub(super) name: String,
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

    pub(super) fn exec_bounded(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
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
