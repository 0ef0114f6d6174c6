//! A packet generator that is not the bottleneck, and a counter that sees
//! what arrived, both in the kernel (issue 11's benchmark).
//!
//! **Generator.** `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`
//! (Linux ≥ 5.18) runs an XDP program `repeat` times, each time on a fresh
//! copy of one frame in a page-pool page, with `xdp_md.ingress_ifindex`
//! naming a real device of the caller's network namespace. The program's
//! verdict is then carried out for real (`net/bpf/test_run.c`,
//! `xdp_test_run_batch`):
//! - `XDP_PASS`: the frames of a batch become skbs received on that device
//!   (`xdp_recv_frames` → `netif_receive_skb_list`), so they enter the stack
//!   exactly as if the NIC had received them: generic (skb-mode) XDP on the
//!   device, TC ingress, routing, VXLAN sockets, forwarding. A *native* XDP
//!   program attached to the device is NOT run: native XDP lives in the
//!   driver's receive loop, which injected frames never pass through.
//! - `XDP_TX`: turned into a redirect back to the same device
//!   (`xdp_do_redirect_frame`), i.e. transmitted on it as a NIC would.
//! - `XDP_REDIRECT`: carried out (a DEVMAP entry transmits on that device).
//! - `XDP_DROP`/`XDP_ABORTED`: the frame is freed.
//!
//! So to measure a datapath *without* its native XDP program, inject with
//! [`Generator::new`] and `XdpVerdict::Pass`; to measure it *with* its
//! native XDP program, inject with that very program ([`XdpProgram::attached`])
//! chained behind the generator ([`Generator::then`]) so that its verdicts are carried out, and what it passes continues into the
//! stack exactly as from the driver.
//!
//! Each batch (64 frames) runs with bottom halves disabled and ends with
//! `local_bh_enable`, which runs the softirq work the batch queued (the next
//! veth's NAPI, backlog, GRO cells) on the same CPU before the next batch:
//! the kernel's timer over the call (`duration`, which leaves out the time
//! the thread was rescheduled) is the cost of the whole hop on one core.
//!
//! **Counter.** [`FrameCounter`] attaches a small program to a device of
//! the receiving namespace (native XDP or TC ingress, see [`CountAt`]) that
//! counts the frames matching a few bytes and drops them, and passes
//! everything else: the count is taken in the datapath, not by a user-space
//! receiver that would itself be the bottleneck.
//!
//! **Restore.** The kernel recycles the pages of frames the stack or a peer
//! device has freed and does not copy the frame into them again, so the
//! generator's program first restores the frame from a template map
//! (`bpf_xdp_store_bytes`); without it every frame after the first batch
//! would carry what the datapath last wrote (new MACs, a lower TTL, another
//! encapsulation) and be dropped or take another path.
//!
//! All programs here are a few instructions assembled in this file, so the
//! generator needs no object file and works on any kernel with live frames.

