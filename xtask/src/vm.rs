//! Kernel-VM harness (DESIGN.md section 4, layer 4): boot a stock Debian
//! kernel under `qemu-system-x86_64 -accel tcg` and run one host-built program
//! inside it, so that kernel features this machine lacks (ESP, GCM, loadable
//! modules) can be tested.
//!
//! API:
//! - [`Kernel`]: `V6_1` / `V6_12`, [`Kernel::ALL`], `Display` ("6.1"/"6.12"), `FromStr`.
//! - [`prepare`]`(kernel) -> Result<PreparedKernel>`: downloads the newest
//!   `linux-image-*-amd64` of that series with `apt-get download`, extracts it
//!   into `<workspace>/target/vm/<release>/`, runs `depmod`, and builds the base
//!   initramfs. Idempotent; once cached it runs no command at all
//!   (`rm -rf target/vm` picks up a newer Debian kernel).
//! - [`run`]`(&VmRun) -> Result<i32>`: boots the VM, runs `program args...` with
//!   `env` in the workspace root, streams the serial console to our stdout and
//!   returns the program's exit code. It is an error (not a code) when qemu
//!   fails, the kernel panics, the VM setup fails, or `timeout` passes (qemu is
//!   killed).
//! - [`self_test`]`() -> Result<()>`: proves the harness on every kernel (exit
//!   codes, veth/vxlan in a netns, ESP with rfc4106(gcm(aes))).
//!
//! Inside the VM: the host root is shared read-only over 9p and used as the
//! lower layer of an overlay whose upper layer is a tmpfs, so the guest sees
//! the host's files and may write anywhere (writes are discarded at exit; the
//! host is never modified). On top come fresh proc, sysfs, devtmpfs, devpts,
//! bpffs (/sys/fs/bpf), cgroup2, and tmpfs on /run (with /run/netns) and
//! /dev/shm. /tmp is the host's, seen through the overlay (a workspace cloned
//! there must work); a fresh /run hides the host's, so the program must not
//! live there. The guest kernel's modules are bind-mounted on
//! `/lib/modules/<release>`, so `modprobe` and the kernel's own module
//! autoloading work; [`PRELOAD_MODULES`] are loaded before the program starts
//! (failures are printed, not fatal).
//!
//! Boot to result takes about 4-8 s (more when the host is busy): qemu boots
//! the uncompressed `vmlinux` through its PVH entry with qboot, the kernel
//! needs ~2.5 s under TCG, preloading modules ~2 s.
//!
//! The workspace root comes from `crate::workspace()`.
//!
//! The exit code leaves the VM twice: as a console line carrying a per-run
//! nonce (exact, authoritative) and through qemu's `isa-debug-exit` device
//! (qemu exits with `(code << 1) | 1`), which is cross-checked.

use std::{
    collections::hash_map::DefaultHasher,
    fmt, fs,
    hash::{Hash, Hasher},
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    str::FromStr,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

/// A Debian kernel series the VM tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Debian 12's own kernel (netlink tc, no TCX).
    V6_1,
    /// Debian 12's backported kernel (TCX).
    V6_12,
}

impl Kernel {
    pub const ALL: [Kernel; 2] = [Kernel::V6_1, Kernel::V6_12];

    /// `apt-cache search --names-only` pattern of this series' generic images.
    fn package_pattern(self) -> &'static str {
        match self {
            Kernel::V6_1 => r"^linux-image-6\.1\.0-[0-9]+-amd64$",
            Kernel::V6_12 => r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
        })
    }
}

impl FromStr for Kernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Kernel::ALL
            .into_iter()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| format!("unknown kernel {s:?}; expected one of: 6.1, 6.12"))
    }
}

/// One program to run inside a VM.
pub struct VmRun<'a> {
    pub kernel: Kernel,
    /// Absolute or relative host path (resolved on the host), or a bare
    /// command name looked up in the guest's PATH.
    pub program: &'a Path,
    pub args: &'a [String],
    /// Added to a minimal environment (PATH, HOME).
    pub env: &'a [(String, String)],
    pub timeout: Duration,
    /// Modules kept out of this boot: neither preloaded nor loadable on
    /// demand (the kernel's autoloading meets `install <module> /bin/false`).
    /// The program sees them in `FABEDGE_VM_WITHOUT_MODULES` (comma-separated).
    pub without_modules: &'a [&'a str],
}

/// The environment variable naming [`VmRun::without_modules`] inside the VM.
pub const WITHOUT_MODULES_ENV: &str = "FABEDGE_VM_WITHOUT_MODULES";

