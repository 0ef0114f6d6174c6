//! Small facts about the host: bpffs, interfaces, and the atomic write
//! every state and config file goes through.

use std::{fs, io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use anyhow::{Context, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Make sure `path` (or its parent mount) is a bpffs; mount one at
/// `/sys/fs/bpf` when nothing is mounted there (a fresh container).
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    let mount_point = Path::new("/sys/fs/bpf");
    let probe = if path.exists() { path } else { mount_point };
    if is_bpffs(probe)? {
        return Ok(());
    }
    if !path.starts_with(mount_point) {
        bail!(
            "{} is not on a bpf filesystem: mount one (`mount -t bpf bpf <dir>`) or pick a path under /sys/fs/bpf",
            path.display()
        );
    }
    fs::create_dir_all(mount_point).context("creating /sys/fs/bpf")?;
    nix::mount::mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf (the agent needs CAP_SYS_ADMIN)")?;
    log::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let st =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Names of the network interfaces in this network namespace (netlink view,
/// not `/sys/class/net`, which shows the namespace sysfs was mounted in).
pub fn interfaces() -> Result<Vec<String>> {
    let list = nix::net::if_::if_nameindex().context("listing network interfaces")?;
    let mut names: Vec<String> = list
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// ifindex of an interface, with an error naming it.
pub fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name)
        .with_context(|| format!("interface {name} does not exist in this network namespace"))
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones), from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&mountinfo)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<std::path::PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "id parent major:minor root mount-point options [optional...] - fstype source super-options"
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        let mount_point = fields.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| std::path::PathBuf::from(mount_point))
    })
}

/// Replace `path` atomically (temp file + rename) when its content differs.
pub fn write_if_changed(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    if fs::read(path).ok().as_deref() == Some(content) {
        return Ok(());
    }
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("fabedge-tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Hands the allocator's free memory back to the kernel, after a pass that
/// held the whole cluster several times over (parsed objects, their model,
/// the plan): glibc keeps freed heap pages, in every thread's arena, until
/// asked, so the resident size would stay at the pass's peak. musl's
/// allocator (the image's static agent) unmaps freed groups by itself.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Fixes glibc's thresholds, which otherwise follow the largest block
/// freed so far: after a pass that freed a saved snapshot's buffer (tens of
/// MB at 10 k Services) glibc would serve such blocks from the heap, and
/// keep up to twice that free at the top of every thread's arena, resident
/// (`malloc_trim` returns free blocks inside an arena, not a thread
/// arena's top). Fixed, a block of 256 KiB or more is mapped on its own and
/// unmapped when freed, and an arena keeps at most 1 MiB free at its top.
/// Called once, before any thread starts.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets the allocator's parameters; called before
    // any other thread allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

/// Runs `work` on a thread of its own and returns what it returned. Meant
/// for a full pass's parsing: glibc gives that thread an arena of its own,
/// so the parse's garbage (k8s objects, YAML nodes) is not interleaved with
/// what the agent keeps. The caller keeps a copy of the result made on its
/// own thread and drops the original; that arena is then free as a whole
/// and [`release_free_memory`] returns all of it, where the same garbage
/// on the caller's heap leaves it fragmented (file mode at 10 k Services:
/// 91 MB resident after a pass, 58 MB parsed apart). Without a thread to
/// be had, `work` runs on the caller's.
pub fn apart<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    let mut work = Some(work);
    let result = std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("fe-parse".into())
            .spawn_scoped(scope, || (work.take().expect("taken once"))());
        match spawned {
            Ok(thread) => Some(
                thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            ),
            Err(_) => None,
        }
    });
    match result {
        Some(result) => result,
        None => (work.take().expect("not run"))(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apart_runs_the_work_on_its_own_thread_and_returns_its_result() {
        let (name, sum) = apart(|| {
            (
                std::thread::current().name().map(str::to_owned),
                (1..=10).sum::<u32>(),
            )
        });
        assert_eq!(name.as_deref(), Some("fe-parse"));
        assert_eq!(sum, 55);
        let borrowed = String::from("borrowed from the caller");
        assert_eq!(apart(|| borrowed.len()), borrowed.len());
    }

    #[test]
    fn cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let unified =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount_in(unified), Some("/sys/fs/cgroup".into()));
        let hybrid = "25 23 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            cgroup2_mount_in(
                "27 25 0:24 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n"
            ),
            None
        );
    }
}
