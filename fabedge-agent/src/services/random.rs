//! Tests only: a seeded generator, so a property test sees the same
//! sequences on every run and needs no dependency.

/// xorshift64*.
pub(crate) struct Random(pub u64);

impl Random {
    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}
