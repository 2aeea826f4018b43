//! Priorities and weighted fair scheduling within one queue. The scan cursor sorts new
//! messages into lanes by (priority level, fairness value) instead of handing them out in
//! log order; a delivery then picks a level (the highest with messages, except that every
//! lower level gets `priority_min_share` of deliveries while it waits) and, within it,
//! a flow by deficit round robin with per-value weights. Lanes hold offsets as runs
//! (`start..end`), so a flooding tenant whose messages arrive back to back costs a few
//! bytes per run, not per message. Runs are bounded; at the bound the scan waits.
//!
//! A published batch's lanes are resolved at publish, while its records are at hand, and
//! staged by base offset: when the scan cursor reaches a staged batch it sorts it in
//! without reading the log back (the scan reads only what was not staged: after a
//! restart, a shaper rebuilt meanwhile, or past the staging bound).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Runs held across all lanes of a queue; at this many the scan stops until some drain.
pub const MAX_RUNS: usize = 1_000_000;
/// Distinct fairness values per level; beyond, new values share the flow "(other)".
pub const MAX_FLOWS: usize = 10_000;
const OTHER_FLOW: &str = "(other)";
/// Messages whose lanes are staged ahead of the scan, at most (4 bytes each).
pub const MAX_STAGED: usize = 1_000_000;

/// A lane resolved at publish: level in the top 8 bits, index in the level below.
pub type LaneRef = u32;

/// Tells shapers apart, so lanes resolved by one are never staged into its successor.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// Lanes of a batch resolved at publish, for `Shaper::stage` once it has its offsets.
#[derive(Debug)]
pub struct StagedLanes {
    generation: u64,
    lanes: Vec<LaneRef>,
}

/// What the scan cursor finds staged (see `Shaper::staged_at`).
#[derive(Debug, PartialEq)]
pub enum Staged {
    /// Lanes of the messages from this base offset on (some may be behind the cursor).
    Here(u64, Vec<LaneRef>),
    /// Nothing staged at the cursor; the next staged batch starts here.
    Until(u64),
    Nothing,
}

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

/// One flow's load (`Shaper::busiest_flows`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlowLoad {
    pub flow: String,
    /// Its messages sorted and waiting, over every priority level.
    pub waiting: u64,
    pub weight: f64,
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
    /// Deliveries owed to each level below the top, by index (each waiting one earns its
    /// share of every delivery).
    owed: Vec<f64>,
    weights: HashMap<String, f64>,
    runs: usize,
    /// (level, lane) and flow of the last push: a lane's next message skips hashing its
    /// flow. (The String is reused, so switching lanes allocates nothing.)
    last_lane: Option<(usize, usize)>,
    last_flow: String,
    generation: u64,
    /// (base offset, lanes) of published batches ahead of the scan, by base offset.
    staged: VecDeque<(u64, Vec<LaneRef>)>,
    staged_len: usize,
}

