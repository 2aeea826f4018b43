//! Maintenance of a queue: lease expiry, timers, time to live, coalescing windows.

use crate::queue::RecordSource as _;
use base64::Engine;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidewater_storage::{AckLevel, BatchBuilder, NewRecord, Op, OpResult};

use super::guard::{Reserved, Settling};
use super::{Broker, QueueHandle};
use crate::config::OnExpire;
use crate::plan::message::{header, new_message_id};
use crate::queue::{HEADER_MERGED, HEADER_TENANT, Unacked};

pub(super) const LEASE_EXPIRED_ERROR: &str = "lease expired";
const TTL_EXPIRED_ERROR: &str = "expired: older than its ttl_ms";

impl Broker {
    /// Expires leases and fires timers of one queue; dead-letters what ran out of deliveries.
    ///
    /// What it takes out of the queue's state is in a guard (`guard.rs`) from the moment it
    /// is taken: a maintenance dropped half-way (the receive that ran it lost its caller)
    /// puts back what it did not finish.
    pub(super) async fn maintain(&self, handle: &Arc<QueueHandle>) {
        let now = self.now_ms();
        let clock = &self.inner.clock;
        let (retries, to_dlq, woke, too_old, replaced, coalesced, merges, skipped) = {
            let mut state = handle.state.lock();
            let expired = state.expire_leases(now);
            if !expired.is_empty() {
                state.overloaded(now);
            }
            if let Err(err) = state.expire_head(&handle.reader, now) {
                tracing::warn!(queue = %handle.name, error = %err, "could not read the queue head for ttl_ms");
            }
            let too_old = Settling::marked(handle, state.take_expired(), clock);
            let replaced = Settling::marked(handle, state.take_cancelled(), clock);
            let (coalesced, merges) = state.close_windows(now);
            let coalesced = Settling::marked(handle, coalesced, clock);
            let merges: Vec<(Vec<u8>, Settling)> = merges
                .into_iter()
                .map(|window| {
                    let members = window
                        .members
                        .iter()
                        .map(|&(offset, size)| Unacked {
                            offset,
                            delivery_count: 0,
                            size,
                        })
                        .collect();
                    (window.key, Settling::marked(handle, members, clock))
                })
                .collect();
            // An expired lease is deliverable again at once (as with SQS's visibility
            // timeout): the lease was the wait. Backoff is for nacks.
            let (retries, to_dlq) = state.plan_retries(
                &*self.inner.jitter,
                expired,
                Some(0),
                Some(LEASE_EXPIRED_ERROR),
                now,
            );
            let to_dlq = Settling::marked(handle, to_dlq, clock);
            let before = state.stats(now).depth;
            state.fire_timers(now);
            let woke = !retries.is_empty() || state.stats(now).depth > before;
            let woke = woke || !coalesced.is_empty() || !merges.is_empty();
            let skipped = state.take_skipped();
            let skipped = state.settle_range_ops(&skipped);
            (
                retries, to_dlq, woke, too_old, replaced, coalesced, merges, skipped,
            )
        };
        self.settle_skipped(skipped);
        if !retries.is_empty() {
            // Best effort: a lost retry record only under-counts deliveries after a crash.
            self.inner
                .store
                .submit(retries, AckLevel::Written, Box::new(|_| {}));
        }
        // (A subscription has no delay log: nothing is published to it with a delay.)
        if handle.delay.lock().is_none()
            && handle.subscription.is_none()
            && let Ok(_admin) = self.inner.admin.try_lock()
            && !handle.deleted.load(Ordering::SeqCst)
            && let Err(err) = self.create_delay_log(handle).await
        {
            tracing::warn!(queue = %handle.name, error = %err, "could not create the delay log; long delays stay in the main log");
        }
        self.unpark_due(handle, now).await;
        self.settle_expired(handle, too_old).await;
        self.drop_superseded(handle, replaced).await;
        self.drop_settling(handle, coalesced, "coalesced").await;
        for (key, members) in merges {
            self.merge_window(handle, key, members).await;
        }
        self.dead_letter(handle, to_dlq).await;
        if woke {
            handle.notify.notify_waiters();
        }
    }

    /// Drops or dead-letters messages past their time to live (already settling).
    pub(super) async fn settle_expired(&self, handle: &Arc<QueueHandle>, items: Settling) {
        if items.is_empty() {
            return;
        }
        let n = items.len() as u64;
        let now = self.now_ms();
        let on_expire = {
            let mut state = handle.state.lock();
            state.counters.ttl_expired += n;
            for item in items.items() {
                state.record_attempt(
                    item.offset,
                    item.delivery_count,
                    Some((now, TTL_EXPIRED_ERROR.to_string())),
                );
            }
            state.config.on_expire
        };
        if on_expire == OnExpire::DeadLetter {
            return self.dead_letter(handle, items).await;
        }
        self.drop_settling(handle, items, "expired").await;
    }

