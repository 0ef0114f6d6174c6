//! Standalone mode: notice that the manifest file changed without reading
//! it. Two cheap signals: inotify on the file's directory (a write in
//! place, an editor's or `kubectl`'s atomic rename, a ConfigMap volume
//! swapping its `..data` link all show up there), and the file's
//! [`Stamp`] (one `stat`), which the run loop compares on every tick. The
//! file is read only when the stamp moved, and parsed only when its text
//! differs from what was applied: an idle agent reads nothing.
//!
//! Without inotify (a kernel without it, the instance limit reached) the
//! stamp on each tick is the only signal: changes are then seen within a
//! poll interval instead of at once.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::Path,
};

use anyhow::{Context, Result, bail};
use tokio::io::{Interest, unix::AsyncFd};

/// What `stat` says of the file: it changed if any of this moved. A
/// replacement by rename has another inode; a write in place another
/// mtime or size (the ctime catches a write within the mtime's grain that
/// kept the size: it moves with every write too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The file's stamp (following links, as reading it does).
    pub fn of(path: &Path) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(path)?;
        Ok(Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// An inotify instance watching one directory; readable when something in
/// it changed.
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
}

impl DirWatch {
    /// Watch the directory holding `file` (must run inside a tokio runtime).
    pub fn new(file: &Path) -> Result<DirWatch> {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // SAFETY: plain syscall; the fd it returns is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("inotify_init1");
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c_dir = CString::new(dir.as_os_str().as_bytes())
            .with_context(|| format!("{} has a NUL byte", dir.display()))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MODIFY
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_dir.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("watching {} with inotify", dir.display()));
        }
        // SAFETY: the AsyncFd owns the fd, so it stays open for as long
        // as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .context("registering the inotify fd")?;
        Ok(DirWatch { fd })
    }

    /// Wait until something in the directory changed, and drain the
    /// events (which entry changed does not matter: the stamp decides).
    pub async fn changed(&mut self) -> Result<()> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            match drain(guard.get_inner().as_raw_fd()) {
                Ok(0) => guard.clear_ready(),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => bail!("reading inotify events: {e}"),
            }
        }
    }
}

/// Read every queued event; the bytes read (0: none queued).
fn drain(fd: RawFd) -> std::io::Result<usize> {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock if total > 0 => Ok(total),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(total);
        }
        total += n as usize;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_stamp_moves_with_a_write_and_a_rename_and_not_with_a_read() {
        let dir = std::env::temp_dir().join(format!("fabedge-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.yaml");
        std::fs::write(&file, "a: 1\n").unwrap();
        let first = Stamp::of(&file).unwrap();
        std::fs::read(&file).unwrap();
        assert_eq!(Stamp::of(&file).unwrap(), first, "a read changes nothing");
        // Same size, same second: the write still shows.
        std::fs::write(&file, "a: 2\n").unwrap();
        let written = Stamp::of(&file).unwrap();
        assert_ne!(written, first);
        let next = dir.join("cluster.yaml.new");
        std::fs::write(&next, "a: 2\n").unwrap();
        std::fs::rename(&next, &file).unwrap();
        assert_ne!(Stamp::of(&file).unwrap(), written, "replaced by rename");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_atomic_replacement_of_the_file_wakes_the_watch() {
        let dir = std::env::temp_dir().join(format!("fabedge-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.yaml");
        std::fs::write(&file, "a: 1\n").unwrap();
        let mut watch = DirWatch::new(&file).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
        assert!(quiet.is_err(), "no event while nothing changes");
        let next = dir.join(".cluster.yaml.tmp");
        std::fs::write(&next, "a: 2\n").unwrap();
        std::fs::rename(&next, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("woken by the rename")
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
