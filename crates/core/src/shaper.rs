//! Priorities and weighted fair scheduling within one queue. The scan cursor sorts new
//! messages into lanes by (priority level, fairness value) instead of handing them out in
//! log order; a delivery then picks a level (the highest with messages, except that lower
//! levels get at least `priority_min_share` of deliveries while they wait) and, within it,
//! a flow by deficit round robin with per-value weights. Lanes hold offsets as runs
//! (`start..end`), so a flooding tenant whose messages arrive back to back costs a few
//! bytes per run, not per message. Runs are bounded; at the bound the scan waits.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

/// Runs held across all lanes of a queue; at this many the scan stops until some drain.
pub const MAX_RUNS: usize = 1_000_000;
/// Distinct fairness values per level; beyond, new values share the flow "(other)".
pub const MAX_FLOWS: usize = 10_000;
const OTHER_FLOW: &str = "(other)";

/// Offsets of one flow at one priority level, oldest first, as runs.
#[derive(Debug, Default)]
struct Lane {
    runs: VecDeque<Range<u64>>,
    len: u64,
    deficit: f64,
    weight: f64,
    active: bool,
}

impl Lane {
    fn push(&mut self, offset: u64) -> bool {
        self.len += 1;
        match self.runs.back_mut() {
            Some(run) if run.end == offset => {
                run.end += 1;
                false
            }
            _ => {
                self.runs.push_back(offset..offset + 1);
                true
            }
        }
    }

    fn pop(&mut self) -> Option<(u64, bool)> {
        let run = self.runs.front_mut()?;
        let offset = run.start;
        run.start += 1;
        self.len -= 1;
        let emptied = run.is_empty();
        if emptied {
            self.runs.pop_front();
        }
        Some((offset, emptied))
    }
}

#[derive(Debug, Default)]
struct Level {
    /// Lanes by flow; a flow keeps its lane (bounded by `MAX_FLOWS`).
    lanes: Vec<Lane>,
    flows: HashMap<String, usize>,
    /// Lanes with messages, in round-robin order; the front is being served.
    active: VecDeque<usize>,
    len: u64,
}

impl Level {
    /// Deficit round robin over the active flows: the front flow is served while its
    /// deficit lasts, then goes to the back and the next one gets its quantum (weight).
    fn pop(&mut self, runs: &mut usize) -> Option<u64> {
        loop {
            let lane = &mut self.lanes[*self.active.front()?];
            if lane.len == 0 {
                lane.active = false;
                lane.deficit = 0.0;
                self.active.pop_front();
                continue;
            }
            if lane.deficit < 1.0 {
                lane.deficit += lane.weight;
                if lane.deficit < 1.0 {
                    // A weight below 1 accumulates over rounds.
                    self.active.rotate_left(1);
                    continue;
                }
            }
            let (offset, emptied) = lane.pop().expect("non-empty lane");
            if emptied {
                *runs -= 1;
            }
            lane.deficit -= 1.0;
            self.len -= 1;
            if lane.len == 0 {
                lane.active = false;
                lane.deficit = 0.0;
                self.active.pop_front();
            } else if lane.deficit < 1.0 {
                self.active.rotate_left(1);
            }
            return Some(offset);
        }
    }
}