use std::{
    ffi::CString,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;

/// XDP verdicts (`enum xdp_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpVerdict {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

// bpf(2) commands and constants from <linux/bpf.h>.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_TCX_INGRESS: u32 = 46;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_TAIL_CALL: i32 = 12;
const BPF_FUNC_XDP_STORE_BYTES: i32 = 190;
/// `BPF_F_XDP_HAS_FRAGS`: a tail call needs caller and callee to agree on it.
const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

// The opcodes the two programs use (class | op | source/size).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const LDX_B: u8 = 0x71; // BPF_LDX | BPF_MEM | BPF_B
const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW (imm BPF_ADD = 0)
const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const JGT_REG: u8 = 0x2d;
const JNE_IMM: u8 = 0x55;
const JEQ_IMM: u8 = 0x15;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a plain repr(C) prefix of `union bpf_attr`, zero-padded,
    // and lives for the whole call; the kernel copies at most size_of::<T>().
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(raw: libc::c_long) -> OwnedFd {
    // SAFETY: the bpf syscall just returned this fd to us and nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(raw as i32) }
}

fn object_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (slot, byte) in out.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    out
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md` as `ctx_in`.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// An XDP program loaded in the kernel, held by its fd.
#[derive(Debug)]
pub struct XdpProgram {
    fd: OwnedFd,
    name: String,
}

impl XdpProgram {
    /// A program that only returns `verdict` (a stand-in datapath in tests).
    pub fn returning(verdict: XdpVerdict) -> Result<Self> {
        let code = [
            insn(MOV64_IMM, 0, 0, 0, verdict as i32),
            insn(EXIT, 0, 0, 0, 0),
        ];
        Self::load("fe_bench_verdict", &code, 0)
    }

    /// The program with kernel id `id` (e.g. one an agent attached).
    pub fn by_id(id: u32, name: &str) -> Result<Self> {
        #[repr(C)]
        #[derive(Default)]
        struct GetFdAttr {
            id: u32,
            next_id: u32,
            open_flags: u32,
        }
        let mut attr = GetFdAttr {
            id,
            ..GetFdAttr::default()
        };
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).with_context(|| {
            format!("opening BPF program id {id} ({name}): is it still loaded?")
        })?;
        Ok(XdpProgram {
            fd: owned_fd(fd),
            name: name.to_owned(),
        })
    }

    /// The XDP program attached to `iface` in `netns`, and how, if any.
    pub fn attached(netns: &Netns, iface: &str) -> Result<Option<(XdpProgram, XdpMode)>> {
        let Some((id, name, mode)) = attached_xdp(netns, iface)? else {
            return Ok(None);
        };
        Ok(Some((XdpProgram::by_id(id, &name)?, mode)))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another handle on the same program.
    pub fn try_clone(&self) -> Result<XdpProgram> {
        Ok(XdpProgram {
            fd: self
                .fd
                .try_clone()
                .context("duplicating a BPF program fd")?,
            name: self.name.clone(),
        })
    }

    fn load(name: &str, insns: &[Insn], prog_flags: u32) -> Result<Self> {
        Ok(XdpProgram {
            fd: load_program(BPF_PROG_TYPE_XDP, BPF_XDP, name, insns, prog_flags)?,
            name: name.to_owned(),
        })
    }
}

fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    insns: &[Insn],
    prog_flags: u32,
) -> Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL in a literal");
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_flags,
        prog_name: object_name(name),
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned_fd(fd)),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "loading BPF program {name} failed ({e}; are we root?); verifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// How an XDP program is attached (`IFLA_XDP_ATTACHED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver: not run for live frames (see the module docs).
    Native,
    /// skb mode: run by the stack on every received skb, live frames included.
    Generic,
    Offload,
}

/// `ip -d -j link show dev <iface>`'s `xdp` object → (prog id, name, mode).
fn attached_xdp(netns: &Netns, iface: &str) -> Result<Option<(u32, String, XdpMode)>> {
    let json = netns.ip(&["-d", "-j", "link", "show", "dev", iface])?;
    let links: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("parsing `ip -j link`: {json}"))?;
    let Some(xdp) = links.get(0).and_then(|l| l.get("xdp")) else {
        return Ok(None);
    };
    // One program: {"mode": 1, "prog": {...}}; several: {"mode": 4, "attached": [{"mode": .., "prog": ..}]}.
    let entry = match xdp.get("attached").and_then(|a| a.get(0)) {
        Some(first) => first,
        None => xdp,
    };
    let mode = match entry.get("mode").and_then(|m| m.as_u64()) {
        Some(1) => XdpMode::Native,
        Some(2) => XdpMode::Generic,
        Some(3) => XdpMode::Offload,
        _ => return Ok(None),
    };
    let prog = entry
        .get("prog")
        .with_context(|| format!("{iface}: `ip -j link` shows XDP without a program: {xdp}"))?;
    let id = prog
        .get("id")
        .and_then(|i| i.as_u64())
        .and_then(|i| u32::try_from(i).ok())
        .with_context(|| format!("{iface}: XDP program without an id: {prog}"))?;
    let name = prog
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or("?")
        .to_owned();
    Ok(Some((id, name, mode)))
}

/// What one injection did.
#[derive(Debug, Clone, Copy)]
pub struct Injection {
    /// Frames the kernel built and ran the program on.
    pub frames: u32,
    /// Wall time of the whole call: program, verdicts and the softirq work
    /// they queued, on one CPU, and any time the thread waited for the CPU.
    pub elapsed: Duration,
    /// The kernel's own time per frame (`BPF_PROG_TEST_RUN`'s `duration`):
    /// the same work, but the time the thread was rescheduled is left out,
    /// so it does not depend on what else the machine is running.
    pub kernel_ns_per_frame: u32,
}