/// A kernel ready to boot: extracted, depmod'ed, with its base initramfs.
#[derive(Clone, Debug)]
pub struct PreparedKernel {
    /// `uname -r` inside the VM, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// What qemu boots: the uncompressed `vmlinux` (PVH entry; saves 1.5-2.5 s
    /// of decompression under TCG) or else the package's `vmlinuz`.
    pub image: PathBuf,
    /// Base initramfs (busybox, the 9p/overlay modules, /init).
    pub initramfs: PathBuf,
    /// Modules of [`PRELOAD_MODULES`] this kernel has as loadable modules.
    pub preload: Vec<&'static str>,
    /// Modules of [`PRELOAD_MODULES`] this kernel has neither built in nor as modules.
    pub unavailable: Vec<&'static str>,
}

/// Modules loaded before the program starts. Each is optional: a failure is
/// printed and the run goes on (built-in ones load trivially).
#[rustfmt::skip]
pub const PRELOAD_MODULES: &[&str] = &[
    // devices
    "veth", "bridge", "dummy", "tun", "udp_tunnel", "ip6_udp_tunnel", "vxlan",
    // tc and BPF
    "sch_ingress", "cls_bpf", "act_bpf",
    // xfrm and ESP
    "xfrm_user", "xfrm_algo", "xfrm_interface", "esp4", "esp6", "xfrm4_tunnel",
    // crypto for rfc4106(gcm(aes)) and friends (AES is built in; the VM's CPU
    // has no AES-NI, whose module's self-tests cost 1.6 s under TCG)
    "gcm", "ghash_generic", "ctr", "authenc", "drbg", "seqiv", "echainiv",
    // iptables (this host's iptables is the nft flavour; legacy tables too)
    "nf_conntrack", "nf_nat", "nf_tables", "nft_compat", "nft_chain_nat", "xt_MASQUERADE", "xt_mark",
    "xt_nat", "xt_REDIRECT", "xt_conntrack", "nf_conntrack_netlink",
    "ip_tables", "iptable_filter", "iptable_nat", "iptable_mangle",
];

/// Modules the initramfs itself needs to mount the host root (plus their
/// dependencies, found with `modprobe --show-depends`).
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

const QEMU: &str = "qemu-system-x86_64";
const BUSYBOX: &str = "/bin/busybox";
/// A minimal firmware, faster than SeaBIOS; used when qemu ships it.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
const MEMORY_MIB: u32 = 1024;
const CPUS: u32 = 2;
/// `quiet loglevel=3` keeps boot noise out of the test output (panics and
/// oopses still show); `cryptomgr.notests` skips the crypto self-tests, which
/// cost seconds under TCG and test the kernel, not us.
const KERNEL_CMDLINE: &str =
    "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off cryptomgr.notests=1 rdinit=/init";

fn vm_dir() -> PathBuf {
    crate::workspace().join("target").join("vm")
}

/// Makes `kernel` ready to boot; costs nothing once cached.
pub fn prepare(kernel: Kernel) -> Result<PreparedKernel> {
    let root = vm_dir();
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // `<root>/<series>.release` names the extracted release of that series.
    let pointer = root.join(format!("{kernel}.release"));
    let cached = fs::read_to_string(&pointer)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|release| !release.is_empty() && root.join(release).join(".complete").exists());
    let release = match cached {
        Some(release) => release,
        None => {
            let release = download_and_extract(kernel, &root)?;
            fs::write(&pointer, format!("{release}\n"))
                .with_context(|| format!("writing {}", pointer.display()))?;
            release
        }
    };
    let dir = root.join(&release);
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
    let modules = dir.join("lib").join("modules").join(&release);
    if !vmlinuz.is_file() || !modules.is_dir() {
        bail!(
            "{} is incomplete (no {} or {}); delete it (rm -rf {}) and run again",
            dir.display(),
            vmlinuz.display(),
            modules.display(),
            dir.display()
        );
    }
    let image = match uncompressed_image(&dir, &release, &vmlinuz) {
        Ok(image) => image,
        Err(e) => {
            println!("vm: booting the compressed {} ({e:#})", vmlinuz.display());
            vmlinuz
        }
    };
    let initramfs = base_initramfs(&dir, &release, &modules)?;
    let (preload, unavailable) = preload_plan(&dir, &release)?;
    Ok(PreparedKernel {
        release,
        image,
        initramfs,
        preload,
        unavailable,
    })
}