/// `a == b`, without calling memcmp for empty strings: their pointers are dangling, and
/// glibc's AVX-512 memcmp of zero bytes at a dangling address took ~100 ns (a masked-load
/// assist), on every push of a queue without fairness (flow "").
fn same_flow(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

#[derive(Debug)]
pub struct Shaper {
    /// Index = priority (0 = lowest).
    levels: Vec<Level>,
    min_share: f64,
    /// Deliveries owed to lower levels (grows by `min_share` per higher delivery).
    owed: f64,
    weights: HashMap<String, f64>,
    runs: usize,
    /// (level, lane) and flow of the last push: a lane's next message skips hashing its
    /// flow. (The String is reused, so switching lanes allocates nothing.)
    last_lane: Option<(usize, usize)>,
    last_flow: String,
}

impl Shaper {
    pub fn new(levels: u8, min_share: f64, weights: HashMap<String, f64>) -> Shaper {
        Shaper {
            levels: (0..levels.max(1)).map(|_| Level::default()).collect(),
            min_share,
            owed: 0.0,
            weights,
            runs: 0,
            last_lane: None,
            last_flow: String::new(),
        }
    }

    /// True when the lanes hold as many runs as allowed (the scan should wait).
    pub fn is_full(&self) -> bool {
        self.runs >= MAX_RUNS
    }

    /// Offsets held (tests).
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.levels.iter().map(|l| l.len).sum()
    }

    /// Adds a scanned message to its lane (priority is clamped to the levels there are).
    pub fn push(&mut self, offset: u64, priority: u8, flow: &str) {
        let top = self.levels.len() - 1;
        let level_idx = (priority as usize).min(top);
        let level = &mut self.levels[level_idx];
        let cached = match self.last_lane {
            Some((l, idx)) if l == level_idx && same_flow(&self.last_flow, flow) => Some(idx),
            _ => None,
        };
        let idx = match cached.or_else(|| level.flows.get(flow).copied()) {
            Some(idx) => idx,
            None => {
                let flow = if level.lanes.len() < MAX_FLOWS {
                    flow
                } else {
                    OTHER_FLOW
                };
                match level.flows.get(flow) {
                    Some(&idx) => idx,
                    None => {
                        let weight = self.weights.get(flow).copied().unwrap_or(1.0);
                        level.lanes.push(Lane {
                            weight,
                            ..Lane::default()
                        });
                        level.flows.insert(flow.to_string(), level.lanes.len() - 1);
                        level.lanes.len() - 1
                    }
                }
            }
        };
        if cached.is_none() {
            // Consecutive messages mostly share a lane (one priority, a flooding tenant).
            self.last_lane = Some((level_idx, idx));
            self.last_flow.clear();
            self.last_flow.push_str(flow);
        }
        let lane = &mut level.lanes[idx];
        if lane.push(offset) {
            self.runs += 1;
        }
        if !lane.active {
            lane.active = true;
            level.active.push_back(idx);
        }
        level.len += 1;
    }

    /// The next offset to deliver, or None when every lane is empty.
    pub fn pop(&mut self) -> Option<u64> {
        let top = self.levels.iter().rposition(|l| l.len > 0)?;
        let lower = self.levels[..top].iter().rposition(|l| l.len > 0);
        let level = match lower {
            // (A hair under 1: ten additions of 0.1 are 0.9999999999999999.)
            Some(lower) if self.owed >= 1.0 - 1e-9 => {
                self.owed -= 1.0;
                lower
            }
            Some(_) => {
                self.owed += self.min_share;
                top
            }
            None => {
                self.owed = 0.0;
                top
            }
        };
        self.levels[level].pop(&mut self.runs)
    }

    /// Changes weights and minimum share in place; a change of level count rebuilds the
    /// shaper (the caller hands the offsets back to scheduling).
    pub fn reconfigure(&mut self, min_share: f64, weights: HashMap<String, f64>) {
        self.min_share = min_share;
        for level in &mut self.levels {
            for (flow, &idx) in &level.flows {
                level.lanes[idx].weight = weights.get(flow).copied().unwrap_or(1.0);
            }
        }
        self.weights = weights;
    }

    pub fn levels(&self) -> usize {
        self.levels.len()
    }

    /// Every offset held, in no particular order (consistency checks, draining).
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.levels
            .iter()
            .flat_map(|l| l.lanes.iter())
            .flat_map(|lane| lane.runs.iter().cloned().flatten())
    }

    /// Forgets offsets below `end` (a purge settled them).
    pub fn forget_below(&mut self, end: u64) {
        for level in &mut self.levels {
            for lane in &mut level.lanes {
                while let Some(run) = lane.runs.front_mut() {
                    if run.end <= end {
                        lane.len -= run.end - run.start;
                        lane.runs.pop_front();
                        self.runs -= 1;
                    } else {
                        if run.start < end {
                            lane.len -= end - run.start;
                            run.start = end;
                        }
                        break;
                    }
                }
            }
            level.len = level.lanes.iter().map(|l| l.len).sum();
        }
    }

    /// Messages waiting per level, highest first (stats).
    pub fn depth_by_level(&self) -> Vec<u64> {
        self.levels.iter().rev().map(|l| l.len).collect()
    }

    /// Flows with messages waiting, over all levels (stats).
    pub fn active_flows(&self) -> usize {
        self.levels.iter().map(|l| l.active.len()).sum()
    }
}

