//! Consumer instances: group members whose client side the broker runs, for consumers that
//! speak HTTP (as the Confluent REST proxy does): join once, then fetch and commit; the
//! broker heartbeats for them at each fetch, takes the partitions it assigns, gives up those
//! it revokes (committing their positions first), and keeps each partition's position.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Broker;
use crate::error::{BrokerError, ErrorCode};
use crate::stream::group::TopicPartition;
use crate::stream::records::{StreamRecord, decode_batch};

/// Where a member starts in a partition its group has committed nothing for (Kafka's
/// `auto.offset.reset`, and the console consumer's `--offset`). In JSON: `"earliest"`,
/// `"latest"`, `{"offset": N}` or `{"time": ms}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    #[default]
    Earliest,
    Latest,
    /// This offset, kept within the partition's range.
    Offset(u64),
    /// The first offset whose record's timestamp is at least this time (ms since the
    /// epoch); the end when every record is older.
    Time(i64),
}

/// The broker-side client of one HTTP member.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    start_at: StartAt,
    /// Partition -> the next offset to fetch.
    positions: BTreeMap<TopicPartition, u64>,
    /// Where the next fetch starts among the partitions (each fetch starts one further, so
    /// a busy partition cannot starve the others).
    turn: usize,
}

/// A record as a member fetches it: where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    pub stream: String,
    pub partition: u32,
    pub record: StreamRecord,
}

impl Broker {
    /// Joins `group` as an instance the broker runs for an HTTP consumer; returns the
    /// member id.
    pub fn create_consumer(
        &self,
        group: &str,
        instance: Option<&str>,
        streams: &[String],
        session_timeout_ms: u64,
        start_at: StartAt,
    ) -> Result<String, BrokerError> {
        let member = self.join_group(group, instance, streams, session_timeout_ms)?;
        self.inner
            .consumers
            .lock()
            .entry((group.to_string(), member.clone()))
            .or_insert(Instance {
                start_at,
                positions: BTreeMap::new(),
                turn: 0,
            });
        Ok(member)
    }

    /// Leaves the group, committing the member's positions first.
    /// Removes a consumer instance and its member; with `commit`, its positions are
    /// committed first (a client that could not hand its last records on leaves without).
    pub async fn delete_consumer(
        &self,
        group: &str,
        member: &str,
        commit: bool,
    ) -> Result<(), BrokerError> {
        let instance = self
            .inner
            .consumers
            .lock()
            .remove(&(group.to_string(), member.to_string()));
        let Some(instance) = instance else {
            return Err(unknown(group, member));
        };
        if commit {
            self.commit_positions(group, &instance.positions, false)
                .await?;
        }
        self.leave_group(group, member)
    }

    /// Heartbeats for the member, then fetches from the partitions it holds, from each
    /// one's position, about `max_bytes` in all, waiting up to `wait_ms` for a first record.
    /// Positions move past what is returned (commit them with `commit_consumer`).
    pub async fn consumer_fetch(
        &self,
        group: &str,
        member: &str,
        max_bytes: usize,
        wait_ms: u64,
    ) -> Result<Vec<MemberRecord>, BrokerError> {
        self.consumer_fetch_records(group, member, max_bytes, usize::MAX, wait_ms)
            .await
    }

