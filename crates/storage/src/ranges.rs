//! A set of u64 offsets stored as disjoint half-open ranges: compact for the mostly
//! in-order acks of a work queue (Kafka share-group state batches use the same idea).

use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end (exclusive); ranges never touch or overlap.
    ranges: BTreeMap<u64, u64>,
    len: u64,
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

    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &end)| offset < end)
    }

    /// Inserts a range; returns how many offsets were new.
    pub fn insert(&mut self, range: Range<u64>) -> u64 {
        if range.is_empty() {
            return 0;
        }
        let (mut start, mut end) = (range.start, range.end);
        let mut covered = 0;
        // Merge with a range that starts before and reaches into or touches `start`.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            covered += e.min(end).saturating_sub(start);
            start = s;
            end = end.max(e);
            self.ranges.remove(&s);
            self.len -= e - s;
        }
        // Merge with every range starting inside [start, end].
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            covered += e.min(range.end).saturating_sub(s.max(range.start));
            end = end.max(e);
            self.ranges.remove(&s);
            self.len -= e - s;
        }
        self.ranges.insert(start, end);
        self.len += end - start;
        (range.end - range.start) - covered
    }

    pub fn insert_one(&mut self, offset: u64) -> bool {
        self.insert(offset..offset + 1) == 1
    }

    /// Removes every offset below `floor`.
    pub fn remove_below(&mut self, floor: u64) {
        while let Some((&s, &e)) = self.ranges.iter().next() {
            if s >= floor {
                break;
            }
            self.ranges.remove(&s);
            self.len -= e - s;
            if e > floor {
                self.ranges.insert(floor, e);
                self.len += e - floor;
                break;
            }
        }
    }

    /// If `floor` is inside the set, the end of its range (the next offset not in the set).
    pub fn end_of_run(&self, floor: u64) -> u64 {
        match self.ranges.range(..=floor).next_back() {
            Some((_, &e)) if e > floor => e,
            _ => floor,
        }
    }

    /// First offset >= `from` that is not in the set.
    pub fn next_absent(&self, from: u64) -> u64 {
        self.end_of_run(from)
    }

    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }

    /// Offsets of `range` that are in the set.
    pub fn count_in(&self, range: Range<u64>) -> u64 {
        let mut n = 0;
        if let Some((_, &e)) = self.ranges.range(..range.start).next_back() {
            n += e.min(range.end).saturating_sub(range.start);
        }
        for (&s, &e) in self.ranges.range(range.start..range.end) {
            n += e.min(range.end) - s;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(ops in prop::collection::vec((0u64..200, 1u64..20, any::<bool>()), 1..60), floor in 0u64..200) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for (start, len, one) in ops {
                let range = if one { start..start + 1 } else { start..start + len };
                let added = set.insert(range.clone());
                let before = model.len();
                model.extend(range);
                prop_assert_eq!(added as usize, model.len() - before);
                prop_assert_eq!(set.len() as usize, model.len());
            }
            for probe in 0..230 {
                prop_assert_eq!(set.contains(probe), model.contains(&probe));
                let next = (probe..).find(|o| !model.contains(o)).unwrap();
                prop_assert_eq!(set.next_absent(probe), next);
                prop_assert_eq!(set.count_in(probe..probe + 17) as usize, model.range(probe..probe + 17).count());
            }
            // ranges never touch
            let ranges: Vec<_> = set.iter().collect();
            for pair in ranges.windows(2) {
                prop_assert!(pair[0].end < pair[1].start);
            }
            set.remove_below(floor);
            model.retain(|&o| o >= floor);
            prop_assert_eq!(set.len() as usize, model.len());
            prop_assert_eq!(set.iter().flatten().collect::<Vec<_>>(), model.into_iter().collect::<Vec<_>>());
        }
    }
}
