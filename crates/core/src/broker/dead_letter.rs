//! Retries and moves to the dead-letter queue.

use crate::queue::RecordSource as _;
use std::sync::Arc;

use tidewater_storage::{AckLevel, Op, OpResult, Record};

use super::guard::{Reserved, Settling};
use super::{Broker, QueueHandle, storage_error};
use crate::error::BrokerError;
use crate::plan::dead_letter::{MoveBatch, dead_letter_headers, move_batch};
use crate::queue::QueueState;

impl Broker {
    /// Moves messages (marked settling) to their queue's dead-letter queue with their
    /// history. On failure they stay in the queue, deliverable again.
    pub(super) async fn dead_letter(&self, handle: &Arc<QueueHandle>, items: Settling) {
        if items.is_empty() {
            return;
        }
        if let Err(err) = self.try_dead_letter(handle, items).await {
            tracing::warn!(queue = %handle.name, error = %err, "dead-lettering failed; the messages stay in the queue");
        }
    }

    pub(super) async fn try_dead_letter(
        &self,
        handle: &Arc<QueueHandle>,
        items: Settling,
    ) -> Result<(), BrokerError> {
        let dlq_name = handle
            .state
            .lock()
            .config
            .dead_letter_queue
            .clone()
            .ok_or_else(|| BrokerError::invalid("no dead-letter queue"))?;
        let dlq = self.dead_letter_target(&dlq_name).await?;
        let now = self.now_ms();
        let mut records = Vec::with_capacity(items.len());
        for item in items.items() {
            let Some(record) = handle
                .reader
                .read(item.offset, 1, 1)
                .map_err(storage_error)?
                .pop()
            else {
                continue;
            };
            let errors: Vec<(i64, String)> = handle
                .state
                .lock()
                .history(item.offset)
                .map(|h| h.errors.iter().cloned().collect())
                .unwrap_or_default();
            let headers =
                dead_letter_headers(&record, &handle.name, item.delivery_count, &errors, now);
            records.push((record, headers));
        }
        self.move_records(&dlq, handle, records, items, |state, n| {
            state.counters.dead_lettered += n;
        })
        .await
    }

    /// Appends records to `target` and settles them in `source`, in one journal write;
    /// `moved` (the messages' count in `settling`, whose records may be fewer: a record
    /// gone is settled with the rest) counts them in the source when it lands. The
    /// accounting runs when storage answers, awaited or not.
    pub(super) async fn move_records(
        &self,
        target: &Arc<QueueHandle>,
        source: &Arc<QueueHandle>,
        records: Vec<(Record, Vec<(String, String)>)>,
        settling: Settling,
        moved: fn(&mut QueueState, u64),
    ) -> Result<(), BrokerError> {
        if records.is_empty() {
            let mut state = source.state.lock();
            moved(&mut state, settling.len() as u64);
            settling.finish(&mut state, true);
            return Ok(());
        }
        let MoveBatch {
            batch,
            bytes,
            offsets,
        } = move_batch(target.uid, &records, self.now_ms());
        // Moves bypass capacity: a message already accepted is never dropped to make room.
        let reserved = Reserved::unchecked(target, records.len() as u64, bytes);
        let mut ops = vec![Op::Append {
            uid: target.uid,
            batch,
        }];
        ops.extend(source.state.lock().settle_ops(&offsets));
        let (to, from) = (target.clone(), source.clone());
        self.submit_then(ops, AckLevel::Durable, move |result| {
            let results = match result {
                Ok(results) => results,
                Err(err) => {
                    reserved.refused(&mut to.state.lock());
                    settling.finish(&mut from.state.lock(), false);
                    return Err(err);
                }
            };
            {
                let mut state = to.state.lock();
                let (n, bytes) = reserved.stored();
                let base = match results.first() {
                    Some(&OpResult::Appended { base_offset, .. }) => Some(base_offset),
                    _ => None,
                };
                state.published(n, bytes, base.map(|b| (b, &[][..])));
            }
            to.notify.notify_waiters();
            let mut state = from.state.lock();
            moved(&mut state, settling.len() as u64);
            settling.finish(&mut state, true);
            Ok(())
        })
        .await?
    }
}
