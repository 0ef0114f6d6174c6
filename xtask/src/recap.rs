//! Why a suite failed, in a few lines the suite's summary repeats at the
//! end: CI shows only the tail of a long log, and a failed test's panic or
//! `Error:` sits hundreds of lines above it.

/// Lines of one failure's message kept for the summary.
const LINES_PER_FAILURE: usize = 8;
/// Characters of one kept line.
const LINE_CHARS: usize = 240;
/// Failures listed per suite (the rest are counted).
const FAILURES_LISTED: usize = 12;

/// Reads libtest's output line by line and keeps, per failed test, its name
/// and the first lines of its panic or error.
#[derive(Default)]
pub struct Failures {
    failed: Vec<String>,
    messages: Vec<(String, Vec<String>)>,
    /// The test whose captured output is being read (`---- NAME stdout ----`).
    section: Option<String>,
    /// Lines still to keep from the current section's message.
    keep: usize,
    /// Reading the names listed under `failures:`.
    listing: bool,
}

impl Failures {
    pub fn scan(&mut self, line: &str) {
        let line = line.trim_end();
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            self.failed.push(name.to_string());
            return;
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            self.section = Some(name.to_string());
            self.keep = 0;
            self.listing = false;
            return;
        }
        if line == "FAILED" || line == "ok" {
            // The end of a --nocapture test's output.
            self.keep = 0;
            return;
        }
        if line == "failures:" || line.starts_with("test result: ") {
            self.section = None;
            self.listing = line == "failures:";
            return;
        }
        // The list under `failures:` names every failed test; with
        // --nocapture it is the only place that does.
        if self.listing {
            if let Some(name) = line.strip_prefix("    ")
                && !name.is_empty()
                && !name.contains(' ')
                && !self.failed.iter().any(|f| f == name)
            {
                self.failed.push(name.to_string());
            }
            return;
        }
        // With --nocapture a test's output follows `test NAME ... ` directly.
        let mut line = line;
        if let Some((name, rest)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.split_once(" ... "))
        {
            self.section = Some(name.to_string());
            self.keep = 0;
            line = rest;
        }
        let Some(section) = &self.section else {
            return;
        };
        if self.keep == 0 && (line.contains("panicked at") || line.starts_with("Error: ")) {
            self.keep = LINES_PER_FAILURE;
            self.messages.push((section.clone(), Vec::new()));
        }
        if line.starts_with("stack backtrace:")
            || line.starts_with("note: run with `RUST_BACKTRACE")
        {
            self.keep = 0;
        }
        if self.keep > 0 && !line.trim().is_empty() {
            self.keep -= 1;
            if let Some((_, lines)) = self.messages.last_mut() {
                lines.push(line.chars().take(LINE_CHARS).collect());
            }
        }
    }

    /// One line per failed test, each followed by its message's first lines.
    pub fn summary(&self) -> Vec<String> {
        let mut out = Vec::new();
        for name in self.failed.iter().take(FAILURES_LISTED) {
            out.push(format!("failed: {name}"));
            for (_, lines) in self.messages.iter().filter(|(test, _)| test == name) {
                out.extend(lines.iter().map(|l| format!("    {l}")));
            }
        }
        if self.failed.len() > FAILURES_LISTED {
            out.push(format!(
                "... and {} more failed tests (see above)",
                self.failed.len() - FAILURES_LISTED
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary_of(log: &str) -> Vec<String> {
        let mut failures = Failures::default();
        for line in log.lines() {
            failures.scan(line);
        }
        failures.summary()
    }

    #[test]
    fn a_failed_tests_name_and_panic_are_kept_and_passing_tests_are_not() {
        let log = "\
running 3 tests
test fine ... ok
test broken ... FAILED
test erring ... FAILED

failures:

---- broken stdout ----
some progress line
thread 'broken' panicked at tests/tests/xdp.rs:10:5:
lost 3 of 100 pings
stack backtrace:
   0: __rustc::rust_begin_unwind
---- erring stdout ----
Error: the agent exited: boom

failures:
    broken
    erring

test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out
";
        assert_eq!(
            summary_of(log),
            [
                "failed: broken",
                "    thread 'broken' panicked at tests/tests/xdp.rs:10:5:",
                "    lost 3 of 100 pings",
                "failed: erring",
                "    Error: the agent exited: boom",
            ]
        );
    }

    #[test]
    fn with_nocapture_the_failed_test_is_named_from_the_failures_list() {
        let log = "\
running 1 test
test surge ... ESP ok: a path
Error: lost 1 of 390 pings
FAILED

failures:

failures:
    surge

test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 3 filtered out
";
        assert_eq!(
            summary_of(log),
            ["failed: surge", "    Error: lost 1 of 390 pings"]
        );
    }
}