impl Injection {
    /// Frames per second on one CPU by the kernel's clock.
    pub fn pps(&self) -> f64 {
        1e9 / f64::from(self.kernel_ns_per_frame.max(1))
    }
}

/// The generator: `BPF_PROG_TEST_RUN` with live frames of one frame, run
/// through a small program that first restores the frame and then either
/// returns a fixed verdict or tail-calls the datapath's own XDP program.
///
/// The restore is what makes the count exact: the kernel recycles the pages
/// of frames the stack or a peer device has freed and does not copy the
/// frame into them again, so without it the next frames would carry what
/// the datapath last wrote (a forwarded frame's new MACs and TTL, a tunnel
/// frame turned into another) and be dropped or take another path.
pub struct Generator {
    program: XdpProgram,
    frame: Vec<u8>,
    _template: OwnedFd,
    /// The tail-call target and the one-slot PROG_ARRAY holding it.
    _next: Option<(OwnedFd, XdpProgram)>,
}

impl Generator {
    /// Each frame: restore `frame`, return `verdict`. `XdpVerdict::Pass` is
    /// "the NIC received it, no native XDP program" (see the module docs).
    pub fn new(frame: &[u8], verdict: XdpVerdict) -> Result<Self> {
        let template = frame_template(frame)?;
        let code = generator_program(template.as_raw_fd(), frame.len(), None, verdict)?;
        Ok(Generator {
            program: XdpProgram::load("fe_bench_gen", &code, 0)?,
            frame: frame.to_vec(),
            _template: template,
            _next: None,
        })
    }

    /// Each frame: restore `frame`, then run `next` (a tail call), whose
    /// verdict the kernel carries out: "the NIC received it and ran `next`
    /// natively".
    pub fn then(frame: &[u8], next: XdpProgram) -> Result<Self> {
        let template = frame_template(frame)?;
        let mut attempts = Vec::new();
        // A tail call needs both programs to agree on XDP frags support.
        for flags in [0, BPF_F_XDP_HAS_FRAGS] {
            let slots = create_map(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, "fe_bench_next")?;
            let code = generator_program(
                template.as_raw_fd(),
                frame.len(),
                Some(slots.as_raw_fd()),
                XdpVerdict::Pass,
            )?;
            let program = XdpProgram::load("fe_bench_gen", &code, flags)?;
            let target = next.fd.as_raw_fd() as u32;
            match update_elem(&slots, &0u32, &target) {
                Ok(()) => {
                    return Ok(Generator {
                        program,
                        frame: frame.to_vec(),
                        _template: template,
                        _next: Some((slots, next)),
                    });
                }
                Err(e) => attempts.push(format!("prog_flags {flags:#x}: {e}")),
            }
        }
        bail!(
            "cannot chain the generator to XDP program {} (tail call refused: {})",
            next.name,
            attempts.join("; ")
        )
    }

    /// Injects `count` copies of the frame as received on `iface` of `netns`.
    pub fn inject(&self, netns: &Netns, iface: &str, count: u32) -> Result<Injection> {
        ensure!(count > 0, "inject: count must be at least 1");
        let frame = &self.frame;
        let iface_c = CString::new(iface).with_context(|| format!("interface name {iface:?}"))?;
        netns.enter(|| {
            // Resolved inside the namespace: ingress_ifindex is looked up in the caller's.
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(iface_c.as_ptr()) };
            ensure!(ifindex != 0, "no interface {iface} in this namespace");
            let mut ctx = XdpMd {
                data_end: frame.len() as u32,
                ingress_ifindex: ifindex,
                ..XdpMd::default()
            };
            let mut attr = TestRunAttr {
                prog_fd: self.program.fd.as_raw_fd() as u32,
                data_size_in: frame.len() as u32,
                data_in: frame.as_ptr() as u64,
                repeat: count,
                ctx_size_in: size_of::<XdpMd>() as u32,
                ctx_in: &mut ctx as *mut XdpMd as u64,
                flags: BPF_F_TEST_XDP_LIVE_FRAMES,
                ..TestRunAttr::default()
            };
            let start = Instant::now();
            let result = bpf(BPF_PROG_TEST_RUN, &mut attr);
            let elapsed = start.elapsed();
            result.with_context(|| {
                format!(
                    "BPF_PROG_TEST_RUN with live frames on {iface} ({} bytes x{count}): \
                     needs Linux >= 5.18",
                    frame.len()
                )
            })?;
            Ok(Injection {
                frames: count,
                elapsed,
                kernel_ns_per_frame: attr.duration,
            })
        })
    }
}

