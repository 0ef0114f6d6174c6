//! `fe_tc_empty`: `TC_ACT_OK` and nothing else, the bench's baseline for
//! TC programs (never attached).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

#[classifier]
pub fn fe_tc_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}
