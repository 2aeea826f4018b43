//! Partitioning, as Kafka's Java client does it: a keyed record goes to
//! `toPositive(murmur2(key)) % partitions` (the same hash, seed and folding as
//! `org.apache.kafka.common.utils.Utils.murmur2`), so a Kafka producer and a tidewater
//! producer put one key in one partition. Keyless records are spread in sticky batches: a
//! whole produce goes to one partition, the next produce to the next one (Kafka's sticky
//! partitioner, KIP-480, switches per batch the same way).

use std::sync::atomic::{AtomicU32, Ordering};

pub use tidewater_storage::format::kafka::{murmur2, partition_for_key};

/// The partition of each keyless produce: one partition per produce, the next one for the
/// next produce (shared by a stream's producers).
#[derive(Debug, Default)]
pub struct Sticky {
    next: AtomicU32,
}

impl Sticky {
    pub fn next(&self, partitions: u32) -> u32 {
        assert!(partitions > 0, "a stream has at least one partition");
        self.next.fetch_add(1, Ordering::Relaxed) % partitions
    }

    /// The partition the next keyless produce takes, without taking the turn (a produce
    /// that is refused leaves it to the next one).
    pub fn peek(&self, partitions: u32) -> u32 {
        assert!(partitions > 0, "a stream has at least one partition");
        self.next.load(Ordering::Relaxed) % partitions
    }

    /// Moves on to the next partition (a keyless produce was stored).
    pub fn advance(&self) {
        self.next.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apache Kafka's `UtilsTest.testMurmur2`: placement must match the Java client's.
    #[test]
    fn murmur2_matches_kafkas_reference_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, hash) in cases {
            assert_eq!(murmur2(key), hash, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn keys_map_to_stable_partitions_and_keyless_produces_take_turns() {
        // toPositive(-790332482) = 1357151166; 1357151166 % 50 = 16.
        assert_eq!(partition_for_key(b"foobar", 50), 16);
        assert_eq!(partition_for_key(b"foobar", 1), 0);
        for key in [&b"a"[..], b"", b"sensor-17"] {
            assert!(partition_for_key(key, 8) < 8);
            assert_eq!(partition_for_key(key, 8), partition_for_key(key, 8));
        }
        let sticky = Sticky::default();
        let turns: Vec<u32> = (0..7).map(|_| sticky.next(3)).collect();
        assert_eq!(turns, [0, 1, 2, 0, 1, 2, 0]);
    }
}