fn create_map(map_type: u32, key_size: u32, value_size: u32, name: &str) -> Result<OwnedFd> {
    #[repr(C)]
    #[derive(Default)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries: 1,
        map_name: object_name(name),
        ..MapCreateAttr::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)
        .with_context(|| format!("creating BPF map {name} (are we root?)"))?;
    Ok(owned_fd(fd))
}

fn update_elem<K, V>(map: &OwnedFd, key: &K, value: &V) -> std::io::Result<()> {
    update_elem_raw(map, key as *const K as u64, value as *const V as u64)
}

fn update_elem_raw(map: &OwnedFd, key: u64, value: u64) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key,
        value,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A one-entry array holding `frame`, the generator's template.
fn frame_template(frame: &[u8]) -> Result<OwnedFd> {
    ensure!(
        frame.len() >= 14,
        "a {}-byte frame has no Ethernet header",
        frame.len()
    );
    let map = create_map(BPF_MAP_TYPE_ARRAY, 4, frame.len() as u32, "fe_bench_frame")?;
    let key = 0u32;
    update_elem_raw(&map, &key as *const u32 as u64, frame.as_ptr() as u64)
        .context("writing the generator's frame template")?;
    Ok(map)
}

/// ```text
/// r6 = ctx
/// r0 = map_lookup_elem(template, &0); if !r0: return XDP_ABORTED
/// xdp_store_bytes(ctx, 0, r0, len)          restore the frame
/// tail_call(ctx, next, 0)                    if chained; falls through if empty
/// return verdict
/// ```
fn generator_program(
    template_fd: i32,
    len: usize,
    next_fd: Option<i32>,
    verdict: XdpVerdict,
) -> Result<Vec<Insn>> {
    let len = i32::try_from(len).context("frame too long")?;
    let mut code = vec![
        insn(MOV64_REG, 6, 1, 0, 0),
        insn(ST_W, 10, 0, -4, 0),
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, template_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_REG, 2, 10, 0, 0),
        insn(ADD64_IMM, 2, 0, 0, -4),
        insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        insn(JNE_IMM, 0, 0, 2, 0),
        insn(MOV64_IMM, 0, 0, 0, XdpVerdict::Aborted as i32),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_REG, 1, 6, 0, 0),
        insn(MOV64_IMM, 2, 0, 0, 0),
        insn(MOV64_REG, 3, 0, 0, 0),
        insn(MOV64_IMM, 4, 0, 0, len),
        insn(CALL, 0, 0, 0, BPF_FUNC_XDP_STORE_BYTES),
    ];
    if let Some(next) = next_fd {
        code.extend([
            insn(MOV64_REG, 1, 6, 0, 0),
            insn(LD_IMM64, 2, BPF_PSEUDO_MAP_FD, 0, next),
            insn(0, 0, 0, 0, 0),
            insn(MOV64_IMM, 3, 0, 0, 0),
            insn(CALL, 0, 0, 0, BPF_FUNC_TAIL_CALL),
        ]);
    }
    code.extend([
        insn(MOV64_IMM, 0, 0, 0, verdict as i32),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    Ok(code)
}

/// Which frames a [`FrameCounter`] counts: every listed byte must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameMatch {
    bytes: Vec<(u16, u8)>,
}

/// Byte offsets of an untagged Ethernet/IPv4 (no options) frame.
const ETHERTYPE_AT: u16 = 12;
const IP_PROTO_AT: u16 = 14 + 9;
const UDP_DST_PORT_AT: u16 = 14 + 20 + 2;
/// Outer Ethernet, IPv4 (no options), UDP and VXLAN headers.
const VXLAN_OUTER_LEN: u16 = 14 + 20 + 8 + 8;

