//! The arithmetic of flow control, free of queues and I/O: token buckets for producer
//! quotas, GCRA for dispatch rates, AIMD for adaptive throttling. Time is passed in (ms
//! since the epoch), so every rule is tested with exact figures.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::config::Quota;

/// A token bucket (producer quotas). It may go into debt by one request larger than its
/// burst, so a batch bigger than the burst is admitted once the bucket is full, and the
/// rate still holds on average; a refusal says exactly when enough tokens exist.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    per_ms: f64,
    capacity: f64,
    tokens: f64,
    last_ms: i64,
}

impl TokenBucket {
    /// A full bucket refilling `per_s` tokens a second up to `burst`.
    pub fn new(per_s: f64, burst: f64, now_ms: i64) -> Self {
        let capacity = burst.max(1.0);
        TokenBucket {
            per_ms: per_s / 1_000.0,
            capacity,
            tokens: capacity,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let elapsed = (now_ms - self.last_ms).max(0) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Milliseconds until `n` tokens can be taken (0 = now). Takes nothing.
    pub fn wait_ms(&mut self, n: f64, now_ms: i64) -> u64 {
        self.refill(now_ms);
        let needed = n.min(self.capacity);
        if self.tokens >= needed {
            0
        } else {
            ((needed - self.tokens) / self.per_ms).ceil() as u64
        }
    }

    /// Takes `n` tokens; call after `wait_ms` returned 0.
    pub fn take(&mut self, n: f64) {
        self.tokens -= n;
    }

    /// True when the bucket is full again (it can be forgotten and recreated at no loss).
    pub fn is_full(&mut self, now_ms: i64) -> bool {
        self.refill(now_ms);
        self.tokens >= self.capacity
    }
}

/// Token buckets tracked per queue; past this, full buckets are forgotten (a full bucket
/// is the same as a new one) and, if none is full, further tenants share one bucket.
pub const MAX_TRACKED_TENANTS: usize = 10_000;
/// Tenants with their own refusal counter (metric label); the rest count as "other".
pub const MAX_TENANT_LABELS: usize = 20;
const SHARED_TENANT: &str = "(other)";

/// The producer quotas of one queue: a msgs/s and a bytes/s bucket per tenant.
#[derive(Debug, Default)]
pub struct TenantQuotas {
    buckets: HashMap<String, [Option<TokenBucket>; 2]>,
    /// Refused publishes per tenant (bounded; see `MAX_TENANT_LABELS`).
    pub refused: HashMap<String, u64>,
}

/// A refused publish: whose quota, and how long until it would pass.
#[derive(Debug, PartialEq)]
pub struct OverQuota {
    pub tenant: String,
    pub wait_ms: u64,
    pub what: &'static str,
}

impl TenantQuotas {
    /// Forgets buckets (after a quota change: every tenant starts full).
    pub fn reset(&mut self) {
        self.buckets.clear();
    }

    /// Admits `(tenant, messages, bytes)` demands whole, or refuses with the longest wait.
    pub fn admit(
        &mut self,
        quota: &Quota,
        demand: &[(&str, u64, u64)],
        now_ms: i64,
    ) -> Result<(), OverQuota> {
        let mut worst: Option<OverQuota> = None;
        // Make room first: a prune between resolving two tenants' buckets could drop the
        // first (full buckets go), and both passes below need every bucket they resolved.
        if self.buckets.len() + demand.len() > MAX_TRACKED_TENANTS {
            self.buckets
                .retain(|_, b| !b.iter_mut().flatten().all(|b| b.is_full(now_ms)));
        }
        // Bucket keys: the tenant itself once tracked (no allocation per publish).
        let keys: Vec<&str> = demand
            .iter()
            .map(|&(tenant, _, _)| self.key_for(quota, tenant, now_ms))
            .collect();
        for (&(tenant, msgs, bytes), key) in demand.iter().zip(&keys) {
            let Some(buckets) = self.buckets.get_mut(*key) else {
                continue; // (key_for created it, and nothing removes buckets here)
            };
            for (i, (n, what)) in [(msgs, "msgs_per_s"), (bytes, "bytes_per_s")]
                .into_iter()
                .enumerate()
            {
                if let Some(bucket) = &mut buckets[i] {
                    let wait_ms = bucket.wait_ms(n as f64, now_ms);
                    if wait_ms > 0 && worst.as_ref().is_none_or(|w| w.wait_ms < wait_ms) {
                        worst = Some(OverQuota {
                            tenant: tenant.to_string(),
                            wait_ms,
                            what,
                        });
                    }
                }
            }
        }
        if let Some(over) = worst {
            let label = if self.refused.contains_key(&over.tenant)
                || self.refused.len() < MAX_TENANT_LABELS
            {
                over.tenant.clone()
            } else {
                "other".to_string()
            };
            *self.refused.entry(label).or_default() += 1;
            return Err(over);
        }
        for (&(_, msgs, bytes), key) in demand.iter().zip(&keys) {
            let Some(buckets) = self.buckets.get_mut(*key) else {
                continue;
            };
            for (i, n) in [msgs, bytes].into_iter().enumerate() {
                if let Some(bucket) = &mut buckets[i] {
                    bucket.take(n as f64);
                }
            }
        }
        Ok(())
    }

    /// The bucket key of a tenant, its buckets created (full) on first sight; past
    /// `MAX_TRACKED_TENANTS` new tenants share one bucket.
    fn key_for<'t>(&mut self, quota: &Quota, tenant: &'t str, now_ms: i64) -> &'t str {
        if self.buckets.contains_key(tenant) {
            return tenant;
        }
        let key = if self.buckets.len() < MAX_TRACKED_TENANTS {
            tenant
        } else {
            SHARED_TENANT
        };
        if !self.buckets.contains_key(key) {
            let limits = quota.limits_for(key);
            let bucket = |rate: Option<f64>, burst: Option<u64>| {
                rate.map(|r| TokenBucket::new(r, burst.map_or(r.max(1.0), |b| b as f64), now_ms))
            };
            self.buckets.insert(
                key.to_string(),
                [
                    bucket(limits.msgs_per_s, limits.burst_msgs),
                    bucket(limits.bytes_per_s, limits.burst_bytes),
                ],
            );
        }
        key
    }
}