/// Extracts (once) the ELF `vmlinux` from a bzImage whose kernel has a PVH
/// entry point, which qemu boots directly with no decompression step.
fn uncompressed_image(dir: &Path, release: &str, vmlinuz: &Path) -> Result<PathBuf> {
    let vmlinux = dir.join(format!("vmlinux-{release}"));
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }
    let config =
        fs::read_to_string(dir.join("boot").join(format!("config-{release}"))).unwrap_or_default();
    if !config.lines().any(|l| l == "CONFIG_PVH=y") {
        bail!("the kernel has no PVH entry point (CONFIG_PVH)");
    }
    let image = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    // bzImage boot protocol: setup_sects at 0x1f1; payload_offset and
    // payload_length at 0x248 and 0x24c, relative to the protected-mode code.
    let u32_at = |at: usize| {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let setup_sects = match image.get(0x1f1).copied() {
        Some(0) => 4,
        Some(n) => usize::from(n),
        None => bail!("{} is too short for a bzImage", vmlinuz.display()),
    };
    let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) else {
        bail!("{} has no bzImage header", vmlinuz.display());
    };
    let start = (setup_sects + 1) * 512 + offset;
    // The payload ends with the 4-byte uncompressed size; leave it out.
    let payload = image
        .get(start..(start + length).saturating_sub(4))
        .with_context(|| format!("{}: payload out of bounds", vmlinuz.display()))?;
    let (tool, args): (&str, &[&str]) = if payload.starts_with(b"\xfd7zXZ\0") {
        ("xz", &["-dc", "--single-stream"])
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ("zstd", &["-dcq"])
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        ("gzip", &["-dc"])
    } else {
        bail!("{}: unknown kernel compression", vmlinuz.display());
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool} (apt-get install {tool})"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let out = thread::scope(|scope| {
        scope.spawn(move || {
            let _ = stdin.write_all(payload);
        });
        child.wait_with_output()
    })
    .with_context(|| format!("running {tool}"))?;
    if !out.status.success() || !out.stdout.starts_with(b"\x7fELF") {
        bail!(
            "{tool} could not decompress the kernel: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let tmp = dir.join(format!(".vmlinux.{}.tmp", std::process::id()));
    fs::write(&tmp, &out.stdout).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &vmlinux).with_context(|| format!("writing {}", vmlinux.display()))?;
    println!(
        "vm: extracted {} ({} MiB) to skip decompression at boot",
        vmlinux.display(),
        out.stdout.len() >> 20
    );
    Ok(vmlinux)
}

/// Finds, downloads and extracts the newest image of `kernel`'s series; returns its release.
fn download_and_extract(kernel: Kernel, root: &Path) -> Result<String> {
    let mut package = newest_package(kernel)?;
    if package.is_none() {
        println!("vm: no {kernel} kernel image in the apt lists; running apt-get update once");
        let status = Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .context("running apt-get update (is apt-get installed?)")?;
        if !status.success() {
            bail!("apt-get update failed; run it by hand to see why");
        }
        package = newest_package(kernel)?;
    }
    let Some(package) = package else {
        bail!(
            "apt knows no package matching {} even after apt-get update; \
             check /etc/apt/sources.list has Debian 12 (bookworm) and bookworm-security",
            kernel.package_pattern()
        );
    };
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();

    let download = TempDir::new(root, "download")?;
    println!("vm: downloading {package} (apt-get download) for the {kernel} VM");
    let status = Command::new("apt-get")
        .current_dir(download.path())
        // apt's sandbox user cannot write into our target directory.
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", &package])
        .status()
        .context("running apt-get download")?;
    if !status.success() {
        bail!("apt-get download {package} failed; try `apt-get update` and run again");
    }
    let deb = fs::read_dir(download.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                download.path().display()
            )
        })?;
    println!(
        "vm: downloaded {}",
        deb.file_name().unwrap_or_default().to_string_lossy()
    );

    let dir = root.join(&release);
    if dir.exists() {
        fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the incomplete {}", dir.display()))?;
    }
    let extract = download.path().join("extract");
    run_checked(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extract),
        "dpkg-deb -x (is dpkg installed?)",
    )?;
    run_checked(
        Command::new("depmod").arg("-b").arg(&extract).arg(&release),
        "depmod (install the kmod package: apt-get install kmod)",
    )?;
    fs::rename(&extract, &dir)
        .with_context(|| format!("moving the extracted kernel to {}", dir.display()))?;
    fs::write(dir.join(".complete"), &package)?;
    println!(
        "vm: {kernel} kernel {release} extracted into {}",
        dir.display()
    );
    Ok(release)
}

/// The newest non-cloud, non-rt image of `kernel`'s series in the apt lists.
fn newest_package(kernel: Kernel) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", kernel.package_pattern()])
        .output()
        .context("running apt-cache search (is apt installed?)")?;
    if !out.status.success() {
        bail!(
            "apt-cache search failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            !["-cloud", "-rt", "-dbg", "-unsigned"]
                .iter()
                .any(|bad| name.contains(bad))
        })
        .max_by_key(|name| version_key(name))
        .map(str::to_string))
}

/// The numbers in a package name, for ordering versions.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// `/init` of the base initramfs. `@RELEASE@`, `@MODULES@`, `@LOAD@` are filled in.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
    echo "fabedge-vm: setup failed: $*"
    poweroff -f
    sleep 100000
}
mount -t proc proc /proc || fail "mounting /proc"
mount -t sysfs sysfs /sys || fail "mounting /sys"
mount -t devtmpfs devtmpfs /dev || fail "mounting /dev"
for m in @LOAD@; do
    insmod "/fabedge/modules/$m" || fail "insmod $m"
done
mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=262144 hostroot /lower \
    || fail "mounting the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /upper || fail "mounting the overlay's tmpfs"