    /// As `consumer_fetch`, returning at most `max_records` records (Kafka's
    /// `max.poll.records`): a partition's position moves past the last record returned, so
    /// what was not returned comes in the next fetch.
    pub async fn consumer_fetch_records(
        &self,
        group: &str,
        member: &str,
        max_bytes: usize,
        max_records: usize,
        wait_ms: u64,
    ) -> Result<Vec<MemberRecord>, BrokerError> {
        let max_records = max_records.max(1);
        let limits = &self.inner.limits;
        if wait_ms > limits.max_wait_ms {
            return Err(BrokerError::invalid(format!(
                "wait_ms must be at most {} (max_wait_ms)",
                limits.max_wait_ms
            )));
        }
        let max_bytes = max_bytes.clamp(1, limits.max_fetch_bytes);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        loop {
            let grew = self.inner.streams_grew.notified();
            let changed = self.inner.groups_changed.notified();
            tokio::pin!(grew, changed);
            grew.as_mut().enable();
            changed.as_mut().enable();
            self.consumer_heartbeat(group, member).await?;
            let (positions, turn) = {
                let mut consumers = self.inner.consumers.lock();
                let instance = consumers
                    .get_mut(&(group.to_string(), member.to_string()))
                    .ok_or_else(|| unknown(group, member))?;
                instance.turn = instance.turn.wrapping_add(1);
                (instance.positions.clone(), instance.turn)
            };
            let mut order: Vec<(TopicPartition, u64)> = positions.into_iter().collect();
            if !order.is_empty() {
                let start = turn % order.len();
                order.rotate_left(start);
            }
            let mut out = Vec::new();
            let mut taken = 0usize;
            let mut moved = BTreeMap::new();
            for ((stream, partition), position) in order {
                if taken >= max_bytes || out.len() >= max_records {
                    break;
                }
                // Retention deleted what was below the partition's start: go on from there.
                let start = self.partition_start(&stream, partition);
                if position < start {
                    moved.insert((stream.clone(), partition), start);
                }
                let position = position.max(start);
                let Ok(fetched) = self
                    .fetch(&stream, partition, position, max_bytes - taken, 0)
                    .await
                else {
                    continue; // the stream went away: the next heartbeat revokes it
                };
                let mut next = position;
                'batches: for batch in &fetched.batches {
                    taken += batch.kafka.len();
                    for record in decode_batch(batch, position)? {
                        if out.len() >= max_records {
                            // The rest of the batch comes next time.
                            break 'batches;
                        }
                        next = next.max(record.offset + 1);
                        out.push(MemberRecord {
                            stream: stream.clone(),
                            partition,
                            record,
                        });
                    }
                    next = next.max(batch.base_offset + u64::from(batch.span));
                }
                if next != position {
                    moved.insert((stream, partition), next);
                }
            }
            if let Some(instance) = self
                .inner
                .consumers
                .lock()
                .get_mut(&(group.to_string(), member.to_string()))
            {
                for (tp, next) in moved {
                    if let Some(position) = instance.positions.get_mut(&tp) {
                        *position = next;
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if !out.is_empty() || now >= deadline || self.is_closing() {
                return Ok(out);
            }
            // A long poll is a heartbeat for as long as it waits.
            let waiting =
                i64::try_from(deadline.duration_since(now).as_millis()).unwrap_or(i64::MAX);
            self.touch_member(group, member, self.now_ms().saturating_add(waiting));
            // A stream's growth, or a change of assignment (partitions to take or give up),
            // wakes it; a spurious wake looks again.
            let _ = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    () = &mut grew => {}
                    () = &mut changed => {}
                }
            })
            .await;
        }
    }

    /// Commits the member's positions (all of them), or the offsets given (each must name a
    /// stream and partition that exist, and an offset within it).
    pub async fn commit_consumer(
        &self,
        group: &str,
        member: &str,
        offsets: Option<&[(String, u32, u64)]>,
    ) -> Result<(), BrokerError> {
        let strict = offsets.is_some();
        let positions = {
            let consumers = self.inner.consumers.lock();
            let instance = consumers
                .get(&(group.to_string(), member.to_string()))
                .ok_or_else(|| unknown(group, member))?;
            match offsets {
                None => instance.positions.clone(),
                Some(list) => list.iter().map(|(s, p, o)| ((s.clone(), *p), *o)).collect(),
            }
        };
        self.commit_positions(group, &positions, strict).await
    }

    /// Commits positions; unless `strict`, a stream deleted meanwhile is skipped.
    async fn commit_positions(
        &self,
        group: &str,
        positions: &BTreeMap<TopicPartition, u64>,
        strict: bool,
    ) -> Result<(), BrokerError> {
        let mut changed = Vec::new();
        for ((stream, partition), offset) in positions {
            let already = self.committed(group, stream, *partition).await;
            if already.is_some_and(|c| c.offset == *offset) {
                continue;
            }
            // A stream deleted meanwhile: nothing to commit for it.
            if !strict && self.get_stream(stream).is_err() {
                continue;
            }
            changed.push((stream.clone(), *partition, *offset, String::new()));
        }
        // Every partition's commit in one journal write.
        self.commit_many(group, &changed).await
    }

    /// Heartbeats for an instance: gives up what is revoked (committing its position
    /// first), takes what is assigned (at the committed offset, or where `start_at` says).
    async fn consumer_heartbeat(&self, group: &str, member: &str) -> Result<(), BrokerError> {
        let key = (group.to_string(), member.to_string());
        let (held, start_at) = {
            let consumers = self.inner.consumers.lock();
            let instance = consumers.get(&key).ok_or_else(|| unknown(group, member))?;
            (
                instance.positions.keys().cloned().collect::<BTreeSet<_>>(),
                instance.start_at,
            )
        };
        let assignment = match self.heartbeat(group, member, &held) {
            Ok(assignment) => assignment,
            Err(err) => {
                // Expired or gone: this instance is no more.
                self.inner.consumers.lock().remove(&key);
                return Err(err);
            }
        };
        if !assignment.revoked.is_empty() {
            let revoked: BTreeMap<TopicPartition, u64> = {
                let consumers = self.inner.consumers.lock();
                let instance = consumers.get(&key).ok_or_else(|| unknown(group, member))?;
                assignment
                    .revoked
                    .iter()
                    .filter_map(|tp| instance.positions.get(tp).map(|p| (tp.clone(), *p)))
                    .collect()
            };
            self.commit_positions(group, &revoked, false).await?;
        }
        let mut starts = BTreeMap::new();
        for (stream, partition) in &assignment.assigned {
            if held.contains(&(stream.clone(), *partition)) {
                continue;
            }
            let start = match self.committed(group, stream, *partition).await {
                Some(c) => c.offset,
                None => self.start_offset(stream, *partition, start_at),
            };
            starts.insert((stream.clone(), *partition), start);
        }
        let held = {
            let mut consumers = self.inner.consumers.lock();
            let instance = consumers
                .get_mut(&key)
                .ok_or_else(|| unknown(group, member))?;
            for tp in &assignment.revoked {
                instance.positions.remove(tp);
            }
            instance.positions.extend(starts);
            instance.positions.keys().cloned().collect::<BTreeSet<_>>()
        };
        if !assignment.revoked.is_empty() {
            // Say at once what was given up, so its new owner can take it now rather than
            // at this member's next fetch.
            let _ = self.heartbeat(group, member, &held);
            self.inner.groups_changed.notify_waiters();
        }
        Ok(())
    }
}

impl Broker {
    /// Where a member starts in a partition with no committed offset.
    fn start_offset(&self, stream: &str, partition: u32, start_at: StartAt) -> u64 {
        let Some((start, end)) = self.get_stream(stream).ok().and_then(|s| {
            s.partitions
                .get(partition as usize)
                .map(|p| (p.start_offset, p.end_offset.max(p.start_offset)))
        }) else {
            return 0;
        };
        match start_at {
            StartAt::Earliest => start,
            StartAt::Latest => end,
            StartAt::Offset(offset) => offset.clamp(start, end),
            StartAt::Time(ms) => self
                .offset_for_time(stream, partition, ms)
                .ok()
                .flatten()
                .unwrap_or(end)
                .clamp(start, end),
        }
    }
}

fn unknown(group: &str, member: &str) -> BrokerError {
    BrokerError::new(
        ErrorCode::UnknownMember,
        format!(
            "group '{group}' has no member '{member}' (its session expired, or it left): create a consumer again"
        ),
    )
}
