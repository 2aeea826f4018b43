//! Retention, without I/O: which sealed segments of a partition go, by age and by size
//! (Kafka's retention.ms and retention.bytes). Only whole segments, oldest first, never the
//! active one: a partition's start offset moves to the end of the last segment deleted. By
//! size, a segment goes while what stays without it is still at least the limit (Kafka's
//! rule), so a partition holds between the limit and the limit plus one segment.

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
}
