//! Datapath harness: the real object loaded into a private bpffs root, its
//! programs run with `BPF_PROG_TEST_RUN`, its maps read and written directly.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use fabedge_agent::{
    datapath::{self, AttachMode, Datapath, PinLayout, Program},
    maps::Maps,
};
use fabedge_common::Counter;

/// `TC_ACT_*` verdicts, as programs return them.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// Size of `struct __sk_buff` and the offsets of the fields tests set or read.
const SKB_CTX_SIZE: usize = 192;
const SKB_MARK_OFF: usize = 8;
const SKB_GSO_SEGS_OFF: usize = 164;
const SKB_GSO_SIZE_OFF: usize = 176;

/// A private, loaded copy of the datapath. Removed (pins and all) on drop.
pub struct TestDatapath {
    pub datapath: Datapath,
    pub maps: Maps,
    root: PathBuf,
}

/// What a program did with one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The TC verdict.
    pub action: i32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// The skb mark as the program left it.
    pub mark: u32,
}

/// Extra skb context for a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct SkbIn {
    pub mark: u32,
    /// Pretend the packet is a GSO super-packet of this many segments of `gso_size` bytes.
    pub gso_segs: u32,
    pub gso_size: u32,
}

impl TestDatapath {
    /// `name` keeps concurrently running tests apart in bpffs.
    pub fn new(name: &str) -> Result<Self> {
        let root = PathBuf::from(format!("/sys/fs/bpf/fabedge-test-{}-{name}", std::process::id()));
        if root.exists() {
            datapath::uninstall(&root)?;
        }
        let layout = PinLayout::new(&root);
        let datapath = Datapath::load(layout.clone(), AttachMode::Auto)
            .context("loading the datapath (run as root, after `cargo xtask build-ebpf`)")?;
        let maps = Maps::open(&layout)?;
        Ok(TestDatapath { datapath, maps, root })
    }

    pub fn run(&self, program: Program, frame: &[u8]) -> Result<Outcome> {
        self.run_with(program, frame, SkbIn::default())
    }

    pub fn run_with(&self, program: Program, frame: &[u8], skb: SkbIn) -> Result<Outcome> {
        let mut ctx_in = [0u8; SKB_CTX_SIZE];
        ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&skb.mark.to_ne_bytes());
        ctx_in[SKB_GSO_SEGS_OFF..SKB_GSO_SEGS_OFF + 4].copy_from_slice(&skb.gso_segs.to_ne_bytes());
        ctx_in[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&skb.gso_size.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_SIZE];
        let mut data_out = vec![0u8; frame.len() + 256];
        let result = self
            .datapath
            .program(program)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data_out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::new()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", program.symbol()))?;
        if result.data_size_out as usize > data_out.len() {
            bail!("program output of {} bytes did not fit the buffer", result.data_size_out);
        }
        data_out.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes(ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4].try_into().expect("4 bytes"));
        Ok(Outcome { action: result.return_value as i32, data: data_out, mark })
    }

    /// A counter's value summed over CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.maps.counter(counter).unwrap_or_else(|e| panic!("reading counter {}: {e:#}", counter.name()))
    }

    /// Every counter, to diff before/after a run.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL.iter().map(|&c| (c, self.counter(c))).collect()
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        if let Err(e) = datapath::uninstall(&self.root) {
            eprintln!("cleaning up {}: {e:#}", self.root.display());
        }
    }
}
