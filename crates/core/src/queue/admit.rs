//! Admission: capacity, producer quotas, deduplication claims, the drain rate behind a
//! Retry-After.

use crate::error::{BrokerError, ErrorCode};

use super::QueueState;

/// Settlements per second, measured over windows of at least a second.
#[derive(Debug, Clone, Default)]
pub(super) struct DrainMeter {
    rate_per_s: f64,
    window_start_ms: i64,
    window_count: u64,
}

impl DrainMeter {
    pub(super) fn record(&mut self, n: u64, now_ms: i64) {
        if self.window_start_ms == 0 {
            self.window_start_ms = now_ms;
        }
        self.window_count += n;
        let elapsed = now_ms - self.window_start_ms;
        if elapsed >= 1_000 {
            let rate = self.window_count as f64 * 1_000.0 / elapsed as f64;
            self.rate_per_s = if self.rate_per_s == 0.0 {
                rate
            } else {
                0.5 * self.rate_per_s + 0.5 * rate
            };
            self.window_start_ms = now_ms;
            self.window_count = 0;
        }
    }

    /// How long until `excess` messages have drained at the measured rate (100 ms ..= 5 min).
    /// Without a recent measurement: 1 s (a refused publish is cheap to retry).
    pub(super) fn wait_ms(&self, excess: u64, now_ms: i64) -> u64 {
        let stale = now_ms - self.window_start_ms > 10_000;
        if self.rate_per_s <= 0.0 || stale {
            return 1_000;
        }
        ((excess as f64 / self.rate_per_s) * 1_000.0).clamp(100.0, 300_000.0) as u64
    }
}

impl QueueState {
    /// Takes quota tokens for a publish of `(tenant, messages, bytes)`, or refuses it whole
    /// with the exact time until the tokens exist.
    pub fn admit_quota(
        &mut self,
        demand: &[(&str, u64, u64)],
        now_ms: i64,
    ) -> Result<(), BrokerError> {
        let Some(quota) = &self.config.quota else {
            return Ok(());
        };
        self.quotas.admit(quota, demand, now_ms).map_err(|over| {
            *self.counters.refused.entry("quota").or_default() += 1;
            BrokerError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "tenant '{}' is over its {} quota on queue '{}'; nothing was stored, retry in {} ms",
                    over.tenant, over.what, self.name, over.wait_ms
                ),
            )
            .retry_after(over.wait_ms)
        })
    }

    /// Of these (index in batch, client-chosen id), the indexes that duplicate an id
    /// accepted within the dedup window; the others are claimed until `release_ids`.
    pub fn claim_ids(&mut self, ids: &[(usize, &[u8])], max_ids: u32, now_ms: i64) -> Vec<usize> {
        let window = self.config.dedup_window_ms;
        if window == 0 || ids.is_empty() {
            return Vec::new();
        }
        self.dedup.prune(window, max_ids as usize, now_ms);
        let dups: Vec<usize> = ids
            .iter()
            .filter(|(_, id)| self.dedup.check_and_claim(id, now_ms))
            .map(|&(idx, _)| idx)
            .collect();
        self.counters.deduplicated += dups.len() as u64;
        dups
    }

    /// Forgets claims of a publish that was refused or failed.
    pub fn release_ids(&mut self, ids: &[Vec<u8>]) {
        self.dedup.release(ids);
    }

    /// Publishes refused by quota, per tenant (the top tenants, then "other").
    pub fn quota_refusals(&self) -> std::collections::BTreeMap<String, u64> {
        self.quotas
            .refused
            .iter()
            .map(|(t, n)| (t.clone(), *n))
            .collect()
    }

    /// Reserves room for a publish or refuses it with a retry-after from the drain rate.
    pub fn admit(&mut self, n: u64, bytes: u64, now_ms: i64) -> Result<(), BrokerError> {
        if n > self.config.max_messages || bytes > self.config.max_bytes {
            // Not even an empty queue takes it: a retry would be refused forever.
            *self.counters.refused.entry("exceeds_capacity").or_default() += 1;
            let what = if n > self.config.max_messages {
                format!("{n} messages, max_messages is {}", self.config.max_messages)
            } else {
                format!("{bytes} bytes, max_bytes is {}", self.config.max_bytes)
            };
            return Err(BrokerError::new(
                ErrorCode::ExceedsCapacity,
                format!(
                    "the publish is larger than queue '{}' can ever hold ({what}); nothing was stored, and a retry cannot succeed: split it or raise the limit",
                    self.name
                ),
            ));
        }
        let messages =
            self.unsettled() + self.parked_info.len() as u64 + self.reserved_messages + n;
        let total_bytes =
            self.backlog_bytes.max(0) as u64 + self.parked_bytes + self.reserved_bytes + bytes;
        if messages > self.config.max_messages || total_bytes > self.config.max_bytes {
            *self.counters.refused.entry("queue_full").or_default() += 1;
            let excess = messages.saturating_sub(self.config.max_messages).max(n);
            let wait = self.drain.wait_ms(excess, now_ms);
            let what = if messages > self.config.max_messages {
                format!(
                    "{} of max_messages {}",
                    self.unsettled(),
                    self.config.max_messages
                )
            } else {
                format!(
                    "{} bytes of max_bytes {}",
                    self.backlog_bytes.max(0),
                    self.config.max_bytes
                )
            };
            return Err(BrokerError::new(
                ErrorCode::QueueFull,
                format!(
                    "queue '{}' is full ({what}); nothing was stored, retry in {} s",
                    self.name,
                    wait.div_ceil(1000)
                ),
            )
            .retry_after(wait));
        }
        self.reserved_messages += n;
        self.reserved_bytes += bytes;
        Ok(())
    }

    /// Reserves room without a capacity check (moves of already-accepted messages).
    pub fn reserve_unchecked(&mut self, n: u64, bytes: u64) {
        self.reserved_messages += n;
        self.reserved_bytes += bytes;
    }

    pub fn count_refusal(&mut self, reason: &'static str) {
        *self.counters.refused.entry(reason).or_default() += 1;
    }

    /// Ends a reservation; on success the messages at `base..base+n` join the backlog.
    /// `delays` are (index in batch, deliver_at) of delayed messages.
    pub fn published(&mut self, n: u64, bytes: u64, appended: Option<(u64, &[(u32, i64)])>) {
        self.reserved_messages -= n;
        self.reserved_bytes -= bytes;
        if let Some((base, delays)) = appended {
            // (Publishes go to source 0: a queue's log, a subscription's own log.)
            let src = &mut self.sources[0];
            src.accepted_end = src.accepted_end.max(base + n);
            self.backlog_bytes += bytes as i64;
            self.counters.published += n;
            for &(idx, at) in delays {
                // Behind the cursor the scan has seen it already (and timed or delivered it).
                let offset = base + idx as u64;
                if offset >= self.sources[0].cursor && !self.is_settled_or_busy(offset) {
                    self.add_timer(offset, at);
                }
            }
        }
    }

    /// A consumer signalled overload (nack reason `overloaded`, or leases expired).
    pub fn overloaded(&mut self, now_ms: i64) {
        if let Some(aimd) = &mut self.aimd
            && aimd.overloaded(now_ms)
        {
            self.counters.throttle_cuts += 1;
            self.apply_policies();
        }
    }

    /// Consumers acknowledged messages.
    pub fn succeeded(&mut self, now_ms: i64) {
        if let Some(aimd) = &mut self.aimd
            && aimd.succeeded(now_ms)
        {
            self.counters.throttle_raises += 1;
            self.apply_policies();
        }
    }
}