impl Shaper {
    pub fn new(levels: u8, min_share: f64, weights: HashMap<String, f64>) -> Shaper {
        Shaper {
            levels: (0..levels.max(1)).map(|_| Level::default()).collect(),
            min_share,
            owed: vec![0.0; usize::from(levels.max(1))],
            weights,
            runs: 0,
            last_lane: None,
            last_flow: String::new(),
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            staged: VecDeque::new(),
            staged_len: 0,
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
        let lane = self.lane(priority, flow);
        self.push_to(offset, lane);
    }

    /// Adds a message to a lane resolved before (`lane`, or staged).
    pub fn push_to(&mut self, offset: u64, lane: LaneRef) {
        let level = &mut self.levels[(lane >> 24) as usize];
        let idx = (lane & 0x00ff_ffff) as usize;
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

    /// The lane of `flow` at `priority` (clamped to the levels there are), created if new.
    pub fn lane(&mut self, priority: u8, flow: &str) -> LaneRef {
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
        // (MAX_FLOWS lanes per level fit in 24 bits.)
        ((level_idx as u32) << 24) | idx as u32
    }

    /// True if `n` more messages may have their lanes staged (past the bound, the scan
    /// reads them back).
    pub fn room_to_stage(&self, n: usize) -> bool {
        self.staged_len + n <= MAX_STAGED
    }

    /// A batch's lanes (from `lane`, one per message), to `stage` at its base offset.
    pub fn staged(&self, lanes: Vec<LaneRef>) -> StagedLanes {
        StagedLanes {
            generation: self.generation,
            lanes,
        }
    }

    /// Stages a published batch's lanes at its base offset (dropped if this is not the
    /// shaper that resolved them).
    pub fn stage(&mut self, base: u64, staged: StagedLanes) {
        if staged.generation != self.generation || staged.lanes.is_empty() {
            return;
        }
        self.staged_len += staged.lanes.len();
        // Batches mostly complete in offset order.
        let at = self.staged.partition_point(|(b, _)| *b < base);
        self.staged.insert(at, (base, staged.lanes));
    }

    /// What is staged at the scan cursor: forgets batches the cursor has passed, and
    /// hands out the one the cursor is in when all of it is below `end` (visible).
    pub fn staged_at(&mut self, cursor: u64, end: u64) -> Staged {
        while let Some((base, lanes)) = self.staged.front() {
            let batch_end = base + lanes.len() as u64;
            if batch_end > cursor {
                return match *base {
                    base if base > cursor => Staged::Until(base),
                    _ if batch_end > end => Staged::Nothing,
                    _ => {
                        let (base, lanes) = self.staged.pop_front().expect("front");
                        self.staged_len -= lanes.len();
                        Staged::Here(base, lanes)
                    }
                };
            }
            let (_, lanes) = self.staged.pop_front().expect("front");
            self.staged_len -= lanes.len();
        }
        Staged::Nothing
    }

    /// The next offset to deliver, or None when every lane is empty. While the top level
    /// waits, every waiting level below it earns `min_share` of each delivery (scaled down to
    /// 1/(k+1) when k waiting lower levels would leave the top less than each of them), and
    /// a level owed a whole delivery gets it; the top gets the rest.
    pub fn pop(&mut self) -> Option<u64> {
        let top = self.levels.iter().rposition(|l| l.len > 0)?;
        let waiting = self.levels[..top].iter().filter(|l| l.len > 0).count();
        let mut level = top;
        if waiting > 0 && self.min_share > 0.0 {
            let share = self.min_share.min(1.0 / (waiting as f64 + 1.0));
            let mut most = 0.0;
            for (idx, owed) in self.owed[..top].iter_mut().enumerate() {
                if self.levels[idx].len == 0 {
                    *owed = 0.0; // a level owed nothing while it has nothing waiting
                    continue;
                }
                *owed += share;
                // (A hair under 1: ten additions of 0.1 are 0.9999999999999999.) Ties go
                // to the higher level.
                if *owed >= 1.0 - 1e-9 && *owed >= most {
                    most = *owed;
                    level = idx;
                }
            }
            if level != top {
                self.owed[level] -= 1.0;
            }
        } else {
            self.owed.fill(0.0);
        }
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
    pub fn forget_range(&mut self, range: &Range<u64>) {
        for level in &mut self.levels {
            for lane in &mut level.lanes {
                if !lane
                    .runs
                    .iter()
                    .any(|run| run.start < range.end && range.start < run.end)
                {
                    continue;
                }
                // Runs need not be in order (a subscription's lanes mix sources): cut the
                // range out of each, splitting a run that straddles it.
                let mut kept = VecDeque::with_capacity(lane.runs.len() + 1);
                for run in lane.runs.drain(..) {
                    let before = run.start..run.end.min(range.start);
                    let after = run.start.max(range.end)..run.end;
                    for part in [before, after] {
                        if !part.is_empty() {
                            kept.push_back(part);
                        }
                    }
                }
                lane.runs = kept;
                lane.len = lane.runs.iter().map(|r| r.end - r.start).sum();
            }
            level.len = level.lanes.iter().map(|l| l.len).sum();
        }
        self.runs = self
            .levels
            .iter()
            .flat_map(|level| &level.lanes)
            .map(|lane| lane.runs.len())
            .sum();
    }

    /// Messages waiting per level, highest first (stats).
    pub fn depth_by_level(&self) -> Vec<u64> {
        self.levels.iter().rev().map(|l| l.len).collect()
    }

    /// The `n` flows with the most messages waiting (over all levels), with their weight.
    pub fn busiest_flows(&self, n: usize) -> Vec<FlowLoad> {
        let mut waiting: HashMap<&str, u64> = HashMap::new();
        for level in &self.levels {
            for (flow, &lane) in &level.flows {
                let len = level.lanes[lane].len;
                if len > 0 {
                    *waiting.entry(flow.as_str()).or_default() += len;
                }
            }
        }
        let mut out: Vec<FlowLoad> = waiting
            .into_iter()
            .map(|(flow, waiting)| FlowLoad {
                flow: flow.to_string(),
                waiting,
                weight: self.weights.get(flow).copied().unwrap_or(1.0),
            })
            .collect();
        out.sort_unstable_by(|a, b| b.waiting.cmp(&a.waiting).then_with(|| a.flow.cmp(&b.flow)));
        out.truncate(n);
        out
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
    fn the_busiest_flows_over_every_level_with_their_weights() {
        let mut shaper = Shaper::new(2, 0.0, HashMap::from([("acme".to_string(), 3.0)]));
        for offset in 0..5 {
            shaper.push(offset, 0, "acme");
        }
        for offset in 5..8 {
            shaper.push(offset, 1, "acme");
        }
        for offset in 8..10 {
            shaper.push(offset, 0, "globex");
        }
        let got: Vec<(String, u64, f64)> = shaper
            .busiest_flows(10)
            .into_iter()
            .map(|f| (f.flow, f.waiting, f.weight))
            .collect();
        assert_eq!(
            got,
            vec![("acme".to_string(), 8, 3.0), ("globex".to_string(), 2, 1.0)]
        );
        assert_eq!(shaper.busiest_flows(1).len(), 1);
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
        // One in ten deliveries goes to each lower level while the top level waits.
        assert_eq!(high, 89);
        assert_eq!(got.iter().filter(|o| level(o) == 1).count(), 11);
        assert_eq!(got.iter().filter(|o| level(o) == 0).count(), 10);
        // Without a minimum share, strict priority.
        let mut strict = Shaper::new(2, 0.0, HashMap::new());
        strict.push(0, 0, "t");
        strict.push(1, 1, "t");
        strict.push(2, 9, "t"); // clamped to the top level
        assert_eq!(drain(&mut strict, 3), vec![1, 2, 0]);
    }

    /// 3 levels, min share 0.1, 2,000 waiting in each: the lowest level got nothing in the
    /// first 1,500 deliveries (1,364 / 136 / 0): the share went to the next level down only.
    #[test]
    fn every_waiting_level_gets_its_minimum_share() {
        let mut shaper = Shaper::new(3, 0.1, HashMap::new());
        for offset in 0..6_000u64 {
            shaper.push(offset, (offset % 3) as u8, "t");
        }
        let got = drain(&mut shaper, 1_500);
        let count = |level: u64| got.iter().filter(|o| *o % 3 == level).count();
        for level in [0, 1] {
            assert!(
                (149..=150).contains(&count(level)),
                "level {level}: {} of 1,500",
                count(level)
            );
        }
        assert_eq!(count(0) + count(1) + count(2), 1_500);
    }

    proptest::proptest! {
        /// Whatever the levels and share, while every level waits, each level below the top
        /// gets its share of deliveries (scaled down only when the shares of the waiting
        /// levels would leave the top less than any of them), and the top the rest.
        #[test]
        fn shares_per_level_hold_while_levels_wait(
            levels in 2u8..=10,
            min_share in 0.01f64..=0.5,
            n in 100usize..2_000,
        ) {
            let mut shaper = Shaper::new(levels, min_share, HashMap::new());
            let per_level = n as u64; // every level outlasts the drain
            for offset in 0..per_level * u64::from(levels) {
                shaper.push(offset, (offset % u64::from(levels)) as u8, "t");
            }
            let got = drain(&mut shaper, n);
            let lower = f64::from(levels - 1);
            let share = min_share.min(1.0 / (lower + 1.0));
            for level in 0..u64::from(levels) - 1 {
                let count = got.iter().filter(|o| *o % u64::from(levels) == level).count();
                let expected = share * n as f64;
                proptest::prop_assert!(
                    (count as f64 - expected).abs() <= 2.0,
                    "level {} of {}: {} of {} deliveries, expected {:.1}",
                    level, levels, count, n, expected
                );
            }
            let top = got.iter().filter(|o| *o % u64::from(levels) == u64::from(levels) - 1).count();
            proptest::prop_assert!(top as f64 >= share * n as f64 - 2.0, "top {} of {}", top, n);
        }
    }

    #[test]
    fn a_purge_forgets_what_it_settled() {
        let mut shaper = Shaper::new(1, 0.0, HashMap::new());
        for offset in [1, 2, 3, 7, 8] {
            shaper.push(offset, 0, "t");
        }
        shaper.forget_range(&(0..3));
        assert_eq!(shaper.len(), 3);
        assert_eq!(drain(&mut shaper, 10), vec![3, 7, 8]);
        assert_eq!(shaper.runs, 0);
    }

    #[test]
    fn staged_lanes_meet_the_scan_cursor() {
        let mut shaper = Shaper::new(2, 0.0, HashMap::new());
        let lanes = |shaper: &mut Shaper, flows: &[(u8, &str)]| {
            let lanes = flows.iter().map(|&(p, f)| shaper.lane(p, f)).collect();
            shaper.staged(lanes)
        };
        let a = lanes(&mut shaper, &[(0, "x"), (1, "y")]);
        let b = lanes(&mut shaper, &[(0, "x"), (0, "z"), (0, "x")]);
        // Completions may come out of order; the cursor meets them in offset order.
        shaper.stage(12, b);
        shaper.stage(10, a);
        assert_eq!(
            shaper.staged_at(5, 100),
            Staged::Until(10),
            "scan 5..10 first"
        );
        let Staged::Here(10, first) = shaper.staged_at(10, 100) else {
            panic!("the batch at 10")
        };
        assert_eq!(first.len(), 2);
        assert_eq!(
            shaper.staged_at(12, 13),
            Staged::Nothing,
            "not all visible yet"
        );
        let Staged::Here(12, second) = shaper.staged_at(13, 15) else {
            panic!("the batch at 12, partly behind the cursor")
        };
        for (offset, lane) in (10..).zip(first.into_iter().chain(second)) {
            shaper.push_to(offset, lane);
        }
        // Level 1 first, then "x" and "z" in turns at level 0.
        assert_eq!(drain(&mut shaper, 10), vec![11, 10, 13, 12, 14]);
        // Passed batches are forgotten; a successor shaper drops lanes it did not resolve.
        let old = lanes(&mut shaper, &[(0, "x")]);
        let passed = lanes(&mut shaper, &[(0, "x")]);
        shaper.stage(20, passed);
        assert_eq!(shaper.staged_at(21, 100), Staged::Nothing);
        let mut rebuilt = Shaper::new(2, 0.0, HashMap::new());
        rebuilt.stage(30, old);
        assert_eq!(rebuilt.staged_at(30, 100), Staged::Nothing);
        assert_eq!(shaper.staged_len + rebuilt.staged_len, 0);
    }

    #[test]
    fn jain_index_bounds() {
        assert!((jain_index(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-9);
        assert!((jain_index(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-9);
    }
}
