//! A set of u64 offsets, for the settled offsets above a queue's ack floor. Stored in
//! chunks of 4,096 offsets: a full chunk costs a map entry, a partial one a 512-byte bitmap.
//! Mostly in-order acks give full chunks; scattered acks (fair scheduling leaves a flooding
//! tenant's messages behind while everything around them is acked) cost one bit per offset,
//! where a map of ranges cost a node per acked offset.

use std::collections::BTreeMap;
use std::ops::Range;

const CHUNK_BITS: u64 = 4096;
const WORDS: usize = (CHUNK_BITS / 64) as usize;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    Full,
    /// Bits of the chunk's offsets, and how many are set (1 ..= 4095).
    Some(Box<[u64; WORDS]>, u32),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// chunk index (offset / 4096) -> chunk; absent = no offset of it is in the set.
    chunks: BTreeMap<u64, Chunk>,
    len: u64,
}

/// The words covering bits `[from, to)` of a chunk, each with the mask of those bits.
fn word_masks(from: u64, to: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut bit = from;
    std::iter::from_fn(move || {
        if bit >= to {
            return None;
        }
        let word = bit / 64;
        let lo = bit % 64;
        let hi = (to - word * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        bit = word * 64 + hi;
        Some((word as usize, mask))
    })
}

/// Sets bits `[from, to)` of a chunk's words; returns how many were newly set.
fn set_bits(words: &mut [u64; WORDS], from: u64, to: u64) -> u32 {
    let mut added = 0;
    for (word, mask) in word_masks(from, to) {
        added += (mask & !words[word]).count_ones();
        words[word] |= mask;
    }
    added
}

/// Counts set bits `[from, to)` of a chunk.
fn count_bits(chunk: &Chunk, from: u64, to: u64) -> u64 {
    match chunk {
        Chunk::Full => to - from,
        Chunk::Some(words, _) => word_masks(from, to)
            .map(|(word, mask)| (words[word] & mask).count_ones() as u64)
            .sum(),
    }
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of offsets in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of disjoint ranges (what a checkpoint writes).
    pub fn range_count(&self) -> usize {
        self.iter().count()
    }

    pub fn contains(&self, offset: u64) -> bool {
        match self.chunks.get(&(offset / CHUNK_BITS)) {
            None => false,
            Some(Chunk::Full) => true,
            Some(Chunk::Some(words, _)) => {
                let bit = offset % CHUNK_BITS;
                words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
            }
        }
    }

    /// Inserts a range; returns how many offsets were new.
    pub fn insert(&mut self, range: Range<u64>) -> u64 {
        let mut added = 0u64;
        let mut at = range.start;
        while at < range.end {
            let idx = at / CHUNK_BITS;
            let base = idx * CHUNK_BITS;
            let (from, to) = (at - base, (range.end - base).min(CHUNK_BITS));
            match self.chunks.get_mut(&idx) {
                Some(Chunk::Full) => {}
                Some(chunk @ Chunk::Some(..)) => {
                    let Chunk::Some(words, count) = chunk else {
                        unreachable!()
                    };
                    let new = set_bits(words, from, to);
                    *count += new;
                    added += new as u64;
                    if *count as u64 == CHUNK_BITS {
                        *chunk = Chunk::Full;
                    }
                }
                None => {
                    let chunk = if to - from == CHUNK_BITS {
                        Chunk::Full
                    } else {
                        let mut words = Box::new([0u64; WORDS]);
                        let new = set_bits(&mut words, from, to);
                        Chunk::Some(words, new)
                    };
                    added += to - from;
                    self.chunks.insert(idx, chunk);
                }
            }
            at = base + to;
        }
        self.len += added;
        added
    }

    pub fn insert_one(&mut self, offset: u64) -> bool {
        self.insert(offset..offset + 1) == 1
    }

    /// Removes every offset below `floor`.
    pub fn remove_below(&mut self, floor: u64) {
        let idx = floor / CHUNK_BITS;
        while let Some((&first, chunk)) = self.chunks.first_key_value() {
            if first >= idx {
                break;
            }
            self.len -= count_bits(chunk, 0, CHUNK_BITS);
            self.chunks.remove(&first);
        }
        let below = floor % CHUNK_BITS;
        if below == 0 {
            return;
        }
        let Some(chunk) = self.chunks.get_mut(&idx) else {
            return;
        };
        let removed = count_bits(chunk, 0, below);
        if removed == 0 {
            return;
        }
        self.len -= removed;
        let remaining = count_bits(chunk, below, CHUNK_BITS);
        if remaining == 0 {
            self.chunks.remove(&idx);
            return;
        }
        let mut words = Box::new([0u64; WORDS]);
        match chunk {
            Chunk::Full => {
                set_bits(&mut words, below, CHUNK_BITS);
            }
            Chunk::Some(old, _) => {
                *words = **old;
                for (word, mask) in word_masks(0, below) {
                    words[word] &= !mask;
                }
            }
        }
        *chunk = Chunk::Some(
            words,
            crate::narrow(crate::usize_of(remaining), "a chunk count"),
        );
    }

    /// If `floor` is inside the set, the end of its run (the next offset not in the set).
    pub fn end_of_run(&self, floor: u64) -> u64 {
        let mut at = floor;
        loop {
            let idx = at / CHUNK_BITS;
            match self.chunks.get(&idx) {
                None => return at,
                Some(Chunk::Full) => at = (idx + 1) * CHUNK_BITS,
                Some(Chunk::Some(words, _)) => {
                    let mut bit = at % CHUNK_BITS;
                    while bit < CHUNK_BITS {
                        let word = words[(bit / 64) as usize] >> (bit % 64);
                        let ones = (!word).trailing_zeros() as u64;
                        if ones < 64 - bit % 64 {
                            return idx * CHUNK_BITS + bit + ones;
                        }
                        bit += 64 - bit % 64;
                    }
                    at = (idx + 1) * CHUNK_BITS;
                }
            }
        }
    }

    /// First offset >= `from` that is not in the set.
    pub fn next_absent(&self, from: u64) -> u64 {
        self.end_of_run(from)
    }

    /// The set as disjoint ranges, ascending (never touching).
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut push = |start: u64, end: u64| match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        };
        for (&idx, chunk) in &self.chunks {
            let base = idx * CHUNK_BITS;
            match chunk {
                Chunk::Full => push(base, base + CHUNK_BITS),
                Chunk::Some(words, _) => {
                    let mut bit = 0;
                    while bit < CHUNK_BITS {
                        if words[(bit / 64) as usize] & (1 << (bit % 64)) != 0 {
                            let start = bit;
                            while bit < CHUNK_BITS
                                && words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
                            {
                                bit += 1;
                            }
                            push(base + start, base + bit);
                        } else {
                            bit += 1;
                        }
                    }
                }
            }
        }
        out.into_iter()
    }

    /// Offsets of `range` that are in the set.
    pub fn count_in(&self, range: Range<u64>) -> u64 {
        if range.is_empty() {
            return 0;
        }
        let first = range.start / CHUNK_BITS;
        let last = (range.end - 1) / CHUNK_BITS;
        self.chunks
            .range(first..=last)
            .map(|(&idx, chunk)| {
                let base = idx * CHUNK_BITS;
                let from = range.start.max(base) - base;
                let to = range.end.min(base + CHUNK_BITS) - base;
                count_bits(chunk, from, to)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Runs `ops` (start, len, single?) against the set and a `BTreeSet`, compares every
    /// query at `probes` (counting `span` offsets from each), then `remove_below(floor)`.
    fn check_against_model(
        ops: Vec<(u64, u64, bool)>,
        probes: impl Iterator<Item = u64>,
        span: u64,
        floor: u64,
    ) -> Result<(), TestCaseError> {
        let mut set = RangeSet::new();
        let mut model = BTreeSet::new();
        for (start, len, one) in ops {
            let range = if one {
                start..start + 1
            } else {
                start..start + len
            };
            let added = set.insert(range.clone());
            let before = model.len();
            model.extend(range);
            prop_assert_eq!(added as usize, model.len() - before);
            prop_assert_eq!(set.len() as usize, model.len());
        }
        for probe in probes {
            prop_assert_eq!(set.contains(probe), model.contains(&probe));
            let next = (probe..).find(|o| !model.contains(o)).unwrap();
            prop_assert_eq!(set.next_absent(probe), next);
            prop_assert_eq!(
                set.count_in(probe..probe + span) as usize,
                model.range(probe..probe + span).count()
            );
        }
        set.remove_below(floor);
        model.retain(|&o| o >= floor);
        prop_assert_eq!(set.len() as usize, model.len());
        let ranges: Vec<_> = set.iter().collect();
        prop_assert_eq!(
            ranges.iter().cloned().flatten().collect::<Vec<_>>(),
            model.into_iter().collect::<Vec<_>>()
        );
        // Ranges never touch.
        for pair in ranges.windows(2) {
            prop_assert!(pair[0].end < pair[1].start);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(
            ops in prop::collection::vec((0u64..200, 1u64..20, any::<bool>()), 1..60),
            floor in 0u64..200,
        ) {
            check_against_model(ops, 0..230, 17, floor)?;
        }
    }

    proptest! {
        // Sets over several 4,096-offset chunks: fewer cases keep the suite quick.
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn behaves_like_a_btreeset_across_chunks(
            ops in prop::collection::vec((0u64..13_000, 1u64..5_000, any::<bool>()), 1..30),
            floor in 0u64..13_000,
            probes in prop::collection::vec(0u64..18_000, 40),
        ) {
            let boundaries = [0, 4_095, 4_096, 4_097, 8_191, 8_192, 12_288];
            check_against_model(ops, probes.into_iter().chain(boundaries), 5_000, floor)?;
        }
    }
}