/// Message ids accepted within a window (deduplication). Ids are claimed when a publish is
/// checked, so two concurrent publishes of one id cannot both be enqueued, and released if
/// the publish then fails. Memory per id: its bytes plus about 80 bytes (map entry and the
/// expiry queue share one allocation).
#[derive(Debug, Default)]
pub struct DedupWindow {
    /// id -> publish time of its accepted copy.
    seen: HashMap<Arc<[u8]>, i64>,
    /// (publish time, id), oldest first.
    order: VecDeque<(i64, Arc<[u8]>)>,
}

impl DedupWindow {
    /// Forgets ids older than `window_ms` before `now_ms` and the oldest beyond `max`.
    pub fn prune(&mut self, window_ms: u64, max: usize, now_ms: i64) {
        let horizon = now_ms.saturating_sub(window_ms as i64);
        while let Some((at, id)) = self.order.front() {
            if *at >= horizon && self.order.len() <= max {
                break;
            }
            if self.seen.get(id) == Some(at) {
                self.seen.remove(id);
            }
            self.order.pop_front();
        }
    }

    /// True (a duplicate) if `id` was accepted within the window; otherwise claims it.
    pub fn check_and_claim(&mut self, id: &[u8], now_ms: i64) -> bool {
        if self.seen.contains_key(id) {
            return true;
        }
        let id: Arc<[u8]> = id.into();
        self.seen.insert(id.clone(), now_ms);
        self.order.push_back((now_ms, id));
        false
    }

    /// Gives back claims of a publish that was not stored.
    pub fn release(&mut self, ids: &[Vec<u8>]) {
        for id in ids {
            self.seen.remove(id.as_slice());
        }
        // Their entries in `order` no longer match `seen` and are skipped when pruned.
    }

    /// Restores ids remembered by storage (recovery).
    pub fn restore(&mut self, at_ms: i64, id: &[u8]) {
        self.check_and_claim(id, at_ms);
    }

