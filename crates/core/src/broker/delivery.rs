//! Receiving and settling: receive, ack, nack, extend, purge, peek.

use crate::queue::RecordSource as _;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidewater_storage::{AckLevel, Op, Record};

use super::guard::Settling;
use super::{Broker, QueueHandle, storage_error};
use crate::error::{BrokerError, ErrorCode};
use crate::plan::message::check_lease_ms;
use crate::plan::to_ranges;
use crate::queue::{Delivery, QueueState, Unacked};

/// Why a consumer gave a message back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NackReason {
    /// The handler failed (the default).
    #[default]
    Failed,
    /// The consumer or what is behind it is overloaded: adaptive throttling slows down.
    Overloaded,
}

impl NackReason {
    pub fn parse(reason: Option<&str>) -> Result<Self, BrokerError> {
        match reason {
            None | Some("failed") => Ok(NackReason::Failed),
            Some("overloaded") => Ok(NackReason::Overloaded),
            Some(other) => Err(BrokerError::invalid(format!(
                "unknown nack reason '{other}': use \"failed\" or \"overloaded\""
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct SettleReply {
    pub ok: u64,
    pub failed: Vec<ReceiptFailure>,
    /// Acked receipts whose message a newer one with its key had superseded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReceiptFailure {
    pub receipt: String,
    pub code: &'static str,
}

/// A message seen without leasing it.
#[derive(Debug, Clone)]
pub struct Peeked {
    pub record: Record,
    pub delivery_count: u32,
}

/// A queue's busiest keys and fair-scheduling flows (`Broker::busiest`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Busiest {
    /// With `key_concurrency`: keys by messages waiting for a slot, then slots held.
    pub keys: Option<Vec<KeyBusy>>,
    /// With `fairness`: what it is by (`tenant`, `key`, `header:<name>`)...
    pub fair_by: Option<String>,
    /// ...and its values by messages waiting.
    pub flows: Option<Vec<crate::policy::shaper::FlowLoad>>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeyBusy {
    /// The key as UTF-8 (None when it is not).
    pub key: Option<String>,
    pub key_base64: String,
    /// Messages leased or awaiting a retry (at most `key_concurrency`).
    pub in_flight: u32,
    /// Messages waiting for one of its slots.
    pub waiting: u64,
}

/// Most keys or flows `Broker::busiest` lists.
pub const MAX_BUSIEST: usize = 1_000;

/// The consumer identity of `receive`.
pub const ANONYMOUS_CONSUMER: u64 = 0;

/// Leases ended by a request (offset, lease) and the receipts it refused.
type Released = (Vec<(u64, crate::queue::Lease)>, Vec<ReceiptFailure>);

/// Released leases as the messages they held.
fn unacked(released: Vec<(u64, crate::queue::Lease)>) -> Vec<Unacked> {
    released
        .into_iter()
        .map(|(offset, lease)| Unacked {
            offset,
            delivery_count: lease.delivery_count,
            size: lease.size,
        })
        .collect()
}

impl Broker {
    /// Long-polls for up to `max` messages, leased for `lease_ms` (or the queue's default),
    /// for an anonymous consumer (all of them count as one in the forecast: `receive_as`).
    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait_ms: u64,
        lease_ms: Option<u64>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.receive_as(ANONYMOUS_CONSUMER, queue, max, wait_ms, lease_ms)
            .await
    }

    /// `receive` for `consumer` (`forecast::consumer_id` of a name, or of a connection),
    /// which the queue counts among its consumers while it is seen.
    pub async fn receive_as(
        &self,
        consumer: u64,
        queue: &str,
        max: usize,
        wait_ms: u64,
        lease_ms: Option<u64>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let limits = &self.inner.limits;
        if max == 0 || max > limits.max_receive_messages {
            return Err(BrokerError::invalid(format!(
                "max must be 1..={} (max_receive_messages)",
                limits.max_receive_messages
            )));
        }
        if wait_ms > limits.max_wait_ms {
            return Err(BrokerError::invalid(format!(
                "wait_ms must be at most {} (max_wait_ms)",
                limits.max_wait_ms
            )));
        }
        check_lease_ms(lease_ms)?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        let mut first = true;
        loop {
            let handle = self.resolve(queue)?;
            if std::mem::take(&mut first) {
                self.seen_consumer(&handle, consumer);
            }
            let notified = handle.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.maintain(&handle).await;
            let (deliveries, wakeup, too_old, skipped) = {
                let mut state = handle.state.lock();
                let now = self.now_ms();
                let lease = lease_ms.unwrap_or(state.config.lease_ms);
                let deliveries = state
                    .deliver(&handle.reader, now, max, lease)
                    .map_err(storage_error)?;
                let skipped = state.take_skipped();
                (
                    deliveries,
                    state.next_wakeup().map(|at| (at - now).max(1) as u64),
                    state.take_expired(),
                    state.settle_range_ops(&skipped),
                )
            };
            self.settle_skipped(skipped);
            if !too_old.is_empty() {
                let too_old = Settling::marked(&handle, too_old, &self.inner.clock);
                self.settle_expired(&handle, too_old).await;
                if deliveries.is_empty() {
                    continue; // look again at once: what followed them may be deliverable
                }
            }
            if !deliveries.is_empty() {
                self.served_consumer(&handle, consumer);
                return Ok(deliveries);
            }
            if tokio::time::Instant::now() >= deadline || self.inner.closing.load(Ordering::SeqCst)
            {
                return Ok(deliveries);
            }
            let mut sleep_until = deadline;
            if let Some(ms) = wakeup {
                sleep_until =
                    sleep_until.min(tokio::time::Instant::now() + Duration::from_millis(ms));
            }
            let _ = tokio::time::timeout_at(sleep_until, notified).await;
            if handle.deleted.load(Ordering::SeqCst) {
                // (Its stream or subscription gone: say which.)
                return Err(match self.resolve(queue) {
                    Err(err) => err,
                    Ok(_) => BrokerError::queue_not_found(queue),
                });
            }
        }
    }

    pub(super) fn check_receipt_count<S>(&self, receipts: &[S]) -> Result<(), BrokerError> {
        let max = self.inner.limits.max_receive_messages;
        if receipts.len() > max {
            return Err(BrokerError::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "{} receipts exceed the limit of {max} per request (max_receive_messages)",
                    receipts.len()
                ),
            ));
        }
        Ok(())
    }

    /// Validates receipts and ends their leases; returns (released, failures).
    pub(super) fn release_receipts<S: AsRef<str>>(
        &self,
        handle: &QueueHandle,
        receipts: &[S],
        now: i64,
    ) -> Result<Released, BrokerError> {
        self.check_receipt_count(receipts)?;
        let mut state = handle.state.lock();
        let mut released = Vec::with_capacity(receipts.len());
        let mut failed = Vec::new();
        for receipt in receipts.iter().map(AsRef::as_ref) {
            match state.check_receipt(receipt, now) {
                Ok(pos) => {
                    if let Some(lease) = state.release(pos) {
                        released.push((pos, lease));
                    }
                }
                Err(code) => failed.push(ReceiptFailure {
                    receipt: receipt.to_string(),
                    code: code.as_str(),
                }),
            }
        }
        Ok((released, failed))
    }

    /// Settles leased messages for good. Replies after the settle record is durable; the
    /// settle is accounted for when storage answers, whether or not the caller still waits.
    /// (Receipts as `String`s or borrowed `&str`s.)
    pub async fn ack<S: AsRef<str> + Sync>(
        &self,
        queue: &str,
        receipts: &[S],
    ) -> Result<SettleReply, BrokerError> {
        let handle = self.resolve(queue)?;
        let now = self.now_ms();
        let superseded: Vec<String> = {
            let state = handle.state.lock();
            if state.config.supersede {
                receipts
                    .iter()
                    .map(AsRef::as_ref)
                    .filter(|r| {
                        state
                            .check_receipt(r, now)
                            .is_ok_and(|pos| state.is_superseded(pos))
                    })
                    .map(str::to_string)
                    .collect()
            } else {
                Vec::new()
            }
        };
        let (released, failed) = self.release_receipts(&handle, receipts, now)?;
        if released.is_empty() {
            return Ok(SettleReply {
                ok: 0,
                failed,
                superseded,
            });
        }
        let n = released.len() as u64;
        let published_at: Vec<i64> = released.iter().map(|(_, l)| l.published_at_ms).collect();
        let items = unacked(released);
        let settling = {
            let mut state = handle.state.lock();
            Settling::begin(&handle, &mut state, items, &self.inner.clock)
        };
        let ops = handle.state.lock().settle_ops(&settling.offsets());
        let (queue, clock, observer) = (
            handle.clone(),
            self.inner.clock.clone(),
            self.inner.observer.clone(),
        );
        let settled = self.submit_then(ops, AckLevel::Durable, move |result| {
            let now = clock.now_ms();
            let mut state = queue.state.lock();
            settling.finish(&mut state, result.is_ok());
            result?;
            state.counters.acked += n;
            state.succeeded(now);
            // Settling can make messages deliverable: a key's next message, or room under
            // max_in_flight. Wake long-polls so they do not sleep until their timeout.
            let unblocked = state.may_deliver_after_settle();
            drop(state);
            if unblocked {
                queue.notify.notify_waiters();
            }
            let latencies: Vec<f64> = published_at
                .iter()
                .map(|at| (now - at).max(0) as f64 / 1000.0)
                .collect();
            observer.publish_to_ack(&queue.name, &latencies);
            Ok::<(), BrokerError>(())
        });
        settled.await??;
        Ok(SettleReply {
            ok: n,
            failed,
            superseded,
        })
    }

    /// Ends leases without success: another delivery after `delay_ms` (or the queue's
    /// backoff), or the dead-letter queue once `max_deliveries` is reached.
    pub async fn nack<S: AsRef<str> + Sync>(
        &self,
        queue: &str,
        receipts: &[S],
        delay_ms: Option<u64>,
        error: Option<&str>,
        reason: NackReason,
    ) -> Result<SettleReply, BrokerError> {
        if let Some(delay) = delay_ms
            && delay > self.inner.limits.max_delay_ms
        {
            return Err(BrokerError::invalid(format!(
                "delay_ms must be at most {} (max_delay_ms)",
                self.inner.limits.max_delay_ms
            )));
        }
        let handle = self.resolve(queue)?;
        let now = self.now_ms();
        let (released, failed) = self.release_receipts(&handle, receipts, now)?;
        let n = released.len() as u64;
        let (ops, to_dlq) = {
            let mut state = handle.state.lock();
            state.counters.nacked += n;
            if reason == NackReason::Overloaded && n > 0 {
                state.overloaded(now);
            }
            let unacked = unacked(released);
            let (ops, to_dlq) =
                state.plan_retries(&*self.inner.jitter, unacked, delay_ms, error, now);
            (ops, Settling::marked(&handle, to_dlq, &self.inner.clock))
        };
        // The retries are scheduled in memory; their write only keeps their history, so a
        // failure (or a caller gone) loses history, not messages.
        let history = (!ops.is_empty()).then(|| self.submit(ops, AckLevel::Durable));
        self.dead_letter(&handle, to_dlq).await;
        if let Some(history) = history
            && let Err(err) = history.await
        {
            tracing::warn!(queue, error = %err, "could not journal nack");
        }
        handle.notify.notify_waiters();
        Ok(SettleReply {
            ok: n,
            failed,
            ..SettleReply::default()
        })
    }

    /// How long a queue's (or subscription's) dispatch rate holds its next delivery back,
    /// when it does (Kafka share fetches answer it as `throttle_time_ms`).
    pub fn dispatch_wait_ms(&self, queue: &str) -> Option<u64> {
        let handle = self.resolve(queue).ok()?;
        let at = handle.state.lock().rate_wakeup()?;
        u64::try_from(at - self.now_ms()).ok().filter(|ms| *ms > 0)
    }

    /// Ends leases for good without success (Kafka share groups' REJECT): the messages go
    /// to the dead-letter queue when there is one, whatever their delivery count, and are
    /// settled (dropped) otherwise; never delivered again.
    pub async fn reject<S: AsRef<str> + Sync>(
        &self,
        queue: &str,
        receipts: &[S],
        error: Option<&str>,
    ) -> Result<SettleReply, BrokerError> {
        let handle = self.resolve(queue)?;
        if handle.state.lock().config.dead_letter_queue.is_none() {
            return self.ack(queue, receipts).await;
        }
        let now = self.now_ms();
        let (released, failed) = self.release_receipts(&handle, receipts, now)?;
        let n = released.len() as u64;
        let to_dlq = {
            let mut state = handle.state.lock();
            state.counters.nacked += n;
            let unacked = unacked(released);
            let to_dlq = state.plan_rejects(unacked, error.unwrap_or("rejected"), now);
            Settling::marked(&handle, to_dlq, &self.inner.clock)
        };
        self.dead_letter(&handle, to_dlq).await;
        handle.notify.notify_waiters();
        Ok(SettleReply {
            ok: n,
            failed,
            ..SettleReply::default()
        })
    }

    /// Whether a queue (or subscription) has a dead-letter queue (a reject would drop
    /// messages otherwise).
    pub fn has_dead_letter_queue(&self, queue: &str) -> bool {
        self.resolve(queue)
            .is_ok_and(|h| h.state.lock().config.dead_letter_queue.is_some())
    }

    /// Extends leases to `lease_ms` from now (or the queue's default).
    pub fn extend<S: AsRef<str>>(
        &self,
        queue: &str,
        receipts: &[S],
        lease_ms: Option<u64>,
    ) -> Result<SettleReply, BrokerError> {
        check_lease_ms(lease_ms)?;
        let handle = self.resolve(queue)?;
        self.check_receipt_count(receipts)?;
        let now = self.now_ms();
        let mut state = handle.state.lock();
        let lease = lease_ms.unwrap_or(state.config.lease_ms);
        let mut reply = SettleReply::default();
        for receipt in receipts.iter().map(AsRef::as_ref) {
            match state.check_receipt(receipt, now) {
                // A newer message replaced it: tell the consumer to stop (CI "cancel in progress").
                Ok(pos) if state.is_superseded(pos) => reply.failed.push(ReceiptFailure {
                    receipt: receipt.to_string(),
                    code: ErrorCode::Superseded.as_str(),
                }),
                Ok(pos) => {
                    state.extend(pos, now, lease);
                    reply.ok += 1;
                }
                Err(code) => reply.failed.push(ReceiptFailure {
                    receipt: receipt.to_string(),
                    code: code.as_str(),
                }),
            }
        }
        Ok(reply)
    }

    /// Settles every message accepted so far (leased ones included; their receipts go stale).
    /// Accounted for when storage answers, whether or not the caller still waits.
    pub async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let handle = self.resolve(queue)?;
        let ((ranges, bytes), parked, mut ops) = {
            let state = handle.state.lock();
            let (ranges, bytes) = state.purge_ranges();
            let ops = state.settle_range_ops(&ranges);
            ((ranges, bytes), state.parked_offsets(), ops)
        };
        let delay_uid = handle.delay.lock().as_ref().map(|d| d.uid);
        if let Some(uid) = delay_uid
            && !parked.is_empty()
        {
            ops.push(Op::Settle {
                uid,
                ranges: to_ranges(&parked),
            });
        }
        let apply = move |state: &mut QueueState| {
            let mut removed = state.apply_purge(&ranges, bytes);
            if !parked.is_empty() {
                removed += state.forget_parked();
                state.counters.purged += parked.len() as u64;
            }
            removed
        };
        let removed = if ops.is_empty() {
            apply(&mut handle.state.lock())
        } else {
            let queue = handle.clone();
            self.submit_then(ops, AckLevel::Durable, move |result| {
                result.map(|_| apply(&mut queue.state.lock()))
            })
            .await??
        };
        handle.notify.notify_waiters();
        Ok(removed)
    }

    /// A queue's `limit` busiest keys (with `key_concurrency`) and fair-scheduling values
    /// (with `fairness`): where messages wait, and on what.
    pub fn busiest(&self, queue: &str, limit: usize) -> Result<Busiest, BrokerError> {
        let handle = self.queue(queue)?;
        if limit == 0 || limit > MAX_BUSIEST {
            return Err(BrokerError::invalid(format!(
                "limit must be 1..={MAX_BUSIEST}"
            )));
        }
        let ((keys, flows), fair_by) = {
            let state = handle.state.lock();
            (
                state.busiest(limit),
                state.config.fairness.as_ref().map(|f| f.by.clone()),
            )
        };
        // Each key by one of its messages (a key is kept as a hash).
        let keys = keys
            .map(|loads| {
                loads
                    .into_iter()
                    .filter_map(|load| {
                        let record = match handle.reader.read(load.offset, 1, 1 << 20) {
                            Ok(records) => records.into_iter().next()?,
                            Err(err) => return Some(Err(storage_error(err))),
                        };
                        let key = record.key.unwrap_or_default();
                        Some(Ok(KeyBusy {
                            key: std::str::from_utf8(&key).ok().map(str::to_string),
                            key_base64: base64::Engine::encode(
                                &base64::engine::general_purpose::STANDARD,
                                &key,
                            ),
                            in_flight: load.held,
                            waiting: load.waiting,
                        }))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(Busiest {
            keys,
            fair_by: flows.as_ref().and(fair_by),
            flows,
        })
    }

    /// Up to `max` unleased messages from offset `from` on, without leasing them.
    pub fn peek(&self, queue: &str, from: u64, max: usize) -> Result<Vec<Peeked>, BrokerError> {
        let handle = self.queue(queue)?;
        if max == 0 || max > self.inner.limits.max_receive_messages {
            return Err(BrokerError::invalid(format!(
                "max must be 1..={}",
                self.inner.limits.max_receive_messages
            )));
        }
        let (offsets, counts): (Vec<u64>, Vec<u32>) = {
            let state = handle.state.lock();
            let offsets = state.pending_offsets(from, max);
            let counts = offsets
                .iter()
                .map(|o| state.history(*o).map_or(0, |h| h.delivery_count))
                .collect();
            (offsets, counts)
        };
        // One sequential read over the span, keeping the pending offsets.
        let mut out = Vec::with_capacity(offsets.len());
        let (Some(&first), Some(&last)) = (offsets.first(), offsets.last()) else {
            return Ok(out);
        };
        let wanted: HashMap<u64, u32> = offsets.into_iter().zip(counts).collect();
        let mut from = first;
        while from <= last {
            let records = handle
                .reader
                .read(from, (last - from + 1) as usize, 16 << 20)
                .map_err(storage_error)?;
            let Some(end) = records.last().map(|r| r.offset + 1) else {
                break;
            };
            from = end;
            for record in records {
                if let Some(&delivery_count) = wanted.get(&record.offset) {
                    out.push(Peeked {
                        record,
                        delivery_count,
                    });
                }
            }
        }
        Ok(out)
    }
}
