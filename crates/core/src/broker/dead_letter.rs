//! Retries and moves to the dead-letter queue.

use std::sync::Arc;

use tidewater_storage::format::RECORD_FLAG_GENERATED_ID;
use tidewater_storage::{AckLevel, BatchBuilder, NewRecord, Op, OpResult, Record};

use super::{Broker, QueueHandle, storage_error};
use crate::error::BrokerError;
use crate::plan::dead_letter::{
    HEADER_DEAD_LETTERED_AT, HEADER_DELIVERY_COUNT, HEADER_ERRORS, HEADER_LAST_ERROR,
    HEADER_PUBLISHED_AT, HEADER_SOURCE_QUEUE,
};
use crate::plan::to_ranges;
use crate::queue::{QueueState, Unacked};

impl Broker {
    /// Decides, for each released message, another delivery later or the DLQ.
    pub(super) fn plan_retries(
        &self,
        state: &mut QueueState,
        released: Vec<Unacked>,
        delay_ms: Option<u64>,
        error: Option<&str>,
        now: i64,
    ) -> (Vec<Op>, Vec<Unacked>) {
        let mut ops = Vec::new();
        let mut to_dlq = Vec::new();
        let max = state.config.max_deliveries;
        for msg in released {
            let error_text = error.unwrap_or("").to_string();
            let error_entry = (!error_text.is_empty()).then(|| (now, error_text.clone()));
            if max > 0 && msg.delivery_count >= max && state.config.dead_letter_queue.is_some() {
                state.record_attempt(msg.offset, msg.delivery_count, error_entry);
                to_dlq.push(msg);
                continue;
            }
            let wait = delay_ms.unwrap_or_else(|| {
                state
                    .config
                    .backoff
                    .delay_ms(msg.delivery_count, self.inner.jitter.unit())
            });
            let deliver_at = now + wait as i64;
            state.schedule_retry(msg.offset, msg.delivery_count, deliver_at, error_entry, now);
            ops.push(Op::Retry {
                uid: state.uid,
                offset: msg.offset,
                deliver_at_ms: deliver_at,
                delivery_count: msg.delivery_count,
                at_ms: now,
                error: error_text,
            });
        }
        let dlq_offsets: Vec<u64> = to_dlq.iter().map(|m| m.offset).collect();
        state.begin_settle(&dlq_offsets);
        (ops, to_dlq)
    }

    /// Moves messages to their queue's dead-letter queue with their history.
    pub(super) async fn dead_letter(&self, handle: &Arc<QueueHandle>, items: Vec<Unacked>) {
        let settle: Vec<(u64, u64)> = items.iter().map(|m| (m.offset, m.size)).collect();
        let result = self.try_dead_letter(handle, &items).await;
        let now = self.now_ms();
        let mut state = handle.state.lock();
        match result {
            Ok(()) => {
                state.counters.dead_lettered += items.len() as u64;
                state.finish_settle(&settle, true, now);
            }
            Err(err) => {
                tracing::warn!(queue = %handle.name, error = %err, "dead-lettering failed; the messages stay in the queue");
                state.finish_settle(&settle, false, now);
            }
        }
    }

    pub(super) async fn try_dead_letter(
        &self,
        handle: &Arc<QueueHandle>,
        items: &[Unacked],
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
        for item in items {
            let Some(record) = handle
                .reader
                .read(item.offset, 1, 1)
                .map_err(storage_error)?
                .pop()
            else {
                continue;
            };
            let history = handle
                .state
                .lock()
                .history(item.offset)
                .cloned()
                .unwrap_or_default();
            let mut headers: Vec<(String, String)> = record
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .filter(|(k, _)| !k.starts_with("tidewater-"))
                .collect();
            let errors: Vec<serde_json::Value> = history
                .errors
                .iter()
                .map(|(at, text)| serde_json::json!({"at": at, "error": text}))
                .collect();
            headers.push((HEADER_SOURCE_QUEUE.into(), handle.name.clone()));
            headers.push((
                HEADER_DELIVERY_COUNT.into(),
                item.delivery_count.to_string(),
            ));
            headers.push((
                HEADER_LAST_ERROR.into(),
                history
                    .errors
                    .back()
                    .map(|(_, e)| e.clone())
                    .unwrap_or_default(),
            ));
            headers.push((
                HEADER_ERRORS.into(),
                serde_json::Value::Array(errors).to_string(),
            ));
            headers.push((
                HEADER_PUBLISHED_AT.into(),
                record.published_at_ms.to_string(),
            ));
            headers.push((HEADER_DEAD_LETTERED_AT.into(), now.to_string()));
            records.push((record, headers));
        }
        self.move_records(&dlq, handle, records).await
    }

    /// Appends records to `target` and settles them in `source`, in one journal write.
    pub(super) async fn move_records(
        &self,
        target: &Arc<QueueHandle>,
        source: &Arc<QueueHandle>,
        records: Vec<(Record, Vec<(String, String)>)>,
    ) -> Result<(), BrokerError> {
        if records.is_empty() {
            return Ok(());
        }
        let now = self.now_ms();
        let mut builder = BatchBuilder::new(target.uid, now);
        let mut bytes = 0;
        let mut offsets = Vec::with_capacity(records.len());
        for (record, headers) in &records {
            let header_refs: Vec<(&[u8], &[u8])> = headers
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                .collect();
            builder.push(&NewRecord {
                id: &record.id,
                generated_id: record.flags & RECORD_FLAG_GENERATED_ID != 0,
                key: record.key.as_deref(),
                headers: header_refs,
                deliver_at_ms: 0,
                body: &record.body,
            });
            bytes += (record.body.len()
                + record.key.as_ref().map_or(0, |k| k.len())
                + headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()) as u64;
            offsets.push(record.offset);
        }
        let n = records.len() as u64;
        // Moves bypass capacity: a message already accepted is never dropped to make room.
        target.state.lock().reserve_unchecked(n, bytes);
        let ops = vec![
            Op::Append {
                uid: target.uid,
                batch: builder.finish(),
            },
            Op::Settle {
                uid: source.uid,
                ranges: to_ranges(&offsets),
            },
        ];
        let result = self.write(ops, AckLevel::Durable).await;
        let mut state = target.state.lock();
        match result {
            Ok(results) => {
                if let Some(&OpResult::Appended { base_offset, .. }) = results.first() {
                    state.published(n, bytes, Some((base_offset, &[])));
                }
                Ok(())
            }
            Err(err) => {
                state.published(n, bytes, None);
                Err(err)
            }
        }
    }
}
