//! Retention, without I/O: which sealed segments of a partition go, by age and by size
//! (Kafka's retention.ms and retention.bytes). Only whole segments, oldest first, never the
//! active one: a partition's start offset moves to the end of the last segment deleted. By
//! size, a segment goes while what stays without it is still at least the limit (Kafka's
//! rule), so a partition holds between the limit and the limit plus one segment.
//!
//! Work-queue subscriptions *pin* what they have not settled (`plan_pinned`): a segment
//! retention would delete stays while a subscription's floor is in it or before it, up to
//! that subscription's caps (bytes held past what retention keeps, and age past the
//! stream's retention); past them the subscription's oldest held records are released
//! (dropped or dead-lettered by the caller, and counted) and retention goes on.

use tidewater_storage::SegmentInfo;

use super::config::StreamConfig;

/// The partition's new start offset when retention deletes something now, else `None`.
/// `start` is where it starts today (segments wholly below it are already gone or going).
pub fn plan_retention(
    segments: &[SegmentInfo],
    start: u64,
    config: &StreamConfig,
    now_ms: i64,
) -> Option<u64> {
    let (_active, sealed) = segments.split_last()?;
    let live: Vec<&SegmentInfo> = sealed.iter().filter(|s| s.end > start).collect();
    let mut kept_bytes: u64 = segments
        .iter()
        .filter(|s| s.end > start)
        .map(|s| s.bytes)
        .sum();
    let oldest_kept = (config.retention_ms > 0).then(|| now_ms.saturating_sub(config.retention_ms));
    let mut new_start = None;
    for seg in live {
        let too_big = config.retention_bytes > 0
            && kept_bytes.saturating_sub(seg.bytes) >= config.retention_bytes as u64;
        // A segment with no timestamp (no stream batch) is not aged out.
        let too_old = oldest_kept
            .is_some_and(|limit| seg.max_timestamp != i64::MIN && seg.max_timestamp < limit);
        if !(too_big || too_old) {
            break;
        }
        kept_bytes -= seg.bytes;
        new_start = Some(seg.end);
    }
    new_start
}

/// A subscription's hold on a partition: its floor (every offset below is settled) and how
/// much it may hold beyond what retention keeps (`None`: no cap; `Some(0)`: retention wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub floor: u64,
    /// Bytes of segments retention would delete that it may hold.
    pub max_bytes: Option<u64>,
    /// How much older than the stream's retention a segment it holds may be (ms).
    pub max_age_ms: Option<u64>,
}

/// What retention does to a partition with subscriptions: its new start, and the pins that
/// had to let go (pin index, the offset its floor moves to: what it had not settled below
/// is released).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedPlan {
    pub new_start: u64,
    pub releases: Vec<(usize, u64)>,
}