impl FrameMatch {
    /// IPv4 (no options) UDP to `port`.
    pub fn udp_dst_port(port: u16) -> Self {
        Self::default().udp_at(0, port)
    }

    /// VXLAN (any outer UDP port, IPv4 without options) whose inner frame is
    /// IPv4 UDP to `port`: what a tunnel or Flannel carries, whoever encapsulated it.
    pub fn vxlan_inner_udp_dst_port(port: u16) -> Self {
        let mut m = Self::default();
        m.push_u16(ETHERTYPE_AT, 0x0800);
        m.bytes.push((IP_PROTO_AT, 17));
        m.udp_at(VXLAN_OUTER_LEN, port)
    }

    fn udp_at(mut self, base: u16, port: u16) -> Self {
        self.push_u16(base + ETHERTYPE_AT, 0x0800);
        self.bytes.push((base + IP_PROTO_AT, 17));
        self.push_u16(base + UDP_DST_PORT_AT, port);
        self
    }

    fn push_u16(&mut self, at: u16, value: u16) {
        let [high, low] = value.to_be_bytes();
        self.bytes.push((at, high));
        self.bytes.push((at + 1, low));
    }

    /// Whether `frame` matches (the program's rule, for tests of the matcher).
    pub fn matches(&self, frame: &[u8]) -> bool {
        self.bytes
            .iter()
            .all(|(at, value)| frame.get(usize::from(*at)) == Some(value))
    }
}

/// Where a [`FrameCounter`] sits on its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountAt {
    /// Native XDP: the cheapest receive, and it gives a veth the NAPI
    /// context other devices' `XDP_TX`/`XDP_REDIRECT` into its peer need.
    /// But a veth with an XDP program copies every GSO skb it receives, so
    /// TCP through it is no longer TCP as the kernel normally carries it.
    Xdp,
    /// TC ingress (TCX, Linux >= 6.6): leaves the device as it was.
    TcIngress,
}

/// A program on a device that counts the frames matching a [`FrameMatch`]
/// in an array map and drops them; everything else passes. Detached when dropped.
pub struct FrameCounter {
    map: OwnedFd,
    _program: OwnedFd,
    _link: OwnedFd,
    iface: String,
}

impl FrameCounter {
    /// Counts and drops matching frames arriving on `iface` of `netns`, in XDP.
    pub fn attach(netns: &Netns, iface: &str, matching: &FrameMatch) -> Result<Self> {
        Self::attach_at(netns, iface, matching, CountAt::Xdp)
    }

    pub fn attach_at(
        netns: &Netns,
        iface: &str,
        matching: &FrameMatch,
        at: CountAt,
    ) -> Result<Self> {
        ensure!(
            !matching.bytes.is_empty(),
            "a frame counter needs at least one byte to match"
        );
        let map = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, "fe_bench_count")?;
        let code = counting_program(map.as_raw_fd(), matching, at);
        let (program, attach_type) = match at {
            CountAt::Xdp => (
                load_program(BPF_PROG_TYPE_XDP, BPF_XDP, "fe_bench_count", &code, 0)?,
                BPF_XDP,
            ),
            CountAt::TcIngress => (
                load_program(BPF_PROG_TYPE_SCHED_CLS, 0, "fe_bench_count", &code, 0)?,
                BPF_TCX_INGRESS,
            ),
        };
        let iface_c = CString::new(iface).with_context(|| format!("interface name {iface:?}"))?;
        let link = netns.enter(|| {
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(iface_c.as_ptr()) };
            ensure!(ifindex != 0, "no interface {iface} in this namespace");
            #[repr(C)]
            #[derive(Default)]
            struct LinkCreateAttr {
                prog_fd: u32,
                target_ifindex: u32,
                attach_type: u32,
                flags: u32,
                relative_fd: u32,
                _pad: u32,
                expected_revision: u64,
            }
            let mut attr = LinkCreateAttr {
                prog_fd: program.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type,
                ..LinkCreateAttr::default()
            };
            let fd = bpf(BPF_LINK_CREATE, &mut attr).with_context(|| {
                format!(
                    "attaching the frame counter to {iface} ({at:?}; another XDP program there? \
                     `ip link show dev {iface}`; TC needs Linux >= 6.6)"
                )
            })?;
            Ok(owned_fd(fd))
        })?;
        Ok(FrameCounter {
            map,
            _program: program,
            _link: link,
            iface: iface.to_owned(),
        })
    }

    /// Matching frames seen since attaching.
    pub fn count(&self) -> Result<u64> {
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = ElemAttr {
            map_fd: self.map.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &mut value as *mut u64 as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)
            .with_context(|| format!("reading the frame counter on {}", self.iface))?;
        Ok(value)
    }

    /// The count once it has stopped moving (softirq work may still be
    /// delivering the tail of an injection), or at `timeout` anyway.
    pub fn settled_count(&self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        let mut last = self.count()?;
        loop {
            std::thread::sleep(Duration::from_millis(10));
            let now = self.count()?;
            if now == last || Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }
}

