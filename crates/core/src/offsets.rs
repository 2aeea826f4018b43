//! Maps and sets keyed by broker-assigned offsets, with a cheap hasher.

use std::collections::{HashMap, HashSet};

/// Hashes broker-assigned offsets cheaply (SipHash showed up in profiles). Keys are never
/// chosen by clients (receipts are only looked up), so flooding one bucket is not possible.
#[derive(Default, Clone, Copy)]
pub struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ b as u64);
        }
    }
    fn write_u64(&mut self, x: u64) {
        // Blocks of 64 offsets land in unrelated places, but the offsets of one block land
        // side by side: walking offsets in order (leases, acks) touches a few cache lines
        // instead of one per entry.
        let h = ((x >> 6) ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let h = h ^ (h >> 29);
        self.0 = (h & !63) | ((h ^ x) & 63);
    }
}

pub type OffsetMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<OffsetHasher>>;
pub type OffsetSet = HashSet<u64, std::hash::BuildHasherDefault<OffsetHasher>>;
