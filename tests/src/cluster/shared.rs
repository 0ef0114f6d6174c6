//! One cluster shared by the tests of a binary, built on first use and torn down at the end.

use anyhow::{Result, bail};

use super::{Cluster, ClusterOptions};

/// One mini cluster shared by every test of a test binary: started by the
/// first test that asks for it, torn down when the binary exits (libtest
/// leaves through `exit()`, which runs `atexit` handlers after the last test).
///
/// ```ignore
/// static CLUSTER: SharedCluster = SharedCluster::new();
/// extern "C" fn tear_down() { CLUSTER.tear_down() }
/// CLUSTER.with(tear_down, |cluster| { ... })
/// ```
pub struct SharedCluster {
    slot: std::sync::Mutex<Option<Result<Cluster, String>>>,
    registered: std::sync::Once,
}

impl SharedCluster {
    pub const fn new() -> Self {
        SharedCluster {
            slot: std::sync::Mutex::new(None),
            registered: std::sync::Once::new(),
        }
    }

    /// Runs `test` on the cluster, bringing it up first if needed; `tear_down`
    /// (which calls [`SharedCluster::tear_down`] on this static) runs at exit.
    pub fn with<R>(
        &'static self,
        tear_down: extern "C" fn(),
        test: impl FnOnce(&Cluster) -> Result<R>,
    ) -> Result<R> {
        self.with_options(ClusterOptions::default, tear_down, test)
    }

    /// [`SharedCluster::with`] for a cluster started with `options()` (the
    /// first call's options are the cluster's).
    pub fn with_options<R>(
        &'static self,
        options: impl FnOnce() -> ClusterOptions,
        tear_down: extern "C" fn(),
        test: impl FnOnce(&Cluster) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            self.registered.call_once(|| {
                // SAFETY: registers a plain function run at exit.
                if unsafe { libc::atexit(tear_down) } != 0 {
                    eprintln!("warning: cannot register the cluster teardown; the next run removes the leftovers");
                }
            });
            *slot = Some(Cluster::start(options()).map_err(|e| format!("{e:#}")));
        }
        match slot.as_ref() {
            Some(Ok(cluster)) => test(cluster),
            Some(Err(e)) => bail!("the mini cluster did not come up: {e}"),
            None => unreachable!("filled above"),
        }
    }

    pub fn tear_down(&self) {
        drop(
            self.slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
    }
}

impl Default for SharedCluster {
    fn default() -> Self {
        Self::new()
    }
}
