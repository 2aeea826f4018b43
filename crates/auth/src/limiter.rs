//! Failed authentication attempts, limited per source address: each address may fail
//! `burst` times, then once per `refill_ms`; past that every attempt from it (right or
//! wrong) is refused until it may try again. Bounded: at most `max_addresses` addresses are
//! remembered; past that the one that failed longest ago is forgotten.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Failures it may still make, in thousandths.
    tokens_milli: u64,
    updated_ms: i64,
}

#[derive(Debug)]
pub struct FailureLimiter {
    burst: u32,
    refill_ms: u64,
    max_addresses: usize,
    buckets: HashMap<IpAddr, Bucket>,
    /// (updated_ms, address): the oldest first.
    by_age: BTreeSet<(i64, IpAddr)>,
}

impl FailureLimiter {
    pub fn new(burst: u32, refill_ms: u64, max_addresses: usize) -> FailureLimiter {
        FailureLimiter {
            burst: burst.max(1),
            refill_ms: refill_ms.max(1),
            max_addresses: max_addresses.max(1),
            buckets: HashMap::new(),
            by_age: BTreeSet::new(),
        }
    }

    fn refilled(&self, bucket: Bucket, now_ms: i64) -> u64 {
        let elapsed = u64::try_from(now_ms.saturating_sub(bucket.updated_ms)).unwrap_or(0);
        let full = u64::from(self.burst) * 1000;
        (bucket.tokens_milli + elapsed.saturating_mul(1000) / self.refill_ms).min(full)
    }

    /// `Err(retry_after_ms)` when the address has used up its failures.
    pub fn check(&self, addr: IpAddr, now_ms: i64) -> Result<(), u64> {
        let Some(bucket) = self.buckets.get(&addr) else {
            return Ok(());
        };
        let tokens = self.refilled(*bucket, now_ms);
        if tokens >= 1000 {
            Ok(())
        } else {
            Err(((1000 - tokens) * self.refill_ms).div_ceil(1000))
        }
    }

    /// Counts a failed attempt from `addr`.
    pub fn failed(&mut self, addr: IpAddr, now_ms: i64) {
        let full = u64::from(self.burst) * 1000;
        let tokens = match self.buckets.get(&addr) {
            Some(bucket) => {
                self.by_age.remove(&(bucket.updated_ms, addr));
                self.refilled(*bucket, now_ms)
            }
            None => full,
        };
        let bucket = Bucket {
            tokens_milli: tokens.saturating_sub(1000),
            updated_ms: now_ms,
        };
        self.buckets.insert(addr, bucket);
        self.by_age.insert((now_ms, addr));
        while self.buckets.len() > self.max_addresses {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.buckets.remove(&oldest);
        }
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_fails_its_burst_then_waits() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut limiter = FailureLimiter::new(3, 1_000, 100);
        for _ in 0..3 {
            assert_eq!(limiter.check(a, 0), Ok(()));
            limiter.failed(a, 0);
        }
        assert_eq!(limiter.check(a, 0), Err(1_000));
        assert_eq!(limiter.check(a, 400), Err(600));
        assert_eq!(limiter.check(b, 0), Ok(()));
        assert_eq!(limiter.check(a, 1_000), Ok(()));
        limiter.failed(a, 1_000);
        assert_eq!(limiter.check(a, 1_000), Err(1_000));
    }

    #[test]
    fn memory_is_bounded_by_forgetting_the_oldest() {
        let mut limiter = FailureLimiter::new(1, 60_000, 2);
        let addrs: Vec<IpAddr> = (1..=3u8).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        for (t, addr) in addrs.iter().enumerate() {
            limiter.failed(*addr, t as i64);
        }
        assert_eq!(limiter.len(), 2);
        assert_eq!(limiter.check(addrs[0], 3), Ok(()));
        assert!(limiter.check(addrs[2], 3).is_err());
    }
}
