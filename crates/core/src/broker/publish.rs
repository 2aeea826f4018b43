//! Publishing: checks, deduplication, admission (capacity, quotas), appends.

use std::sync::Arc;

use tidewater_storage::{AckLevel, Op, OpResult};

use super::guard::{Claims, Reserved, Settling};
use super::{Broker, QueueHandle};
use crate::error::{BrokerError, ErrorCode};
use crate::plan::batch::{
    Batches, Demand, ParkedPart, PublishShape, build_publish, marks, parked_part, scan_batch,
    without,
};
use crate::plan::message::{NewMessage, validate_message};

/// The ids of a publish, in order, and the indexes of duplicates (acknowledged, not
/// enqueued again: their id was accepted within the queue's dedup window).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Published {
    pub ids: Vec<String>,
    pub duplicates: Vec<usize>,
}

/// What a publish asks of admission: its size, its quota demand, and the ids it claimed
/// for deduplication (released if it is not stored).
pub(super) struct Admission {
    n: u64,
    bytes: u64,
    demand: Demand,
    claims: Claims,
    /// (index in batch, key, bytes) of keyed messages, on supersede queues.
    keyed: Vec<(u32, Vec<u8>, u64)>,
    /// Long delays bound for the delay log.
    parked: Option<ParkedPart>,
}