mkdir -p /upper/rw /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/rw,workdir=/upper/work overlay /newroot \
    || fail "mounting the overlay root"
R=/newroot
mount -t proc proc $R/proc || fail "mounting proc in the new root"
mount -t sysfs sysfs $R/sys || fail "mounting sysfs in the new root"
mount -t devtmpfs devtmpfs $R/dev || fail "mounting devtmpfs in the new root"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts || echo "fabedge-vm: no devpts"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || echo "fabedge-vm: no /dev/shm"
mount -t bpf -o mode=0700 bpf $R/sys/fs/bpf || fail "mounting bpffs on /sys/fs/bpf"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || echo "fabedge-vm: no cgroup2 on /sys/fs/cgroup"
# /tmp stays the host's (through the writable overlay): a workspace cloned
# under /tmp must stay visible to the guest.
mount -t tmpfs -o mode=0755 tmpfs $R/run || fail "mounting /run"
if [ -d $R/var/run ] && [ ! -L $R/var/run ]; then
    mount -t tmpfs -o mode=0755 tmpfs $R/var/run || fail "mounting /var/run"
fi
mkdir -p $R/run/netns $R/run/fabedge
cp /bin/busybox /fabedge/run.sh $R/run/fabedge/ || fail "copying the run script"
# In the new root, so that its /lib symlink resolves there.
chroot $R /run/fabedge/busybox sh -c 'mkdir -p /lib/modules/@RELEASE@ && mount --bind @MODULES@ /lib/modules/@RELEASE@' \
    || fail "bind-mounting the guest kernel's modules on /lib/modules/@RELEASE@"
ip link set lo up
# PID 1 itself changes root: the kernel's threads share its root, so the
# kernel's own module autoloading runs the new root's /sbin/modprobe.
exec chroot $R /run/fabedge/busybox sh /run/fabedge/run.sh
"#;

/// Builds (or finds cached) the base initramfs of one kernel.
fn base_initramfs(dir: &Path, release: &str, modules: &Path) -> Result<PathBuf> {
    let busybox_meta = fs::metadata(BUSYBOX).with_context(|| {
        format!("{BUSYBOX} is missing; install it: apt-get install busybox-static")
    })?;
    let modules_str = modules
        .to_str()
        .context("the workspace path is not UTF-8")?;
    if modules_str.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        bail!(
            "the workspace path {modules_str:?} has spaces or quotes; the VM harness cannot use it"
        );
    }
    let mut hasher = DefaultHasher::new();
    (
        INIT,
        INITRAMFS_MODULES,
        release,
        modules_str,
        busybox_meta.len(),
    )
        .hash(&mut hasher);
    busybox_meta.modified().ok().hash(&mut hasher);
    let path = dir.join(format!("initramfs-{:016x}.cpio", hasher.finish()));
    if path.is_file() {
        return Ok(path);
    }

    // Dependency-ordered module files, from the extracted tree's modules.dep.
    let out = Command::new("modprobe")
        .arg("-d")
        .arg(dir)
        .args(["-S", release, "--show-depends", "-a"])
        .args(INITRAMFS_MODULES)
        .output()
        .context("running modprobe --show-depends (install kmod: apt-get install kmod)")?;
    if !out.status.success() {
        bail!(
            "modprobe --show-depends {} failed for {release}: {}; delete {} and run again",
            INITRAMFS_MODULES.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            dir.display()
        );
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(rest) = line.strip_prefix("insmod ") {
            let file = PathBuf::from(rest.split_whitespace().next().unwrap_or_default());
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }

    let mut cpio = Cpio::default();
    for d in [
        "/bin",
        "/dev",
        "/proc",
        "/sys",
        "/lower",
        "/upper",
        "/newroot",
        "/fabedge",
        "/fabedge/modules",
    ] {
        cpio.dir(d);
    }
    cpio.char_device("/dev/console", 5, 1);
    cpio.file(
        "/bin/busybox",
        0o755,
        &fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?,
    );
    let mut load = Vec::new();
    for file in &files {
        let (name, data) = read_module(file)?;
        cpio.file(&format!("/fabedge/modules/{name}"), 0o644, &data);
        load.push(name);
    }
    let init = INIT
        .replace("@RELEASE@", release)
        .replace("@MODULES@", modules_str)
        .replace("@LOAD@", &load.join(" "));
    cpio.file("/init", 0o755, init.as_bytes());
    let bytes = cpio.finish();

    // Drop stale initramfs images of this kernel, then write atomically.
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("initramfs-") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "vm: built initramfs {} ({} KiB; modules: {})",
        path.display(),
        bytes.len() / 1024,
        load.join(" ")
    );
    Ok(path)
}

