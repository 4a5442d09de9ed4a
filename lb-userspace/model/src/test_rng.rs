//! A deterministic random source for the randomized (differential) tests:
//! xorshift64, so every run sees the same sequence.

pub struct Rng(pub u64);

impl Rng {
    /// A number in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