impl Broker {
    /// Publishes a batch, whole or not at all; returns the ids in order and which messages
    /// were duplicates (acknowledged, not enqueued again).
    pub async fn publish(
        &self,
        queue: &str,
        messages: &[NewMessage],
        level: AckLevel,
    ) -> Result<Published, BrokerError> {
        let started = std::time::Instant::now();
        let limits = &self.inner.limits;
        if messages.is_empty() {
            return Err(BrokerError::invalid("a publish needs at least one message"));
        }
        if messages.len() > limits.max_batch_messages {
            return Err(BrokerError::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "{} messages exceed max_batch_messages {}",
                    messages.len(),
                    limits.max_batch_messages
                ),
            ));
        }
        let handle = self.queue(queue)?;
        if let Err(err) = self.check_disk() {
            handle.state.lock().count_refusal("disk_full");
            return Err(err);
        }
        let now = self.now_ms();
        let mut deliver_ats = Vec::with_capacity(messages.len());
        for (idx, msg) in messages.iter().enumerate() {
            deliver_ats.push(validate_message(
                &self.inner.limits,
                &*self.inner.jitter,
                idx,
                msg,
                now,
            )?);
        }
        let client_ids: Vec<(usize, &[u8])> = messages
            .iter()
            .enumerate()
            .filter_map(|(idx, m)| Some((idx, m.id.as_deref()?.as_bytes())))
            .collect();
        let (with_quota, with_supersede, dups) = {
            let mut state = handle.state.lock();
            let dups = state.claim_ids(&client_ids, self.inner.limits.max_dedup_ids, now);
            (
                state.config.quota.is_some(),
                state.config.supersede || state.config.coalesce.is_some(),
                marks(messages.len(), &dups),
            )
        };
        let claims = Claims::new(
            &handle,
            client_ids
                .iter()
                .filter(|(idx, _)| !dups[*idx])
                .map(|(_, id)| id.to_vec())
                .collect(),
        );
        let delay_uid = handle.delay.lock().as_ref().map(|d| d.uid);
        let Batches {
            ids,
            duplicates,
            main,
            n,
            bytes,
            delays,
            demand,
            keyed,
            parked,
        } = build_publish(
            messages,
            &PublishShape {
                uid: handle.uid,
                delay_uid,
                park_from: now.saturating_add(self.inner.limits.park_delay_ms as i64),
                duplicates: &dups,
                deliver_ats: &deliver_ats,
                with_quota,
                with_supersede,
            },
            now,
        )?;
        if n > 0 || parked.is_some() {
            let batch = main;
            let admission = Admission {
                n,
                bytes,
                demand,
                claims,
                keyed,
                parked,
            };
            self.start_append(handle, batch, admission, delays, level, started)?
                .await?;
        }
        Ok(Published { ids, duplicates })
    }

    /// Publishes a batch built by a client in the storage format (binary protocol). Every
    /// record is checked against the same limits as a JSON publish; only the header is
    /// rewritten (log and publish time). Returns (base offset, count).
    /// Validates and submits a client-built batch now, in call order (a connection's
    /// batches are appended in the order they arrived even with many in flight), and
    /// returns a future for its (base offset, count).
    pub fn start_publish_batch(
        &self,
        queue: &str,
        batch: Vec<u8>,
        level: AckLevel,
    ) -> Result<impl Future<Output = Result<(u64, u32), BrokerError>> + Send + 'static, BrokerError>
    {
        self.start_publish_batch_as(queue, batch, level, None)
    }

    /// `start_publish_batch` with `tenant` as the tenant of the records that name none
    /// (the principal's, with authentication on: quotas and fairness count them against it).
    pub fn start_publish_batch_as(
        &self,
        queue: &str,
        batch: Vec<u8>,
        level: AckLevel,
        tenant: Option<&str>,
    ) -> Result<impl Future<Output = Result<(u64, u32), BrokerError>> + Send + 'static, BrokerError>
    {
        let started = self.admit_batch(queue, batch, level, tenant)?;
        Ok(async move {
            match started {
                Ok(appended) => appended.await,
                // Every record was a duplicate: nothing to append, (log end, 0).
                Err(end) => Ok((end, 0)),
            }
        })
    }

    /// The work of `start_publish_batch`: Ok(Err(log end)) when nothing is appended.
    #[allow(clippy::type_complexity)]
    pub(super) fn admit_batch(
        &self,
        queue: &str,
        mut batch: Vec<u8>,
        level: AckLevel,
        tenant: Option<&str>,
    ) -> Result<
        Result<impl Future<Output = Result<(u64, u32), BrokerError>> + Send + 'static, u64>,
        BrokerError,
    > {
        let started = std::time::Instant::now();
        let handle = self.queue(queue)?;
        if let Err(err) = self.check_disk() {
            handle.state.lock().count_refusal("disk_full");
            return Err(err);
        }
        let now = self.now_ms();
        let header = tidewater_storage::format::restamp_batch(&mut batch, handle.uid, now)
            .map_err(|e| {
                BrokerError::new(
                    ErrorCode::InvalidMessage,
                    format!("the record batch is invalid: {e}"),
                )
            })?;
        let mut header = header;
        if let Some(tenant) = tenant
            && let Some(stamped) = crate::plan::batch::with_tenant(&header, &batch, tenant, now)
        {
            batch = stamped;
            header = tidewater_storage::format::restamp_batch(&mut batch, handle.uid, now)
                .map_err(|e| BrokerError::new(ErrorCode::Internal, e.to_string()))?;
        }
        let limits = &self.inner.limits;
        if header.count as usize > limits.max_batch_messages {
            return Err(BrokerError::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "{} messages exceed max_batch_messages {}",
                    header.count, limits.max_batch_messages
                ),
            ));
        }
        let (with_quota, with_supersede) = {
            let state = handle.state.lock();
            (
                state.config.quota.is_some(),
                state.config.supersede || state.config.coalesce.is_some(),
            )
        };
        let mut scan = scan_batch(limits, &header, &batch, with_quota, with_supersede, now)?;
        // Tell storage whether to look for ids to remember (clients need not set it).
        tidewater_storage::format::set_client_ids_flag(&mut batch, !scan.client_ids.is_empty());
        let dups = {
            let ids: Vec<(usize, &[u8])> = scan
                .client_ids
                .iter()
                .map(|(idx, id)| (*idx, id.as_slice()))
                .collect();
            handle
                .state
                .lock()
                .claim_ids(&ids, limits.max_dedup_ids, now)
        };
        // From here on, any return (an error, or every record a duplicate) gives back the
        // ids this publish claimed.
        let skip = marks(header.count as usize, &dups);
        let claims = Claims::new(
            &handle,
            std::mem::take(&mut scan.client_ids)
                .into_iter()
                .filter(|(idx, _)| !skip[*idx])
                .map(|(_, id)| id)
                .collect(),
        );
        let count = header.count - dups.len() as u32;
        if !dups.is_empty() {
            // Rare: rebuild the batch without its duplicates (acknowledged, not enqueued).
            if count == 0 {
                let end = handle.state.lock().visible_end();
                return Ok(Err(end));
            }
            batch = without(&header, &batch, &skip, now);
            header = tidewater_storage::format::restamp_batch(&mut batch, handle.uid, now)
                .map_err(|e| BrokerError::new(ErrorCode::Internal, e.to_string()))?;
            scan = scan_batch(limits, &header, &batch, with_quota, with_supersede, now)?;
        }
        // Long delays go to the delay log (rare on this path: the batch is rebuilt).
        let park_from = now.saturating_add(limits.park_delay_ms as i64);
        let delay_uid = handle.delay.lock().as_ref().map(|d| d.uid);
        let mut parked = None;
        let mut main = Some(batch);
        if let Some(delay_uid) = delay_uid
            && scan.delays.iter().any(|&(_, at)| at >= park_from)
        {
            let mut skip = vec![false; header.count as usize];
            for &(idx, at) in &scan.delays {
                skip[idx as usize] = at >= park_from;
            }
            let batch = main.take().expect("set above");
            let part = parked_part(&header, &batch, &skip, delay_uid, now);
            if part.n < header.count as u64 {
                let mut rest = without(&header, &batch, &skip, now);
                let rest_header =
                    tidewater_storage::format::restamp_batch(&mut rest, handle.uid, now)
                        .map_err(|e| BrokerError::new(ErrorCode::Internal, e.to_string()))?;
                let demand = std::mem::take(&mut scan.demand);
                scan = scan_batch(limits, &rest_header, &rest, false, with_supersede, now)?;
                scan.demand = demand; // quotas count the parked messages too
                main = Some(rest);
            } else {
                scan.bytes = 0;
                scan.delays.clear();
                scan.keyed.clear();
            }
            parked = Some(part);
        }
        let main_n = count as u64 - parked.as_ref().map_or(0, |p| p.n);
        let admission = Admission {
            n: main_n,
            bytes: scan.bytes,
            demand: scan.demand,
            claims,
            keyed: scan.keyed,
            parked,
        };
        let appended = self.start_append(handle, main, admission, scan.delays, level, started)?;
        Ok(Ok(async move { appended.await.map(|base| (base, count)) }))
    }

    /// Admits and submits a batch now (its main-log part, and its long delays for the delay
    /// log, in one write); the future accounts for the outcome and gives the main part's
    /// base offset (the log's end when everything was parked).
    pub(super) fn start_append(
        &self,
        handle: Arc<QueueHandle>,
        batch: Option<Vec<u8>>,
        admission: Admission,
        delays: Vec<(u32, i64)>,
        level: AckLevel,
        started: std::time::Instant,
    ) -> Result<impl Future<Output = Result<u64, BrokerError>> + Send + 'static, BrokerError> {
        let Admission {
            n,
            bytes,
            demand,
            claims,
            keyed,
            parked,
        } = admission;
        let (parked_n, parked_bytes) = parked.as_ref().map_or((0, 0), |p| (p.n, p.bytes));
        let (all_n, all_bytes) = (n + parked_n, bytes + parked_bytes);
        let now = self.now_ms();
        let admitted = {
            let mut state = handle.state.lock();
            state
                .admit(all_n, all_bytes, now)
                .and_then(|()| {
                    state.admit_quota(&demand.as_slice(), now).inspect_err(|_| {
                        state.published(all_n, all_bytes, None);
                    })
                })
                // Priority/fairness lanes, resolved while the records are at hand.
                .map(|()| batch.as_deref().and_then(|b| state.lanes_of_batch(b)))
        };
        let lanes = admitted?; // (refused: `claims` gives the ids back)
        let reserved = Reserved::made(&handle, all_n, all_bytes, claims.take());
        let mut ops = Vec::new();
        if let Some(batch) = batch {
            ops.push(Op::Append {
                uid: handle.uid,
                batch,
            });
        }
        let parked_entries = parked.map(|p| {
            ops.push(Op::Append {
                uid: p.uid,
                batch: p.batch,
            });
            p.entries
        });
        let (queue, clock, observer) = (
            handle.clone(),
            self.inner.clock.clone(),
            self.inner.observer.clone(),
        );
        // The accounting runs when storage answers, awaited or not (guard.rs).
        let appended = self.submit_then(ops, level, move |result| {
            let mut state = queue.state.lock();
            let results = match result {
                Ok(results) => results,
                Err(err) => {
                    reserved.refused(&mut state);
                    state.count_refusal(match err.code {
                        ErrorCode::DiskFull => "disk_full",
                        ErrorCode::Overloaded => "overloaded",
                        _ => "storage",
                    });
                    return Err(err);
                }
            };
            reserved.stored();
            let mut bases = results.iter().filter_map(|r| match r {
                OpResult::Appended { base_offset, .. } => Some(*base_offset),
                _ => None,
            });
            let main_base = if n > 0 { bases.next() } else { None };
            let parked_base = parked_entries.as_ref().and_then(|_| bases.next());
            state.published(n, bytes, main_base.map(|b| (b, &delays[..])));
            if let (Some(base), Some(lanes)) = (main_base, lanes) {
                state.stage(base, lanes);
            }
            state.published(parked_n, parked_bytes, None);
            if let (Some(base), Some(entries)) = (parked_base, &parked_entries) {
                state.park(base, entries);
                state.counters.published += parked_n;
            }
            if let Some(base) = main_base
                && !keyed.is_empty()
            {
                state.supersede(base, &keyed);
                state.coalesce(base, &keyed, clock.now_ms());
            }
            let base_offset = main_base.unwrap_or(state.visible_end());
            drop(state);
            observer.publish_latency(&queue.name, started.elapsed().as_secs_f64());
            Ok(base_offset)
        });
        let broker = self.clone();
        Ok(async move {
            let base_offset = appended.await??;
            // The messages it replaced are settled before the publish is answered (one
            // unsynced write; if a crash loses it, recovery cancels them again; if this
            // caller went away, maintenance settles them).
            let replaced = handle.state.lock().take_cancelled();
            let replaced = Settling::marked(&handle, replaced, &broker.inner.clock);
            broker.drop_superseded(&handle, replaced).await;
            Ok(base_offset)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerOptions, ConfigPatch, Delay};

    /// Found by fuzzing (fuzz target `publish`): a JSON publish whose `deliver_at` was far
    /// in the past (i64::MIN) overflowed `at - now`: a panic where overflow is checked, and
    /// a refusal as "too far ahead" where it wraps. It is due at once.
    #[tokio::test]
    async fn a_deliver_at_far_in_the_past_is_due_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(dir.path(), BrokerOptions::default()).unwrap();
        broker
            .put_queue("q", &ConfigPatch::default())
            .await
            .unwrap();
        let message = NewMessage {
            body: b"x".to_vec(),
            delay: Delay::AtMs(i64::MIN),
            ..Default::default()
        };
        broker
            .publish("q", &[message], AckLevel::Durable)
            .await
            .unwrap();
        broker.shutdown();
    }
}
