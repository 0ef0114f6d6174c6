//! Running commands with a deadline, and errors that quote the command line and its output.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::COMMAND_TIMEOUT;

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// A command as a person would type it, for error messages.
pub(super) fn command_line(program: &str, args: &[&str]) -> String {
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
pub(super) fn run_bounded(program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
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
pub(super) fn stdout_if_success(line: &str, output: Output) -> Result<String> {
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
pub(super) fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    let output = run_bounded(program, args, COMMAND_TIMEOUT)?;
    stdout_if_success(&command_line(program, args), output)
}