/// Retention with pins: `plan_retention`'s segments go, but not past a pin's floor unless
/// the pin is over a cap, oldest segments first; a pin over its cap lets go of its oldest
/// records only as far as retention then deletes. `None` when nothing changes.
pub fn plan_pinned(
    segments: &[SegmentInfo],
    start: u64,
    config: &StreamConfig,
    now_ms: i64,
    pins: &[Pin],
) -> Option<PinnedPlan> {
    let want = plan_retention(segments, start, config, now_ms)?;
    let deletable: Vec<&SegmentInfo> = segments
        .iter()
        .filter(|s| s.end > start && s.end <= want)
        .collect();
    let age_base = now_ms.saturating_sub(config.retention_ms.max(0));
    let mut limit = want;
    let mut wanted = Vec::new();
    for (i, pin) in pins.iter().enumerate() {
        if pin.floor >= want {
            continue;
        }
        let held: Vec<&&SegmentInfo> = deletable.iter().filter(|s| s.end > pin.floor).collect();
        let mut bytes: u64 = held.iter().map(|s| s.bytes).sum();
        let mut to = pin.floor;
        for seg in held {
            let over_bytes = pin.max_bytes.is_some_and(|max| bytes > max);
            let too_old = pin.max_age_ms.is_some_and(|age| {
                seg.max_timestamp != i64::MIN
                    && seg.max_timestamp < age_base.saturating_sub(age.min(i64::MAX as u64) as i64)
            });
            if !(over_bytes || too_old) {
                break;
            }
            bytes -= seg.bytes;
            to = seg.end;
        }
        wanted.push((i, to));
        limit = limit.min(to);
    }
    // A pin lets go only as far as retention then deletes: records another subscription
    // still holds (within its caps) free no disk, so they are not dropped.
    let releases: Vec<(usize, u64)> = wanted
        .into_iter()
        .map(|(i, to)| (i, to.min(limit)))
        .filter(|&(i, to)| to > pins[i].floor)
        .collect();
    // Whole segments only: the end of the last deletable one at or below the limit.
    let new_start = deletable
        .iter()
        .map(|s| s.end)
        .filter(|&end| end <= limit)
        .max()
        .unwrap_or(start)
        .max(start);
    (new_start > start || !releases.is_empty()).then_some(PinnedPlan {
        new_start,
        releases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::config::TimestampType;

    fn seg(base: u64, end: u64, bytes: u64, max_timestamp: i64) -> SegmentInfo {
        SegmentInfo {
            base,
            end,
            bytes,
            max_timestamp,
        }
    }

    fn config(retention_ms: i64, retention_bytes: i64) -> StreamConfig {
        StreamConfig {
            partitions: 1,
            timestamp_type: TimestampType::CreateTime,
            retention_ms,
            retention_bytes,

            ..StreamConfig::new(&Default::default(), &Default::default()).unwrap()
        }
    }

    #[test]
    fn whole_sealed_segments_go_oldest_first_by_size_or_age() {
        // Four segments of 100 bytes; the last is active.
        let segments = [
            seg(0, 10, 100, 1_000),
            seg(10, 20, 100, 2_000),
            seg(20, 30, 100, 3_000),
            seg(30, 35, 100, 4_000),
        ];
        // By size, as Kafka: a segment goes while what stays without it is still at least
        // the limit, so a partition keeps between the limit and the limit plus a segment.
        // 250: the first goes (300 stay), not the second (200 would).
        assert_eq!(plan_retention(&segments, 0, &config(-1, 250), 0), Some(10));
        assert_eq!(plan_retention(&segments, 0, &config(-1, 200), 0), Some(20));
        // At most 400 bytes: nothing to do.
        assert_eq!(plan_retention(&segments, 0, &config(-1, 400), 0), None);
        // By age: older than 2,500 at now 5,000 with retention 2,500: the first two.
        assert_eq!(
            plan_retention(&segments, 0, &config(2_500, -1), 5_000),
            Some(20)
        );
        // The active segment never goes, however old or big.
        assert_eq!(
            plan_retention(&segments, 0, &config(1, 1), 1_000_000),
            Some(30)
        );
        // What is below the start already is not counted again.
        assert_eq!(plan_retention(&segments, 20, &config(-1, 100), 0), Some(30));
        assert_eq!(
            plan_retention(&segments, 30, &config(1, 1), 1_000_000),
            None
        );
        // Forever and unlimited: nothing.
        assert_eq!(
            plan_retention(&segments, 0, &config(-1, -1), i64::MAX),
            None
        );
        // Deletion stops at the first segment that stays (timestamps need not rise).
        let bumpy = [
            seg(0, 10, 100, 9_000),
            seg(10, 20, 100, 1_000),
            seg(20, 30, 100, 9_500),
        ];
        assert_eq!(plan_retention(&bumpy, 0, &config(2_000, -1), 10_000), None);
        assert_eq!(plan_retention(&[], 0, &config(1, 1), 10), None);
    }

    fn pin(floor: u64, max_bytes: Option<u64>, max_age_ms: Option<u64>) -> Pin {
        Pin {
            floor,
            max_bytes,
            max_age_ms,
        }
    }

    #[test]
    fn pins_hold_segments_up_to_their_caps() {
        let segments = [
            seg(0, 10, 100, 1_000),
            seg(10, 20, 100, 2_000),
            seg(20, 30, 100, 3_000),
            seg(30, 35, 100, 4_000),
        ];
        let by_size = config(-1, 100); // retention wants 30
        let plan = |pins: &[Pin]| plan_pinned(&segments, 0, &by_size, 0, pins);
        // No pins: retention's plan.
        assert_eq!(plan(&[]).map(|p| p.new_start), Some(30));
        // A floor in the second segment holds it and what follows; the first goes.
        assert_eq!(
            plan(&[pin(12, None, None)]),
            Some(PinnedPlan {
                new_start: 10,
                releases: vec![]
            })
        );
        // A floor at 0 with no cap: nothing goes, nothing to do.
        assert_eq!(plan(&[pin(0, None, None)]), None);
        // A cap of 150 bytes: it may hold one of the three deletable segments' 300 bytes.
        assert_eq!(
            plan(&[pin(0, Some(150), None)]),
            Some(PinnedPlan {
                new_start: 20,
                releases: vec![(0, 20)]
            })
        );
        // Cap 0: retention wins, the pin lets go of everything retention deletes.
        assert_eq!(
            plan(&[pin(5, Some(0), None)]),
            Some(PinnedPlan {
                new_start: 30,
                releases: vec![(0, 30)]
            })
        );
        // Two pins: the lower one, uncapped, holds; the other, over its cap, drops
        // nothing (the segments stay for the first: dropping would free no disk).
        assert_eq!(
            plan(&[pin(25, Some(0), None), pin(15, None, None)]),
            Some(PinnedPlan {
                new_start: 10,
                releases: vec![]
            })
        );
        // Both capped: each lets go as far as retention then deletes.
        assert_eq!(
            plan(&[pin(0, Some(0), None), pin(5, Some(150), None)]),
            Some(PinnedPlan {
                new_start: 20,
                releases: vec![(0, 20), (1, 20)]
            })
        );
        // By age: a segment older than retention plus the cap is let go.
        let by_age = config(1_000, -1); // at now 4_500: segments older than 3_500 (all sealed)
        let plan = plan_pinned(&segments, 0, &by_age, 4_500, &[pin(0, None, Some(1_600))]);
        // Older than 4_500 - 1_000 - 1_600 = 1_900: only the first.
        assert_eq!(
            plan,
            Some(PinnedPlan {
                new_start: 10,
                releases: vec![(0, 10)]
            })
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn segments() -> impl Strategy<Value = Vec<SegmentInfo>> {
            prop::collection::vec((1u64..20, 1u64..500, 0i64..10_000), 1..8).prop_map(|parts| {
                let mut base = 0;
                parts
                    .into_iter()
                    .map(|(len, bytes, ts)| {
                        let s = seg(base, base + len, bytes, ts);
                        base += len;
                        s
                    })
                    .collect()
            })
        }

        fn pins() -> impl Strategy<Value = Vec<Pin>> {
            prop::collection::vec(
                (
                    0u64..150,
                    prop::option::of(0u64..2_000),
                    prop::option::of(0u64..10_000),
                ),
                0..4,
            )
            .prop_map(|v| v.into_iter().map(|(f, b, a)| pin(f, b, a)).collect())
        }

        proptest! {
            #[test]
            fn pinned_retention_keeps_its_promises(
                segments in segments(),
                start_at in 0usize..4,
                retention_ms in prop::option::of(1i64..10_000),
                retention_bytes in prop::option::of(1i64..3_000),
                now in 0i64..20_000,
                pins in pins(),
            ) {
                let config = config(retention_ms.unwrap_or(-1), retention_bytes.unwrap_or(-1));
                let start = segments.get(start_at).map_or(0, |s| s.base);
                let want = plan_retention(&segments, start, &config, now);
                let plan = plan_pinned(&segments, start, &config, now, &pins);
                if pins.is_empty() {
                    prop_assert_eq!(plan.map(|p| p.new_start), want);
                    return Ok(());
                }
                let Some(plan) = plan else {
                    return Ok(());
                };
                let want = want.expect("a pinned plan only where retention has one");
                // Never past retention's plan, never before the start, on a segment end.
                prop_assert!(plan.new_start <= want && plan.new_start >= start);
                prop_assert!(plan.new_start == start || segments.iter().any(|s| s.end == plan.new_start));
                for (i, p) in pins.iter().enumerate() {
                    let released = plan.releases.iter().find(|r| r.0 == i).map(|r| r.1);
                    // Never past a floor it did not release (a floor below the start is
                    // the start: what is below is gone already).
                    prop_assert!(plan.new_start <= p.floor.max(start).max(released.unwrap_or(0)));
                    if let Some(to) = released {
                        // Only as far as retention deletes now.
                        prop_assert!(to > p.floor && to <= want);
                        prop_assert!(to <= plan.new_start.max(segments.iter().map(|s| s.end).filter(|&e| e > plan.new_start).min().unwrap_or(u64::MAX)));
                    }
                }
                // With every pin capped, what stays past retention's plan is within the
                // largest cap.
                if pins.iter().all(|p| p.max_bytes.is_some()) {
                    let max = pins.iter().filter_map(|p| p.max_bytes).max().unwrap_or(0);
                    let held: u64 = segments.iter()
                        .filter(|s| s.end > plan.new_start && s.end <= want)
                        .map(|s| s.bytes).sum();
                    prop_assert!(held <= max, "{} held past retention's plan, caps {:?}", held, pins);
                }
                // Caps of 0 everywhere: retention's plan exactly.
                let zero: Vec<Pin> = pins.iter().map(|p| pin(p.floor, Some(0), None)).collect();
                let zero_plan = plan_pinned(&segments, start, &config, now, &zero);
                prop_assert_eq!(zero_plan.map(|p| p.new_start), Some(want));
            }
        }
    }
}