    pub fn clear(&mut self) {
        self.seen.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The generic cell rate algorithm (dispatch rate limits). `burst` deliveries may go at
/// once; after that one every `1/per_s` seconds. In any window of `w` ms at most
/// `burst + w * per_s / 1000` deliveries conform.
#[derive(Debug, Clone, PartialEq)]
pub struct Gcra {
    interval_ms: f64,
    tolerance_ms: f64,
    /// Theoretical arrival time of the next delivery.
    tat_ms: f64,
}

impl Gcra {
    pub fn new(per_s: f64, burst: u64) -> Self {
        let interval_ms = 1_000.0 / per_s;
        Gcra {
            interval_ms,
            tolerance_ms: (burst.max(1) - 1) as f64 * interval_ms,
            tat_ms: f64::MIN,
        }
    }

    /// Changes the rate and burst, keeping what was already spent.
    pub fn reconfigure(&mut self, per_s: f64, burst: u64) {
        let tat = self.tat_ms;
        *self = Gcra::new(per_s, burst);
        self.tat_ms = tat;
    }

    /// Deliveries that conform now, at most `max` (takes none).
    pub fn available(&self, now_ms: i64, max: usize) -> usize {
        let now = now_ms as f64;
        let tat = self.tat_ms.max(now);
        let slack = now + self.tolerance_ms - tat;
        if slack < 0.0 {
            return 0;
        }
        ((slack / self.interval_ms).floor() as usize)
            .saturating_add(1)
            .min(max)
    }

    /// Records `n` deliveries made now.
    pub fn take(&mut self, now_ms: i64, n: usize) {
        if n > 0 {
            self.tat_ms = self.tat_ms.max(now_ms as f64) + n as f64 * self.interval_ms;
        }
    }

    /// When the next delivery conforms.
    pub fn next_ms(&self) -> i64 {
        (self.tat_ms - self.tolerance_ms).ceil() as i64
    }
}

/// Additive increase, multiplicative decrease of a dispatch rate (adaptive throttling):
/// an overload signal halves the rate (at most once a second, so one burst of expired
/// leases counts once); every second with acknowledgements and no overload adds a
/// twentieth of the range.
#[derive(Debug, Clone, PartialEq)]
pub struct Aimd {
    min_per_s: f64,
    max_per_s: f64,
    current: f64,
    last_cut_ms: i64,
    last_raise_ms: i64,
}

/// Time between two cuts, and between two raises.
const AIMD_STEP_MS: i64 = 1_000;

impl Aimd {
    pub fn new(min_per_s: f64, max_per_s: f64) -> Self {
        Aimd {
            min_per_s,
            max_per_s,
            current: max_per_s,
            last_cut_ms: i64::MIN,
            last_raise_ms: i64::MIN,
        }
    }

    /// Keeps the current rate within new bounds.
    pub fn reconfigure(&mut self, min_per_s: f64, max_per_s: f64) {
        self.min_per_s = min_per_s;
        self.max_per_s = max_per_s;
        self.current = self.current.clamp(min_per_s, max_per_s);
    }

    pub fn rate(&self) -> f64 {
        self.current
    }

    /// A consumer said it is overloaded (or let a lease expire). True if the rate changed.
    pub fn overloaded(&mut self, now_ms: i64) -> bool {
        if now_ms.saturating_sub(self.last_cut_ms) < AIMD_STEP_MS {
            return false;
        }
        self.last_cut_ms = now_ms;
        self.last_raise_ms = now_ms;
        let next = (self.current / 2.0).max(self.min_per_s);
        let changed = next != self.current;
        self.current = next;
        changed
    }

    /// Messages were acknowledged. True if the rate changed.
    pub fn succeeded(&mut self, now_ms: i64) -> bool {
        if now_ms.saturating_sub(self.last_raise_ms) < AIMD_STEP_MS {
            return false;
        }
        self.last_raise_ms = now_ms;
        let step = ((self.max_per_s - self.min_per_s) / 20.0).max(1.0);
        let next = (self.current + step).min(self.max_per_s);
        let changed = next != self.current;
        self.current = next;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_bucket_says_exactly_when_tokens_exist() {
        let mut bucket = TokenBucket::new(10.0, 5.0, 0);
        assert_eq!(bucket.wait_ms(5.0, 0), 0);
        bucket.take(5.0);
        // Empty: one token takes 100 ms at 10/s.
        assert_eq!(bucket.wait_ms(1.0, 0), 100);
        assert_eq!(bucket.wait_ms(3.0, 50), 250);
        assert_eq!(bucket.wait_ms(1.0, 100), 0);
        // Larger than the burst: admitted when full, leaving a debt.
        assert_eq!(bucket.wait_ms(8.0, 100), 400);
        assert_eq!(bucket.wait_ms(8.0, 500), 0);
        bucket.take(8.0);
        assert_eq!(bucket.wait_ms(1.0, 500), 400);
        assert!(!bucket.is_full(500));
        assert!(bucket.is_full(1_300));
    }

    /// Past the tracked bound, full buckets are forgotten before a publish's tenants are
    /// resolved (a prune in between once dropped a bucket resolved for the same publish).
    #[test]
    fn pruning_quota_buckets_keeps_the_tenants_of_the_publish_at_hand() {
        let quota = Quota {
            msgs_per_s: Some(10.0),
            burst_msgs: Some(10),
            ..Quota::default()
        };
        let mut quotas = TenantQuotas::default();
        let tenants: Vec<String> = (0..MAX_TRACKED_TENANTS).map(|i| format!("t{i}")).collect();
        for tenant in &tenants {
            assert!(quotas.admit(&quota, &[(tenant, 1, 0)], 0).is_ok());
        }
        assert_eq!(quotas.buckets.len(), MAX_TRACKED_TENANTS);
        // All full again a second later, except t0 which publishes its whole burst now.
        assert!(quotas.admit(&quota, &[("t0", 9, 0)], 1_000).is_ok());
        let demand = [("t1", 1, 0), ("new", 1, 0), ("t0", 2, 0)];
        let over = quotas.admit(&quota, &demand, 1_000).unwrap_err();
        assert_eq!((over.tenant.as_str(), over.wait_ms), ("t0", 100));
        // Only t0's bucket was not full: the others went, and this publish's came back.
        assert_eq!(quotas.buckets.len(), 3);
        assert!(quotas.admit(&quota, &demand[..2], 1_000).is_ok());
    }

    #[test]
    fn gcra_never_exceeds_rate_plus_burst_in_any_window() {
        // 100/s, burst 10, greedy consumer asking every ms for 1 s.
        let mut gcra = Gcra::new(100.0, 10);
        let mut sent = Vec::new();
        for now in 0..5_000 {
            let n = gcra.available(now, 1_000);
            gcra.take(now, n);
            sent.extend(std::iter::repeat_n(now, n));
        }
        assert_eq!(sent.iter().filter(|&&t| t == 0).count(), 10, "the burst");
        for start in 0..4_000 {
            let in_window = sent
                .iter()
                .filter(|&&t| t >= start && t < start + 1_000)
                .count();
            assert!(in_window <= 110, "{in_window} in the second from {start}");
        }
        // Steady state: 100 per second.
        let last_second = sent.iter().filter(|&&t| t >= 4_000).count();
        assert_eq!(last_second, 100);
    }

    #[test]
    fn gcra_says_when_the_next_delivery_conforms() {
        let mut gcra = Gcra::new(2.0, 1);
        assert_eq!(gcra.available(1_000, 5), 1);
        gcra.take(1_000, 1);
        assert_eq!(gcra.available(1_000, 5), 0);
        assert_eq!(gcra.next_ms(), 1_500);
        assert_eq!(gcra.available(1_499, 5), 0);
        assert_eq!(gcra.available(1_500, 5), 1);
        // A slower rate keeps what was spent.
        gcra.reconfigure(1.0, 1);
        assert_eq!(gcra.next_ms(), 1_500);
    }

    #[test]
    fn aimd_halves_on_overload_and_climbs_back_within_bounds() {
        let mut aimd = Aimd::new(10.0, 210.0);
        assert_eq!(aimd.rate(), 210.0);
        assert!(aimd.overloaded(0));
        assert_eq!(aimd.rate(), 105.0);
        assert!(!aimd.overloaded(500), "one cut per second");
        assert!(aimd.overloaded(1_000));
        assert!(aimd.overloaded(2_000));
        assert!(aimd.overloaded(3_000));
        assert!(aimd.overloaded(4_000));
        assert_eq!(aimd.rate(), 10.0, "floored at min_per_s");
        assert!(!aimd.overloaded(5_000));
        assert!(!aimd.succeeded(5_500), "no raise within a second of a cut");
        assert!(aimd.succeeded(6_000));
        assert_eq!(aimd.rate(), 20.0);
        for t in 0..30 {
            aimd.succeeded(7_000 + t * 1_000);
        }
        assert_eq!(aimd.rate(), 210.0, "capped at max_per_s");
        aimd.reconfigure(10.0, 50.0);
        assert_eq!(aimd.rate(), 50.0);
    }
}
