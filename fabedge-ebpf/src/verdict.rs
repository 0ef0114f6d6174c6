//! TC verdicts that count why they were given: every `TC_ACT_SHOT` and
//! every hand-off to the kernel moves one counter.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use fabedge_common::Counter;

use crate::stats::count;

#[inline(always)]
pub fn drop(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_SHOT as i32
}

#[inline(always)]
pub fn pass(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_OK as i32
}
