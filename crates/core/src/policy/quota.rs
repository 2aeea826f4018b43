//! Producer quotas: a token bucket per tenant (msgs/s and bytes/s), bounded in tenants.

use std::collections::HashMap;

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
}