    /// Settles messages already marked settling (expired, superseded), without moving them.
    pub(super) async fn drop_settling(
        &self,
        handle: &Arc<QueueHandle>,
        items: Settling,
        why: &'static str,
    ) {
        if items.is_empty() {
            return;
        }
        let ops = handle.state.lock().settle_ops(&items.offsets());
        let queue = handle.clone();
        let settled = self.submit_then(ops, AckLevel::Written, move |result| {
            if let Err(err) = &result {
                tracing::warn!(queue = %queue.name, error = %err, "could not drop {why} messages; they stay queued");
            }
            items.finish(&mut queue.state.lock(), result.is_ok());
        });
        let _ = settled.await;
    }

    /// Replaces a closed `merge` window's messages by one message whose body is a JSON
    /// array of their distinct bodies (strings when UTF-8, else `{"base64": ...}`), in one
    /// journal write: append the merged message, settle the members. If the write fails
    /// the members are delivered one by one instead.
    pub(super) async fn merge_window(
        &self,
        handle: &Arc<QueueHandle>,
        key: Vec<u8>,
        members: Settling,
    ) {
        let mut bodies: Vec<serde_json::Value> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut tenant = None;
        for member in members.items() {
            let offset = member.offset;
            let Ok(mut records) = handle.reader.read(offset, 1, 1) else {
                continue;
            };
            let Some(record) = records.pop().filter(|r| r.offset == offset) else {
                continue;
            };
            tenant = header(&record, HEADER_TENANT).or(tenant);
            if seen.insert(record.body.clone()) {
                bodies.push(match std::str::from_utf8(&record.body) {
                    Ok(text) => serde_json::Value::String(text.to_string()),
                    Err(_) => serde_json::json!({"base64": base64::engine::general_purpose::STANDARD.encode(&record.body)}),
                });
            }
        }
        let body = serde_json::Value::Array(bodies).to_string().into_bytes();
        let count = members.len().to_string();
        let now = self.now_ms();
        let id = new_message_id(now);
        let mut headers: Vec<(&[u8], &[u8])> = vec![(HEADER_MERGED.as_bytes(), count.as_bytes())];
        if let Some(tenant) = &tenant {
            headers.push((HEADER_TENANT.as_bytes(), tenant.as_bytes()));
        }
        let bytes = (body.len()
            + key.len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()) as u64;
        let mut builder = BatchBuilder::new(handle.uid, now);
        builder.push(&NewRecord {
            id: &id,
            generated_id: true,
            key: Some(&key),
            headers,
            deliver_at_ms: 0,
            body: &body,
        });
        let mut ops = vec![Op::Append {
            uid: handle.uid,
            batch: builder.finish(),
        }];
        ops.extend(handle.state.lock().settle_ops(&members.offsets()));
        // A merge replaces accepted messages: it bypasses capacity, like a DLQ move.
        let reserved = Reserved::unchecked(handle, 1, bytes);
        let queue = handle.clone();
        let merged = self.submit_then(ops, AckLevel::Durable, move |result| {
            let mut state = queue.state.lock();
            match result {
                Ok(results) => {
                    let (n, bytes) = reserved.stored();
                    if let Some(&OpResult::Appended { base_offset, .. }) = results.first() {
                        state.published(n, bytes, Some((base_offset, &[])));
                        state.make_ready(base_offset);
                    } else {
                        state.published(n, bytes, None);
                    }
                    members.finish(&mut state, true);
                }
                Err(err) => {
                    tracing::warn!(queue = %queue.name, error = %err, "could not merge a coalescing window; its messages go out one by one");
                    reserved.refused(&mut state);
                    members.finish(&mut state, false);
                }
            }
        });
        let _ = merged.await;
    }

    /// Settles in storage the holes a subscription's scan passed (offsets with no record: a
    /// compacted partition). Best effort: after a crash the scan finds them again.
    pub(super) fn settle_skipped(&self, ops: Vec<tidewater_storage::Op>) {
        if !ops.is_empty() {
            self.inner
                .store
                .submit(ops, AckLevel::Written, Box::new(|_| {}));
        }
    }

    /// Drops messages superseded by a newer one with their key, and counts them.
    pub(super) async fn drop_superseded(&self, handle: &Arc<QueueHandle>, items: Settling) {
        if items.is_empty() {
            return;
        }
        handle.state.lock().counters.superseded += items.len() as u64;
        self.drop_settling(handle, items, "superseded").await;
    }

    /// Runs lease expiry, timers and the disk probe for every queue; the server calls
    /// this periodically (tests call it after moving their clock).
    pub async fn run_maintenance(&self) {
        let mut handles: Vec<_> = self.inner.queues.read().values().cloned().collect();
        handles.extend(self.subscription_handles());
        for handle in handles {
            self.maintain(&handle).await;
        }
        self.maintain_groups();
        self.maintain_classic_groups();
        self.expire_group_offsets().await;
        self.apply_retention().await;
        self.sample_forecasts();
    }

    /// Starts the periodic maintenance task on the current tokio runtime.
    pub fn spawn_maintenance(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let broker = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                broker.run_maintenance().await;
                n += 1;
                if n.is_multiple_of(10) {
                    broker.refresh_disk();
                    // In the background, one pass at a time (`compact_once`).
                    broker.start_compaction();
                }
            }
        })
    }
}