/// Jain's fairness index of shares: 1 = perfectly even, 1/n = one takes everything.
pub fn jain_index(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|s| s * s).sum();
    if squares == 0.0 {
        return 1.0;
    }
    sum * sum / (shares.len() as f64 * squares)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(shaper: &mut Shaper, n: usize) -> Vec<u64> {
        (0..n).map_while(|_| shaper.pop()).collect()
    }

    #[test]
    fn equal_weights_share_evenly_despite_a_flood() {
        let mut shaper = Shaper::new(1, 0.0, HashMap::new());
        // 95% from "big", 5% spread over four others, interleaved as they arrive.
        let mut flow_of = HashMap::new();
        for offset in 0..20_000u64 {
            let flow = if offset % 20 == 0 {
                ["b", "c", "d", "e"][(offset / 20 % 4) as usize]
            } else {
                "big"
            };
            flow_of.insert(offset, flow);
            shaper.push(offset, 0, flow);
        }
        // Runs: the flood is kept as runs between the others' messages, not per message.
        assert_eq!(shaper.runs, 2_000, "20,000 messages");
        let got = drain(&mut shaper, 1_000);
        let mut counts: HashMap<&str, f64> = HashMap::new();
        for o in &got {
            *counts.entry(flow_of[o]).or_default() += 1.0;
        }
        let shares: Vec<f64> = ["big", "b", "c", "d", "e"]
            .iter()
            .map(|f| counts[f])
            .collect();
        assert!(jain_index(&shares) >= 0.99, "{shares:?}");
        // Within a flow, oldest first.
        let big: Vec<u64> = got
            .iter()
            .copied()
            .filter(|o| flow_of[o] == "big")
            .collect();
        assert!(big.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn weights_set_the_shares() {
        let weights = HashMap::from([("gold".to_string(), 3.0), ("tin".to_string(), 0.5)]);
        let mut shaper = Shaper::new(1, 0.0, weights);
        for offset in 0..3_000u64 {
            shaper.push(offset, 0, ["gold", "plain", "tin"][(offset % 3) as usize]);
        }
        let got = drain(&mut shaper, 900);
        let count = |r: u64| got.iter().filter(|o| **o % 3 == r).count();
        // 3 : 1 : 0.5 of 900 = 600 : 200 : 100.
        assert_eq!((count(0), count(1), count(2)), (600, 200, 100));
    }

    #[test]
    fn higher_levels_first_with_a_minimum_share_below() {
        let mut shaper = Shaper::new(3, 0.1, HashMap::new());
        for offset in 0..1_000u64 {
            shaper.push(offset, (offset % 3) as u8, "t");
        }
        let got = drain(&mut shaper, 110);
        let level = |o: &u64| o % 3;
        let high = got.iter().filter(|o| level(o) == 2).count();
        // One in eleven deliveries goes below while the top level waits.
        assert_eq!(high, 100);
        assert_eq!(got.iter().filter(|o| level(o) == 1).count(), 10);
        // Without a minimum share, strict priority.
        let mut strict = Shaper::new(2, 0.0, HashMap::new());
        strict.push(0, 0, "t");
        strict.push(1, 1, "t");
        strict.push(2, 9, "t"); // clamped to the top level
        assert_eq!(drain(&mut strict, 3), vec![1, 2, 0]);
    }

    #[test]
    fn a_purge_forgets_what_it_settled() {
        let mut shaper = Shaper::new(1, 0.0, HashMap::new());
        for offset in [1, 2, 3, 7, 8] {
            shaper.push(offset, 0, "t");
        }
        shaper.forget_below(3);
        assert_eq!(shaper.len(), 3);
        assert_eq!(drain(&mut shaper, 10), vec![3, 7, 8]);
        assert_eq!(shaper.runs, 0);
    }

    #[test]
    fn jain_index_bounds() {
        assert!((jain_index(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-9);
        assert!((jain_index(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-9);
    }
}