/// ```text
/// r2 = ctx->data; r3 = ctx->data_end
/// if r2 + last_offset + 1 > r3: pass
/// for each (at, value): if *(u8 *)(r2 + at) != value: pass
/// r0 = map_lookup_elem(map, &0); if r0: lock *(u64 *)r0 += 1
/// return drop
/// pass: return pass
/// ```
fn counting_program(map_fd: i32, matching: &FrameMatch, at: CountAt) -> Vec<Insn> {
    // Offsets of data/data_end in struct xdp_md and struct __sk_buff, and the verdicts.
    let (data, data_end, drop, pass_verdict) = match at {
        CountAt::Xdp => (0, 4, XdpVerdict::Drop as i32, XdpVerdict::Pass as i32),
        CountAt::TcIngress => (76, 80, TC_ACT_SHOT, TC_ACT_OK),
    };
    let last = matching.bytes.iter().map(|(at, _)| *at).max().unwrap_or(0);
    let mut code = vec![
        insn(LDX_W, 2, 1, data, 0),
        insn(LDX_W, 3, 1, data_end, 0),
        insn(MOV64_REG, 4, 2, 0, 0),
        insn(ADD64_IMM, 4, 0, 0, i32::from(last) + 1),
    ];
    // Jumps to `pass`, patched once its index is known.
    let mut to_pass = vec![code.len()];
    code.push(insn(JGT_REG, 4, 3, 0, 0));
    for (at, value) in &matching.bytes {
        code.push(insn(LDX_B, 5, 2, *at as i16, 0));
        to_pass.push(code.len());
        code.push(insn(JNE_IMM, 5, 0, 0, i32::from(*value)));
    }
    code.extend([
        insn(ST_W, 10, 0, -4, 0), // key = 0 on the stack
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_REG, 2, 10, 0, 0),
        insn(ADD64_IMM, 2, 0, 0, -4),
        insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        insn(JEQ_IMM, 0, 0, 2, 0), // no entry: skip the add
        insn(MOV64_IMM, 1, 0, 0, 1),
        insn(ATOMIC_DW, 0, 1, 0, 0), // lock *(u64 *)(r0 + 0) += r1
        insn(MOV64_IMM, 0, 0, 0, drop),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    let pass = code.len();
    code.extend([
        insn(MOV64_IMM, 0, 0, 0, pass_verdict),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    for at in to_pass {
        code[at].off = (pass - at - 1) as i16;
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Frame;
    use std::net::Ipv4Addr;

    #[test]
    fn matchers_select_the_frames_they_name() {
        let udp = |port| {
            Frame::eth([2; 6], [4; 6])
                .ipv4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2))
                .udp(1000, port)
                .payload(&[0; 20])
                .build()
        };
        assert!(FrameMatch::udp_dst_port(9).matches(&udp(9)));
        assert!(!FrameMatch::udp_dst_port(9).matches(&udp(10)));
        let vxlan = crate::packet::vxlan_encap(
            Frame::eth([2; 6], [4; 6]),
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(192, 0, 2, 2),
            40000,
            8472,
            1,
            &udp(9),
        );
        assert!(FrameMatch::vxlan_inner_udp_dst_port(9).matches(&vxlan));
        assert!(!FrameMatch::vxlan_inner_udp_dst_port(10).matches(&vxlan));
        assert!(!FrameMatch::vxlan_inner_udp_dst_port(9).matches(&udp(9)));
    }
}