/// A module file, decompressed (busybox insmod takes plain `.ko`): (file name, bytes).
fn read_module(file: &Path) -> Result<(String, Vec<u8>)> {
    let name = file
        .file_name()
        .context("module path without a file name")?
        .to_string_lossy()
        .to_string();
    let tool = if name.ends_with(".ko.xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".ko.zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".ko.gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    let Some((tool, package)) = tool else {
        return Ok((
            name,
            fs::read(file).with_context(|| format!("reading {}", file.display()))?,
        ));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .output()
        .with_context(|| format!("running {tool} -dc (install it: apt-get install {package})"))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let plain = format!("{}.ko", name.split(".ko").next().unwrap_or(&name));
    Ok((plain, out.stdout))
}

/// What a VM run reported.
pub struct Outcome {
    /// The program's exit code.
    pub code: i32,
    /// How many tests libtest said passed, when the program is a test binary.
    pub tests_passed: Option<u64>,
    /// The tests libtest said failed, and why.
    pub failures: crate::recap::Failures,
}

/// Boots `run.kernel`, runs the program and returns its exit code.
pub fn run(run: &VmRun) -> Result<i32> {
    run_outcome(run).map(|outcome| outcome.code)
}

/// Boots `run.kernel`, runs the program and returns what it reported.
pub fn run_outcome(run: &VmRun) -> Result<Outcome> {
    let prepared =
        prepare(run.kernel).with_context(|| format!("preparing the {} kernel", run.kernel))?;
    let workspace = crate::workspace();
    let program = resolve_program(run.program)?;
    let nonce = {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!(
            "{:012x}",
            (nanos as u64 ^ (u64::from(std::process::id()) << 32)) & 0xffff_ffff_ffff
        )
    };
    let marker = format!("fabedge-vm-{nonce}: exit code ");
    let script = run_script(
        &prepared,
        &workspace,
        &program,
        run.args,
        run.env,
        run.without_modules,
        &marker,
    )?;

    // Per-run initramfs: the cached base plus a second archive holding run.sh.
    let tmp = TempDir::new(&std::env::temp_dir(), "fabedge-vm")?;
    let initrd = tmp.path().join("initrd.cpio");
    let mut bytes = fs::read(&prepared.initramfs)
        .with_context(|| format!("reading {}", prepared.initramfs.display()))?;
    let mut extra = Cpio::default();
    extra.file("/fabedge/run.sh", 0o755, script.as_bytes());
    bytes.extend_from_slice(&extra.finish());
    fs::write(&initrd, &bytes).with_context(|| format!("writing {}", initrd.display()))?;

    let mut cmd = Command::new(QEMU);
    if Path::new(QBOOT).is_file() {
        cmd.args(["-bios", QBOOT]);
    }
    // One host thread for both vCPUs: under multi-threaded TCG a vCPU
    // could run stale translated code after another one live-patched the
    // kernel text (static keys flip when TC/XDP programs attach), and the
    // 6.12 guest died on an int3 the patch had already removed (seen in
    // netif_receive_skb, __netif_receive_skb_core and sched_clock_cpu).
    cmd.args([
        "-accel",
        "tcg,thread=single",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    // qemu64, not max: TCG's AVX emulation and the AES-NI module's
    // self-tests made every boot 1-3 s slower.
    .args([
        "-cpu",
        "qemu64",
        "-m",
        &MEMORY_MIB.to_string(),
        "-smp",
        &CPUS.to_string(),
    ])
    .args(["-serial", "stdio", "-monitor", "none"])
    .arg("-kernel")
    .arg(&prepared.image)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", KERNEL_CMDLINE])
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| {
        format!("starting {QEMU} (install it: apt-get install qemu-system-x86)")
    })?;
    let stdout = child.stdout.take().context("qemu's stdout is not piped")?;
    // Every console line says which kernel printed it (logs of a suite
    // that boots both read unambiguously).
    let prefix = format!("[{}] ", run.kernel);
    let reader = thread::spawn(move || Console::follow(stdout, marker, prefix));

    let deadline = started + run.timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let console = reader.join().unwrap_or_default();
    let elapsed = started.elapsed();
    let kernel = run.kernel;
    let Some(status) = status else {
        bail!(
            "the {kernel} VM timed out after {:?} and was killed{}",
            run.timeout,
            console
                .panic
                .map(|p| format!(" (kernel panic: {p})"))
                .unwrap_or_default()
        );
    };
    if let Some(panic) = console.panic {
        bail!("the {kernel} VM's kernel panicked: {panic} (console output above)");
    }
    if let Some(failure) = console.setup_failed {
        bail!("the {kernel} VM could not start the program: {failure} (console output above)");
    }
    let Some(code) = console.exit_code else {
        bail!(
            "the {kernel} VM ended ({status}) without reporting the program's exit code; \
             see qemu's messages and the console output above"
        );
    };
    // isa-debug-exit makes qemu exit with (code << 1) | 1, truncated to 8 bits.
    let expected = ((code & 0xff) << 1 | 1) & 0xff;
    if status.code() != Some(expected) {
        eprintln!("vm: note: qemu exited with {status}, expected {expected} for exit code {code}");
    }
    println!(
        "vm: {kernel} ({}): exit code {code} after {:.1}s",
        prepared.release,
        elapsed.as_secs_f64()
    );
    Ok(Outcome {
        code,
        tests_passed: console.tests_passed,
        failures: console.failures,
    })
}

/// Splits [`PRELOAD_MODULES`] into loadable modules and ones this kernel
/// lacks (built-in ones are left out), and decompresses (once) the module
/// files they need: under TCG, decompressing in the guest costs seconds.
fn preload_plan(dir: &Path, release: &str) -> Result<(Vec<&'static str>, Vec<&'static str>)> {
    let (mut load, mut missing, mut compressed) = (Vec::new(), Vec::new(), Vec::new());
    for &module in PRELOAD_MODULES {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(dir)
            .args(["-S", release, "--show-depends", module])
            .output()
            .context("running modprobe --show-depends (apt-get install kmod)")?;
        if !out.status.success() {
            missing.push(module);
            continue;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let files: Vec<PathBuf> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("insmod ")?.split_whitespace().next())
            .map(PathBuf::from)
            .collect();
        if !files.is_empty() {
            load.push(module);
        }
        for file in files {
            if file.extension().is_some_and(|x| x != "ko") && !compressed.contains(&file) {
                compressed.push(file);
            }
        }
    }
    if !compressed.is_empty() {
        for file in &compressed {
            let (name, data) = read_module(file)?;
            let plain = file.with_file_name(name);
            fs::write(&plain, data).with_context(|| format!("writing {}", plain.display()))?;
            fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
        }
        run_checked(
            Command::new("depmod").arg("-b").arg(dir).arg(release),
            "depmod (apt-get install kmod)",
        )?;
        println!(
            "vm: decompressed {} module files of {release} that the VM preloads",
            compressed.len()
        );
    }
    Ok((load, missing))
}

/// The host path to run (canonical), or a bare command name left to the guest's PATH.
fn resolve_program(program: &Path) -> Result<PathBuf> {
    if program.components().count() == 1 && !program.is_absolute() && !program.exists() {
        return Ok(program.to_path_buf());
    }
    let path = fs::canonicalize(program)
        .with_context(|| format!("program {} does not exist on the host", program.display()))?;
    for hidden in ["/run", "/dev", "/proc", "/sys"] {
        if path.starts_with(hidden) {
            bail!(
                "program {} lives under {hidden}, which the VM replaces with a fresh mount; \
                 put it elsewhere (e.g. under target/)",
                path.display()
            );
        }
    }
    Ok(path)
}

/// The script PID 1 runs in the new root: load modules, run the program, report.
fn run_script(
    prepared: &PreparedKernel,
    workspace: &Path,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    without_modules: &[&str],
    marker: &str,
) -> Result<String> {
    let mut s = String::from("B=/run/fabedge/busybox\n");
    s += "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n";
    if !prepared.unavailable.is_empty() {
        s += &format!(
            "echo 'fabedge-vm: optional modules not in this kernel: {}'\n",
            prepared.unavailable.join(" ")
        );
    }
    if !without_modules.is_empty() {
        // modprobe runs the install command instead of loading, whoever asks
        // (the kernel's autoloading included); the file lives in the overlay.
        s += "mkdir -p /etc/modprobe.d\n";
        for module in without_modules {
            if module.is_empty()
                || !module
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                bail!("module name {module:?} is not a module name");
            }
            s += &format!(
                "echo 'install {module} /bin/false' >> /etc/modprobe.d/fabedge-vm-without.conf\n"
            );
        }
        s += &format!(
            "echo 'fabedge-vm: modules kept out of this boot: {}'\n",
            without_modules.join(" ")
        );
        s += &format!(
            "export {WITHOUT_MODULES_ENV}={}\n",
            without_modules.join(",")
        );
    }
    let same = |a: &str, b: &str| a.replace('-', "_") == b.replace('-', "_");
    let preload: Vec<&str> = prepared
        .preload
        .iter()
        .copied()
        .filter(|m| !without_modules.iter().any(|w| same(m, w)))
        .collect();
    if !preload.is_empty() {
        // One modprobe for all (each exec costs ~0.1 s under TCG); it goes on
        // past failures and prints them.
        s += &format!(
            "modprobe -a {} || echo 'fabedge-vm: some optional modules did not load (see above)'\n",
            preload.join(" ")
        );
    }
    s += &format!(
        "cd {} || echo \"fabedge-vm: staying in /\"\n",
        quote(&workspace.to_string_lossy())?
    );
    for (key, value) in env {
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            bail!("environment variable name {key:?} is not a shell identifier");
        }
        s += &format!("export {key}={}\n", quote(value)?);
    }
    s += &quote(&program.to_string_lossy())?;
    for arg in args {
        s += " ";
        s += &quote(arg)?;
    }
    s += " </dev/null\n";
    s += "code=$?\n";
    s += &format!("echo \"{marker}$code\"\n");
    // One byte to isa-debug-exit at port 0xf4 (244); qemu exits at once.
    s += "$B printf \"\\\\$($B printf %o $((code & 255)))\" | $B dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null\n";
    s += "echo 'fabedge-vm: isa-debug-exit did not stop qemu; powering off'\n";
    s += "$B poweroff -f\n$B sleep 100000\n";
    Ok(s)
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> Result<String> {
    if s.contains('\0') {
        bail!("argument {s:?} contains a NUL byte");
    }
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

/// What the serial console told us.
#[derive(Default)]
struct Console {
    exit_code: Option<i32>,
    panic: Option<String>,
    setup_failed: Option<String>,
    /// Tests libtest reported as passed, summed over its `test result:` lines.
    tests_passed: Option<u64>,
    failures: crate::recap::Failures,
}

impl Console {
    /// Copies qemu's serial output to our stdout, a whole line at a time
    /// behind `prefix`, while scanning it.
    fn follow(mut from: impl Read, marker: String, prefix: String) -> Console {
        let mut console = Console::default();
        let mut line = Vec::new();
        let mut buf = [0u8; 4096];
        let stdout = std::io::stdout();
        // Seconds since the boot started on every line: where a slow suite's
        // time went, read from CI's log.
        let started = Instant::now();
        let emit = |line: &[u8], console: &mut Console| {
            let text = String::from_utf8_lossy(line);
            let seconds = started.elapsed().as_secs();
            let _ = writeln!(stdout.lock(), "{prefix}{seconds:>4}s {text}");
            console.scan(&text, &marker);
        };
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            // The serial console ends lines with \r\n; pass on plain \n.
            for &b in &buf[..n] {
                if b == b'\n' {
                    emit(&line, &mut console);
                    line.clear();
                } else if b != b'\r' {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            emit(&line, &mut console);
        }
        console
    }

    fn scan(&mut self, line: &str, marker: &str) {
        self.failures.scan(line);
        if let Some(code) = line
            .find(marker)
            .and_then(|i| line[i + marker.len()..].trim().parse().ok())
        {
            self.exit_code = Some(code);
        } else if let Some(passed) = libtest_passed(line) {
            *self.tests_passed.get_or_insert(0) += passed;
        } else if let Some(i) = line.find("Kernel panic - not syncing") {
            self.panic.get_or_insert_with(|| line[i..].to_string());
        } else if let Some(i) = line.find("fabedge-vm: setup failed: ") {
            self.setup_failed
                .get_or_insert_with(|| line[i + "fabedge-vm: setup failed: ".len()..].to_string());
        }
    }
}

/// `N` from libtest's summary line `test result: ok. N passed; M failed; ...`.
fn libtest_passed(line: &str) -> Option<u64> {
    let rest = &line[line.find("test result: ")? + "test result: ".len()..];
    let (_, rest) = rest.split_once(". ")?;
    rest.split_once(" passed")?.0.trim().parse().ok()
}

/// A newc (SVR4, no CRC) cpio archive, as the kernel's initramfs unpacker reads it.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        self.entry(path, 0o040_755, 0, (0, 0), &[]);
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020_600, 1, (major, minor), &[]);
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | perm, 1, (0, 0), data);
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let name = path.trim_start_matches('/');
        self.inode += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 {
            2
        } else {
            nlink
        };
        let fields = [
            self.inode,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.bytes
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path, prefix: &str) -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = parent.join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Proves the harness on every kernel: exit codes 0 and 3, veth and vxlan in
/// a netns (with env and working directory passed), and ESP with
/// rfc4106(gcm(aes)) carrying a ping between two namespaces.
pub fn self_test() -> Result<()> {
    let workspace = crate::workspace();
    let ws = workspace.to_string_lossy().to_string();
    let netns = format!(
        r#"set -e
test "$(pwd)" = '{ws}'
test "$FABEDGE_VMTEST" = "it's ok"
ip netns add vmtest
ip -n vmtest link add veth-a type veth peer name veth-b
ip -n vmtest link add vxlan-t type vxlan id 42 dstport 4789 local 10.0.0.1 nolearning
ip -n vmtest -d link show
ip -n vmtest -d link show veth-a | grep -q 'veth'
ip -n vmtest -d link show vxlan-t | grep -q 'vxlan id 42'
echo netns-ok"#
    );
    let esp = r#"set -e
cd /tmp
modprobe esp4
ip netns add a
ip netns add b
ip -n a link add e0 type veth peer name e0 netns b
ip -n a addr add 192.0.2.1/24 dev e0
ip -n b addr add 192.0.2.2/24 dev e0
ip -n a link set e0 up
ip -n b link set e0 up
key=0x0102030405060708090a0b0c0d0e0f1011121314
for ns in a b; do
    ip -n $ns xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode transport aead 'rfc4106(gcm(aes))' $key 128
    ip -n $ns xfrm state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0x200 reqid 2 mode transport aead 'rfc4106(gcm(aes))' $key 128
done
ip -n a xfrm policy add src 192.0.2.1 dst 192.0.2.2 dir out tmpl proto esp reqid 1 mode transport
ip -n b xfrm policy add src 192.0.2.2 dst 192.0.2.1 dir out tmpl proto esp reqid 2 mode transport
ip -n b xfrm policy add src 192.0.2.1 dst 192.0.2.2 dir in tmpl proto esp reqid 1 mode transport
ip -n a xfrm policy add src 192.0.2.2 dst 192.0.2.1 dir in tmpl proto esp reqid 2 mode transport
ip netns exec a ping -c 2 -W 2 192.0.2.2
ip -n b -s xfrm state get src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 | tee state
grep -q 'aead rfc4106(gcm(aes))' state
grep -Eq ' [1-9][0-9]*\(packets\)' state
grep -q 'rfc4106(gcm(aes))' /proc/crypto
echo esp-ok"#;
    let sh = |script: &str| vec!["-c".to_string(), script.to_string()];
    let cases: Vec<(&str, &str, Vec<String>, i32)> = vec![
        ("true", "/bin/true", vec![], 0),
        ("exit 3", "/bin/sh", sh("exit 3"), 3),
        ("veth+vxlan in netns", "/bin/sh", sh(&netns), 0),
        ("ESP rfc4106(gcm(aes)) ping", "/bin/sh", sh(esp), 0),
    ];
    let env = vec![("FABEDGE_VMTEST".to_string(), "it's ok".to_string())];
    let mut results = Vec::new();
    for kernel in Kernel::ALL {
        prepare(kernel)?;
        for (name, program, args, want) in &cases {
            println!("vm self-test: {kernel}: {name}");
            let started = Instant::now();
            let run = VmRun {
                kernel,
                program: Path::new(program),
                args,
                env: &env,
                timeout: Duration::from_secs(120),
                without_modules: &[],
            };
            let outcome = match self::run(&run) {
                Ok(code) if code == *want => Ok(()),
                Ok(code) => Err(format!("exit code {code}, want {want}")),
                Err(e) => Err(format!("{e:#}")),
            };
            results.push((kernel, *name, started.elapsed(), outcome));
        }
    }
    println!();
    let mut failed = 0;
    for (kernel, name, elapsed, outcome) in &results {
        match outcome {
            Ok(()) => println!(
                "vm self-test: ok     {kernel:>4}  {:>5.1}s  {name}",
                elapsed.as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                println!(
                    "vm self-test: FAILED {kernel:>4}  {:>5.1}s  {name}: {e}",
                    elapsed.as_secs_f64()
                );
            }
        }
    }
    if failed > 0 {
        bail!("{failed} VM self-test case(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{PreparedKernel, WITHOUT_MODULES_ENV, libtest_passed, run_script};

    #[test]
    fn modules_kept_out_are_not_preloaded_and_refused_to_modprobe() {
        let prepared = PreparedKernel {
            release: "6.12.0-test".into(),
            image: PathBuf::from("/nonexistent"),
            initramfs: PathBuf::from("/nonexistent"),
            preload: vec!["veth", "esp4", "xfrm_user", "esp6"],
            unavailable: vec![],
        };
        let script = |without: &[&str]| {
            run_script(
                &prepared,
                Path::new("/ws"),
                Path::new("/bin/true"),
                &[],
                &[],
                without,
                "marker ",
            )
        };
        let without = script(&["esp4", "esp6"]).unwrap();
        assert!(
            without.contains("modprobe -a veth xfrm_user ||"),
            "{without}"
        );
        for module in ["esp4", "esp6"] {
            assert!(
                without.contains(&format!("'install {module} /bin/false'")),
                "{without}"
            );
        }
        assert!(
            without.contains(&format!("export {WITHOUT_MODULES_ENV}=esp4,esp6")),
            "{without}"
        );
        let with = script(&[]).unwrap();
        assert!(
            with.contains("modprobe -a veth esp4 xfrm_user esp6 ||"),
            "{with}"
        );
        assert!(!with.contains("/bin/false") && !with.contains(WITHOUT_MODULES_ENV));
        // Names go into a shell script: nothing but module names.
        assert!(script(&["esp4; rm -rf /"]).is_err());
    }

    #[test]
    fn libtest_summary_lines_give_the_passed_count_and_nothing_else_does() {
        assert_eq!(
            libtest_passed(
                "test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 5 filtered out; finished in 3.1s"
            ),
            Some(2)
        );
        assert_eq!(
            libtest_passed("[  12.3] test result: FAILED. 0 passed; 1 failed; 0 ignored"),
            Some(0)
        );
        assert_eq!(libtest_passed("running 2 tests"), None);
        assert_eq!(libtest_passed("test foo ... ok"), None);
    }
}
