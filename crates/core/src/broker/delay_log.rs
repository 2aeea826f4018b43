//! The delay log: long-delayed messages wait in a hidden log of their own until due.

use std::sync::Arc;

use tidewater_storage::format::RECORD_FLAG_GENERATED_ID;
use tidewater_storage::{AckLevel, BatchBuilder, LogReader, NewRecord, Op, OpResult};

use super::guard::{Reserved, Unparking};
use super::{Broker, QueueHandle};
use crate::error::BrokerError;
use crate::plan::to_ranges;

/// A hidden log holding a queue's long-delayed messages until they are due, so that a
/// message due in a week does not hold the main log's ack floor (and every segment after
/// it) for a week.
#[derive(Clone)]
pub(crate) struct DelayLog {
    pub(crate) uid: u64,
    pub(crate) reader: LogReader,
}

/// The delay log of queue `uid` is named so that no queue can have its name.
pub(crate) const DELAY_LOG_PREFIX: &str = "#delay/";

pub(crate) fn delay_log_name(queue_uid: u64) -> String {
    format!("{DELAY_LOG_PREFIX}{queue_uid}")
}

impl Broker {
    /// Creates the queue's delay log (new queues, and at first maintenance for queues made
    /// before delay logs existed). Caller holds the admin lock or owns a new handle.
    pub(super) async fn create_delay_log(
        &self,
        handle: &Arc<QueueHandle>,
    ) -> Result<(), BrokerError> {
        if handle.delay.lock().is_some() {
            return Ok(());
        }
        let (uid, reader) = self
            .create_internal_log(&delay_log_name(handle.uid))
            .await?;
        *handle.delay.lock() = Some(DelayLog { uid, reader });
        Ok(())
    }

    /// Moves parked messages that are due from the delay log to the main log, in one
    /// journal write (append there, settle here).
    pub(super) async fn unpark_due(&self, handle: &Arc<QueueHandle>, now: i64) {
        let Some(delay) = handle.delay.lock().clone() else {
            return;
        };
        let due = handle.state.lock().take_due_parked(now, 5_000);
        if due.is_empty() {
            return;
        }
        // Back in the due set if this stops before its write lands.
        let due = Unparking::new(handle, due);
        let offsets = due.offsets();
        let (first, last) = (offsets[0], offsets[offsets.len() - 1]);
        let wanted: std::collections::HashSet<u64> = offsets.iter().copied().collect();
        let records = match delay
            .reader
            .read_where(first.min(last), first.max(last) + 1, &|o| {
                wanted.contains(&o)
            }) {
            Ok(records) => records,
            Err(err) => {
                tracing::warn!(queue = %handle.name, error = %err, "could not read due delayed messages; retrying");
                return;
            }
        };
        let mut builder = BatchBuilder::new(handle.uid, now);
        let mut bytes = 0;
        for record in &records {
            builder.push(&NewRecord {
                id: &record.id,
                generated_id: record.flags & RECORD_FLAG_GENERATED_ID != 0,
                key: record.key.as_deref(),
                headers: record
                    .headers
                    .iter()
                    .map(|(k, v)| (&k[..], &v[..]))
                    .collect(),
                deliver_at_ms: 0,
                body: &record.body,
            });
            bytes += record.size();
        }
        let n = records.len() as u64;
        let mut ops = Vec::new();
        let reserved = (n > 0).then(|| Reserved::unchecked(handle, n, bytes));
        if n > 0 {
            ops.push(Op::Append {
                uid: handle.uid,
                batch: builder.finish(),
            });
        }
        ops.push(Op::Settle {
            uid: delay.uid,
            ranges: to_ranges(due.offsets()),
        });
        let queue = handle.clone();
        let moved = self.submit_then(ops, AckLevel::Durable, move |result| {
            let mut state = queue.state.lock();
            match result {
                Ok(results) => {
                    if let Some(reserved) = reserved {
                        let (n, bytes) = reserved.stored();
                        let base = match results.first() {
                            Some(&OpResult::Appended { base_offset, .. }) => Some(base_offset),
                            _ => None,
                        };
                        state.published(n, bytes, base.map(|b| (b, &[][..])));
                    }
                    due.finish(&mut state, true);
                    drop(state);
                    queue.notify.notify_waiters();
                }
                Err(err) => {
                    tracing::warn!(queue = %queue.name, error = %err, "could not move due delayed messages; retrying");
                    if let Some(reserved) = reserved {
                        reserved.refused(&mut state);
                    }
                    due.finish(&mut state, false);
                }
            }
        });
        let _ = moved.await;
    }
}
