//! Share groups (KIP-932: ShareGroupHeartbeat, ShareFetch, ShareAcknowledge,
//! ShareGroupDescribe, DescribeShareGroupOffsets) on tidewater's work-queue subscriptions:
//! share group G reading topic T is subscription `T/G`, so every queue feature of the
//! subscription applies to Kafka share consumers: leases (acquisition locks), retries with
//! backoff, `max_deliveries` (the delivery count limit) into the dead-letter queue, and the
//! flow-control policies (rate, per-key concurrency, fairness, priorities).
//!
//! - A member's first heartbeat makes the subscription if it is missing, starting where the
//!   group's `share.auto.offset.reset` says (IncrementalAlterConfigs on the group; `latest`
//!   by default, as in Kafka). Every member is assigned every partition of its topics: the
//!   subscription hands out records one by one, whatever their partition.
//! - ShareFetch receives from the subscriptions of the member's share session and answers
//!   the stored batches holding the records it got, with their offsets as acquired records
//!   (the client skips the others). The receipts stay here, by (topic, partition, offset),
//!   until the member acknowledges: ACCEPT is an ack, RELEASE a nack with no delay, REJECT
//!   the dead-letter queue (`Broker::reject`), RENEW a lease extension.
//! - A member that leaves, closes its session, or goes silent past the session timeout has
//!   its acquired records released at once (their leases would also run out on their own).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tidewater_auth::Operation;
use tidewater_core::broker::NackReason;
use tidewater_core::stream::subscription::{SubscriptionPatch, SubscriptionStart};

use crate::Kafka;
use crate::versions::text;

/// A partition of a stream.
type Partition = (String, u32);

/// Members and sessions kept at most (the oldest silent ones go first).
const MAX_MEMBERS: usize = 10_000;
/// Records one member's share session may hold acquired at once: past it, its fetches
/// acquire nothing more until it acknowledges.
const MAX_ACQUIRED: usize = 10_000;
/// Offsets one acknowledgement batch may list types for, one by one.
const MAX_TYPED_OFFSETS: i64 = 100_000;

/// Kafka's acknowledge types.
const GAP: i8 = 0;
const ACCEPT: i8 = 1;
const RELEASE: i8 = 2;
const REJECT: i8 = 3;
const RENEW: i8 = 4;

#[derive(Debug)]
struct Member {
    /// The principal that joined it (authentication on): only it may use the member's
    /// session, so one principal cannot settle what another acquired.
    principal: Option<String>,
    topics: Vec<String>,
    epoch: i32,
    last_seen: Instant,
    sent: Option<BTreeSet<Partition>>,
}

#[derive(Debug, Default)]
struct Session {
    epoch: i32,
    partitions: BTreeSet<Partition>,
    /// Receipts of the records acquired and not acknowledged yet.
    acquired: BTreeMap<(String, u32, u64), String>,
}

/// The listener's share group state.
#[derive(Debug, Default)]
pub(crate) struct Shares {
    members: HashMap<(String, String), Member>,
    sessions: HashMap<(String, String), Session>,
    /// `share.auto.offset.reset` of groups (where their subscriptions start when made).
    starts: HashMap<String, SubscriptionStart>,
}

impl Shares {
    pub(crate) fn groups(&self) -> BTreeSet<String> {
        self.members.keys().map(|(g, _)| g.clone()).collect()
    }
}

/// Receipts to release, by subscription path.
type Releases = BTreeMap<String, Vec<String>>;

/// What a share group reads for a topic: subscription `T/G` of a stream, or the queue T
/// itself (a queue is a one-partition topic for share consumers).
fn path(kafka: &Kafka, topic: &str, group: &str) -> String {
    if kafka.broker.get_stream(topic).is_err() && kafka.broker.get_queue(topic).is_ok() {
        topic.to_string()
    } else {
        format!("{topic}/{group}")
    }
}

impl Kafka {
    /// Removes members silent past the session timeout; returns their receipts to release.
    fn sweep_shares(&self, shares: &mut Shares) -> Releases {
        let timeout = Duration::from_millis(self.config.consumer_session_timeout_ms);
        let gone: Vec<(String, String)> = shares
            .members
            .iter()
            .filter(|(_, m)| m.last_seen.elapsed() > timeout)
            .map(|(k, _)| k.clone())
            .collect();
        let mut releases = Releases::new();
        for key in gone {
            shares.members.remove(&key);
            if let Some(session) = shares.sessions.remove(&key) {
                collect(self, &key.0, session, &mut releases);
            }
        }
        releases
    }

    async fn release(&self, releases: Releases) {
        for (path, receipts) in releases {
            if let Err(err) = self
                .broker
                .nack(&path, &receipts, Some(0), None, NackReason::Failed)
                .await
            {
                tracing::debug!(path, error = %err, "share group: releasing acquired records failed (their leases run out)");
            }
        }
    }

    /// Makes the subscription of share group `group` on `stream` if it is missing.
    async fn ensure_subscription(&self, stream: &str, group: &str) -> Result<(), (i16, String)> {
        if self.broker.get_subscription(stream, group).is_ok() {
            return Ok(());
        }
        let start = self
            .shares
            .lock()
            .starts
            .get(group)
            .cloned()
            .unwrap_or(SubscriptionStart::Latest);
        let patch = SubscriptionPatch {
            start: Some(start),
            ..SubscriptionPatch::default()
        };
        match self.broker.put_subscription(stream, group, &patch).await {
            Ok(_) => Ok(()),
            // Made meanwhile by another member.
            Err(_) if self.broker.get_subscription(stream, group).is_ok() => Ok(()),
            Err(err) => Err((crate::errors::code(&err), err.message)),
        }
    }

    /// Every partition of the member's topics that exist (a queue's one).
    fn share_assignment(&self, topics: &[String]) -> BTreeSet<Partition> {
        let mut out: BTreeSet<Partition> = topics
            .iter()
            .filter_map(|t| self.broker.get_stream(t).ok())
            .flat_map(|info| {
                let name = info.name.clone();
                info.partitions
                    .into_iter()
                    .map(move |p| (name.clone(), p.partition))
            })
            .collect();
        for t in topics {
            if self.broker.get_stream(t).is_err() && self.broker.get_queue(t).is_ok() {
                out.insert((t.clone(), 0));
            }
        }
        out
    }
}

fn collect(kafka: &Kafka, group: &str, session: Session, releases: &mut Releases) {
    for ((stream, _, _), receipt) in session.acquired {
        releases
            .entry(path(kafka, &stream, group))
            .or_default()
            .push(receipt);
    }
}

pub(crate) async fn heartbeat(
    kafka: &Kafka,
    req: ShareGroupHeartbeatRequest,
) -> ShareGroupHeartbeatResponse {
    let mut response = ShareGroupHeartbeatResponse::default();
    response.heartbeat_interval_ms =
        i32::try_from(kafka.config.consumer_heartbeat_interval_ms).unwrap_or(i32::MAX);
    let group = req.group_id.0.to_string();
    let member = req.member_id.to_string();
    let fail =
        |response: &mut ShareGroupHeartbeatResponse, code: ResponseError, message: String| {
            tracing::debug!(?code, message, "ShareGroupHeartbeat refused");
            response.error_code = code.code();
            response.error_message = text(message);
        };
    if member.is_empty() {
        fail(
            &mut response,
            ResponseError::InvalidRequest,
            "a share group member names itself (member id)".into(),
        );
        return response;
    }
    let key = (group.clone(), member.clone());
    let releases = kafka.sweep_shares(&mut kafka.shares.lock());
    kafka.release(releases).await;
    if req.member_epoch < 0 {
        let session = {
            let mut shares = kafka.shares.lock();
            shares.members.remove(&key);
            shares.sessions.remove(&key)
        };
        if let Some(session) = session {
            let mut releases = Releases::new();
            collect(kafka, &group, session, &mut releases);
            kafka.release(releases).await;
        }
        response.member_id = Some(req.member_id);
        response.member_epoch = req.member_epoch;
        return response;
    }
    let names: Option<Vec<String>> = req
        .subscribed_topic_names
        .map(|n| n.into_iter().map(|t| t.0.to_string()).collect());
    let known = kafka
        .shares
        .lock()
        .members
        .get(&key)
        .map(|m| m.topics.clone());
    let topics = match (req.member_epoch, known, names) {
        (0, _, Some(names)) => names,
        (0, _, None) => {
            fail(
                &mut response,
                ResponseError::InvalidRequest,
                "a member joining names the topics it subscribes to".into(),
            );
            return response;
        }
        (_, None, _) => {
            fail(
                &mut response,
                ResponseError::UnknownMemberId,
                format!("member '{member}' is not in share group '{group}': join again"),
            );
            return response;
        }
        (_, Some(known), names) => names.unwrap_or(known),
    };
    if let Some(denied) = topics
        .iter()
        .find(|t| !crate::access::share(kafka, Operation::Consume, t, &group))
    {
        fail(
            &mut response,
            ResponseError::TopicAuthorizationFailed,
            format!(
                "no grant of consume on what share group '{group}' reads of '{denied}' (the queue, or the subscription '{denied}/{group}')"
            ),
        );
        return response;
    }
    if kafka.broker.classic_has_members(&group) || kafka.broker.group_has_member(&group, &member) {
        fail(
            &mut response,
            ResponseError::InconsistentGroupProtocol,
            format!("group '{group}' is a consumer group: use another group id"),
        );
        return response;
    }
    for topic in &topics {
        if kafka.broker.get_stream(topic).is_err() {
            continue;
        }
        if let Err((code, message)) = kafka.ensure_subscription(topic, &group).await {
            response.error_code = code;
            response.error_message = text(message);
            return response;
        }
    }
    let assignment = kafka.share_assignment(&topics);
    let mut shares = kafka.shares.lock();
    if !shares.members.contains_key(&key) && shares.members.len() >= MAX_MEMBERS {
        fail(
            &mut response,
            ResponseError::GroupMaxSizeReached,
            format!("the listener holds its maximum of {MAX_MEMBERS} share group members"),
        );
        return response;
    }
    let principal = crate::access::principal();
    if shares
        .members
        .get(&key)
        .is_some_and(|m| m.principal != principal)
    {
        fail(
            &mut response,
            ResponseError::UnknownMemberId,
            format!("member '{member}' of share group '{group}' belongs to another principal"),
        );
        return response;
    }
    let m = shares.members.entry(key).or_insert(Member {
        principal,
        topics: Vec::new(),
        epoch: 0,
        last_seen: Instant::now(),
        sent: None,
    });
    m.topics = topics;
    m.last_seen = Instant::now();
    if req.member_epoch == 0 {
        m.sent = None;
    }
    if m.sent.as_ref() != Some(&assignment) {
        m.epoch += 1;
        let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
        for (t, p) in &assignment {
            by_topic.entry(t).or_default().push(*p as i32);
        }
        let mut out = share_group_heartbeat_response::Assignment::default();
        out.topic_partitions = by_topic
            .into_iter()
            .map(|(t, partitions)| {
                let mut tp = share_group_heartbeat_response::TopicPartitions::default();
                tp.topic_id = kafka.topic_id(t);
                tp.partitions = partitions;
                tp
            })
            .collect();
        response.assignment = Some(out);
        m.sent = Some(assignment);
    }
    response.member_id = Some(StrBytes::from_string(member));
    response.member_epoch = m.epoch;
    response
}

/// What acknowledging a partition's batches asks of the broker: receipts by type.
#[derive(Debug, Default)]
struct Acks {
    accept: Vec<String>,
    release: Vec<String>,
    reject: Vec<String>,
    renew: Vec<String>,
}

/// Takes the receipts a partition's acknowledgement batches name out of the session (renewed
/// ones stay). Every batch is checked before anything is taken: an offset not acquired by
/// this member, or a malformed batch, refuses the partition's acknowledgements whole. A GAP
/// on an acquired offset (the client saw no record there) releases it.
fn take_acks(
    session: &mut Session,
    stream: &str,
    partition: u32,
    batches: &[(i64, i64, Vec<i8>)],
) -> Result<Acks, (i16, String)> {
    let invalid = |m: String| (ResponseError::InvalidRecordState.code(), m);
    let malformed = |m: String| (ResponseError::InvalidRequest.code(), m);
    let mut plan: Vec<(u64, i8)> = Vec::new();
    for (first, last, types) in batches {
        let span = last.checked_sub(*first).and_then(|d| d.checked_add(1));
        if *first < 0 || span.is_none_or(|n| n <= 0) || types.is_empty() {
            return Err(malformed(format!(
                "acknowledgement batch {first}..={last} with {} types",
                types.len()
            )));
        }
        if types.len() > 1
            && (span != Some(types.len() as i64) || types.len() as i64 > MAX_TYPED_OFFSETS)
        {
            return Err(malformed(format!(
                "acknowledgement batch {first}..={last} has {} types: one, or one per offset",
                types.len()
            )));
        }
        if let Some(t) = types
            .iter()
            .find(|t| !matches!(**t, GAP | ACCEPT | RELEASE | REJECT | RENEW))
        {
            return Err(malformed(format!("unknown acknowledge type {t}")));
        }
        let range = (stream.to_string(), partition, *first as u64)
            ..=(stream.to_string(), partition, *last as u64);
        let offsets: Vec<u64> = session
            .acquired
            .range(range)
            .map(|((_, _, o), _)| *o)
            .collect();
        if types.len() > 1 {
            for (i, t) in types.iter().enumerate() {
                let offset = *first as u64 + i as u64;
                if *t != GAP && offsets.binary_search(&offset).is_err() {
                    return Err(invalid(format!(
                        "offset {offset} of partition {partition} of '{stream}' is not acquired by this member"
                    )));
                }
            }
        } else if offsets.is_empty() && types[0] != GAP {
            return Err(invalid(format!(
                "offsets {first}..={last} of partition {partition} of '{stream}' are not acquired by this member"
            )));
        }
        for offset in offsets {
            let t = if types.len() == 1 {
                types[0]
            } else {
                types[(offset - *first as u64) as usize]
            };
            plan.push((offset, t));
        }
    }
    let mut acks = Acks::default();
    for (offset, t) in plan {
        let key = (stream.to_string(), partition, offset);
        if t == RENEW {
            if let Some(receipt) = session.acquired.get(&key) {
                acks.renew.push(receipt.clone());
            }
            continue;
        }
        let Some(receipt) = session.acquired.remove(&key) else {
            continue;
        };
        match t {
            ACCEPT => acks.accept.push(receipt),
            REJECT => acks.reject.push(receipt),
            _ => acks.release.push(receipt),
        }
    }
    Ok(acks)
}

/// Performs a partition's acknowledgements, every kind of them; the partition's error code
/// (0: all done) and message.
async fn apply_acks(kafka: &Kafka, path: &str, acks: Acks) -> (i16, Option<String>) {
    let mut error: Option<(i16, String)> = None;
    let mut note = |code: i16, message: String| {
        error.get_or_insert((code, message));
    };
    let kinds = [
        ("accept", &acks.accept),
        ("release", &acks.release),
        ("reject", &acks.reject),
    ];
    for (kind, receipts) in kinds {
        if receipts.is_empty() {
            continue;
        }
        let outcome = match kind {
            "accept" => kafka.broker.ack(path, receipts).await,
            "release" => {
                kafka
                    .broker
                    .nack(path, receipts, Some(0), None, NackReason::Failed)
                    .await
            }
            _ => {
                kafka
                    .broker
                    .reject(path, receipts, Some("rejected by a Kafka share consumer"))
                    .await
            }
        };
        match outcome {
            Ok(reply) if reply.failed.is_empty() => {}
            Ok(reply) => note(
                ResponseError::InvalidRecordState.code(),
                format!(
                    "{} of the records to {kind} were no longer acquired (their acquisition lock ran out): {}",
                    reply.failed.len(),
                    reply.failed[0].code
                ),
            ),
            Err(err) => note(crate::errors::code(&err), err.message),
        }
    }
    if !acks.renew.is_empty() {
        match kafka.broker.extend(path, &acks.renew, None) {
            Ok(reply) if reply.failed.is_empty() => {}
            Ok(reply) => note(
                ResponseError::InvalidRecordState.code(),
                format!(
                    "{} of the records to renew were no longer acquired (their acquisition lock ran out)",
                    reply.failed.len()
                ),
            ),
            Err(err) => note(crate::errors::code(&err), err.message),
        }
    }
    match error {
        None => (0, None),
        Some((code, message)) => (code, Some(message)),
    }
}

/// Acknowledgements of a request: (topic id, partition, batches).
type AckRequests = Vec<(uuid::Uuid, i32, Vec<(i64, i64, Vec<i8>)>)>;

/// Handles the acknowledgements of a ShareFetch or ShareAcknowledge: per (topic id,
/// partition), its error code and message.
async fn acknowledge(
    kafka: &Kafka,
    key: &(String, String),
    requests: AckRequests,
) -> BTreeMap<(uuid::Uuid, i32), (i16, Option<String>)> {
    let mut out = BTreeMap::new();
    for (topic_id, partition, batches) in requests {
        if batches.is_empty() {
            continue;
        }
        let Some(stream) = kafka.topic_name(&topic_id) else {
            out.insert(
                (topic_id, partition),
                (ResponseError::UnknownTopicId.code(), None),
            );
            continue;
        };
        let Ok(index) = u32::try_from(partition) else {
            out.insert(
                (topic_id, partition),
                (ResponseError::UnknownTopicOrPartition.code(), None),
            );
            continue;
        };
        let taken = {
            let mut shares = kafka.shares.lock();
            match shares.sessions.get_mut(key) {
                Some(session) => take_acks(session, &stream, index, &batches),
                None => Err((
                    ResponseError::ShareSessionNotFound.code(),
                    "no share session: open one (epoch 0)".into(),
                )),
            }
        };
        let result = match taken {
            Ok(acks) => apply_acks(kafka, &path(kafka, &stream, &key.0), acks).await,
            Err((code, message)) => (code, Some(message)),
        };
        out.insert((topic_id, partition), result);
    }
    out
}

/// Opens, checks or closes a member's share session for a request at `epoch`.
fn session_for(
    kafka: &Kafka,
    key: &(String, String),
    epoch: i32,
) -> Result<(), (ResponseError, String)> {
    let mut shares = kafka.shares.lock();
    let principal = crate::access::principal();
    if shares
        .members
        .get(key)
        .is_none_or(|m| m.principal != principal)
    {
        return Err((
            ResponseError::UnknownMemberId,
            format!(
                "member '{}' is not in share group '{}': join it first",
                key.1, key.0
            ),
        ));
    }
    if let Some(m) = shares.members.get_mut(key) {
        m.last_seen = Instant::now();
    }
    match epoch {
        0 => {
            let session = shares.sessions.entry(key.clone()).or_default();
            session.epoch = 0;
            session.partitions.clear();
            Ok(())
        }
        -1 => Ok(()),
        epoch => match shares.sessions.get_mut(key) {
            None => Err((
                ResponseError::ShareSessionNotFound,
                "no share session: open one (epoch 0)".into(),
            )),
            Some(s) if epoch != s.epoch.wrapping_add(1) => Err((
                ResponseError::InvalidShareSessionEpoch,
                format!(
                    "share session epoch {epoch} where {} was expected",
                    s.epoch.wrapping_add(1)
                ),
            )),
            Some(s) => {
                s.epoch = epoch;
                Ok(())
            }
        },
    }
}

/// Bytes a share fetch's response may hold (its batches are read into memory), for the
/// listener's memory budget.
const SHARE_FETCH_BYTES: usize = 8 << 20;

/// A share fetch, and the share of the listener's memory budget its response holds.
/// The refusal of a share fetch or acknowledgement naming a topic whose share the
/// principal may not consume (nothing is acquired or settled then).
fn share_denied(
    kafka: &Kafka,
    group: &str,
    topic_ids: impl Iterator<Item = uuid::Uuid>,
) -> Option<String> {
    topic_ids
        .filter_map(|id| kafka.topic_name(&id))
        .find(|t| !crate::access::share(kafka, Operation::Consume, t, group))
        .map(|t| format!("no grant of consume on what share group '{group}' reads of '{t}'"))
}

pub(crate) async fn fetch(
    kafka: &Kafka,
    req: ShareFetchRequest,
) -> (
    ShareFetchResponse,
    Option<tokio::sync::OwnedSemaphorePermit>,
) {
    // Counted, not enforced: every acquired record's batch is sent (an acquired record
    // without its batch would sit unseen until its lease ran out); a response holds at most
    // `max_records` batches.
    let (_, held) = kafka.hold(SHARE_FETCH_BYTES);
    (fetch_within(kafka, req).await, held)
}

async fn fetch_within(kafka: &Kafka, req: ShareFetchRequest) -> ShareFetchResponse {
    let mut response = ShareFetchResponse::default();
    let (Some(group), Some(member)) = (req.group_id.as_ref(), req.member_id.as_ref()) else {
        response.error_code = ResponseError::InvalidRequest.code();
        response.error_message = text("a share fetch names its group and member");
        return response;
    };
    let key = (group.0.to_string(), member.to_string());
    if let Some(message) = share_denied(kafka, &key.0, req.topics.iter().map(|t| t.topic_id)) {
        response.error_code = ResponseError::TopicAuthorizationFailed.code();
        response.error_message = text(message);
        return response;
    }
    let releases = kafka.sweep_shares(&mut kafka.shares.lock());
    kafka.release(releases).await;
    if let Err((code, message)) = session_for(kafka, &key, req.share_session_epoch) {
        response.error_code = code.code();
        response.error_message = text(message);
        return response;
    }
    // The session's partitions: those asked now join it, forgotten ones leave it.
    let mut asked: Vec<(uuid::Uuid, i32)> = Vec::new();
    let mut ack_requests: AckRequests = Vec::new();
    {
        let mut shares = kafka.shares.lock();
        let session = shares.sessions.entry(key.clone()).or_default();
        for topic in &req.topics {
            let name = kafka.topic_name(&topic.topic_id);
            for p in &topic.partitions {
                asked.push((topic.topic_id, p.partition_index));
                if let (Some(name), Ok(index)) = (&name, u32::try_from(p.partition_index)) {
                    session.partitions.insert((name.clone(), index));
                }
                ack_requests.push((
                    topic.topic_id,
                    p.partition_index,
                    p.acknowledgement_batches
                        .iter()
                        .map(|b| (b.first_offset, b.last_offset, b.acknowledge_types.clone()))
                        .collect(),
                ));
            }
        }
        for topic in &req.forgotten_topics_data {
            if let Some(name) = kafka.topic_name(&topic.topic_id) {
                for p in &topic.partitions {
                    session
                        .partitions
                        .remove(&(name.clone(), (*p).max(0) as u32));
                }
            }
        }
    }
    let ack_results = acknowledge(kafka, &key, ack_requests).await;
    let mut acquired: BTreeMap<Partition, Vec<(u64, u32)>> = BTreeMap::new();
    // Batches made for records of queues, by queue, with their offsets.
    let mut queued: BTreeMap<String, Vec<(u64, Bytes)>> = BTreeMap::new();
    let mut lock_ms = 0u64;
    if req.share_session_epoch == -1 {
        let session = kafka.shares.lock().sessions.remove(&key);
        if let Some(session) = session {
            let mut releases = Releases::new();
            collect(kafka, &key.0, session, &mut releases);
            kafka.release(releases).await;
        }
    } else {
        let streams: BTreeSet<String> = kafka
            .shares
            .lock()
            .sessions
            .get(&key)
            .map(|s| s.partitions.iter().map(|(t, _)| t.clone()).collect())
            .unwrap_or_default();
        let limits = kafka.broker.limits();
        let held = kafka
            .shares
            .lock()
            .sessions
            .get(&key)
            .map_or(0, |s| s.acquired.len());
        let max = usize::try_from(req.max_records)
            .ok()
            .filter(|m| *m > 0)
            .unwrap_or(500)
            .min(limits.max_receive_messages)
            .min(MAX_ACQUIRED.saturating_sub(held));
        let wait = u64::try_from(req.max_wait_ms)
            .unwrap_or(0)
            .min(limits.max_wait_ms);
        let mut deliveries = Vec::new();
        for round in 0..2 {
            if max == 0 {
                break;
            }
            for (i, stream) in streams.iter().enumerate() {
                // First a look at every topic; then, with nothing found, a long poll on the first.
                let wait = if round == 1 && i == 0 { wait } else { 0 };
                if round == 1 && i > 0 {
                    break;
                }
                let p = path(kafka, stream, &key.0);
                if let Ok(info) = kafka.broker.get_subscription(stream, &key.0) {
                    lock_ms = info
                        .config
                        .get("lease_ms")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(30_000);
                } else if let Ok(queue) = kafka.broker.get_queue(stream) {
                    lock_ms = queue.config.lease_ms;
                }
                match kafka
                    .broker
                    .receive(&p, max.saturating_sub(deliveries.len()).max(1), wait, None)
                    .await
                {
                    Ok(got) => deliveries.extend(got.into_iter().map(|d| (stream.clone(), d))),
                    Err(err) => {
                        tracing::debug!(path = p, error = %err, "share fetch: receive refused")
                    }
                }
                if deliveries.len() >= max {
                    break;
                }
            }
            if !deliveries.is_empty() || wait == 0 || streams.is_empty() {
                break;
            }
        }
        // A subscription's dispatch rate holding records back: the client is told to wait
        // (Kafka's throttle_time_ms, which clients obey before their next request).
        if deliveries.is_empty() {
            let throttle = streams
                .iter()
                .filter_map(|t| kafka.broker.dispatch_wait_ms(&path(kafka, t, &key.0)))
                .min();
            if let Some(ms) = throttle {
                response.throttle_time_ms = i32::try_from(ms).unwrap_or(i32::MAX);
            }
        }
        let mut strays = Releases::new();
        let mut gone = Releases::new();
        {
            let mut shares = kafka.shares.lock();
            // The member may have left (or its session closed) during the long poll: what it
            // got goes back at once.
            let here = shares.members.contains_key(&key);
            let mut session = shares.sessions.get_mut(&key).filter(|_| here);
            for (stream, d) in deliveries {
                let Some(session) = session.as_deref_mut() else {
                    gone.entry(path(kafka, &stream, &key.0))
                        .or_default()
                        .push(d.receipt);
                    continue;
                };
                let queue = path(kafka, &stream, &key.0) == stream;
                // A queue's records are its partition 0, at their offsets, in batches made
                // here. A record from a subscription's own log (one redriven into it) has no
                // partition offset a share consumer could name: it goes back.
                let partition = if queue {
                    queued
                        .entry(stream.clone())
                        .or_default()
                        .push((d.record.offset, queue_batch(&d.record)));
                    Some(0)
                } else {
                    d.source.checked_sub(1).and_then(|p| u32::try_from(p).ok())
                };
                let Some(partition) = partition else {
                    strays
                        .entry(path(kafka, &stream, &key.0))
                        .or_default()
                        .push(d.receipt);
                    continue;
                };
                let offset = d.record.offset;
                session
                    .acquired
                    .insert((stream.clone(), partition, offset), d.receipt);
                acquired
                    .entry((stream, partition))
                    .or_default()
                    .push((offset, d.delivery_count));
            }
        }
        kafka.release(gone).await;
        // Records redriven into a subscription's own log have no partition offset a share
        // consumer can be given: they wait a minute each time (for tidewater's own
        // consumers of the subscription), and count their deliveries.
        for (path, receipts) in strays {
            let _ = kafka
                .broker
                .nack(&path, &receipts, Some(60_000), None, NackReason::Failed)
                .await;
        }
    }
    response.acquisition_lock_timeout_ms = i32::try_from(lock_ms).unwrap_or(i32::MAX);
    // One entry per partition asked, with records, or acknowledged.
    let mut partitions: BTreeMap<(uuid::Uuid, i32), share_fetch_response::PartitionData> =
        BTreeMap::new();
    for (topic_id, index) in &asked {
        let mut p = share_fetch_response::PartitionData::default();
        p.partition_index = *index;
        partitions.insert((*topic_id, *index), p);
    }
    for ((topic_id, index), (code, message)) in ack_results {
        let p = partitions.entry((topic_id, index)).or_default();
        p.partition_index = index;
        p.acknowledge_error_code = code;
        p.acknowledge_error_message = message.map(StrBytes::from_string);
    }
    for ((stream, partition), mut offsets) in acquired {
        offsets.sort_unstable();
        let topic_id = kafka.topic_id(&stream);
        let p = partitions.entry((topic_id, partition as i32)).or_default();
        p.partition_index = partition as i32;
        p.records = Some(match queued.remove(&stream) {
            // In offset order, as clients walk batches and acquired ranges together.
            Some(mut batches) => {
                batches.sort_unstable_by_key(|(offset, _)| *offset);
                batches
                    .into_iter()
                    .map(|(_, b)| b)
                    .collect::<Vec<_>>()
                    .concat()
                    .into()
            }
            None => batches_holding(kafka, &stream, partition, &offsets),
        });
        p.acquired_records = runs(&offsets);
    }
    let mut by_topic: BTreeMap<uuid::Uuid, Vec<share_fetch_response::PartitionData>> =
        BTreeMap::new();
    for ((topic_id, _), p) in partitions {
        by_topic.entry(topic_id).or_default().push(p);
    }
    response.responses = by_topic
        .into_iter()
        .map(|(topic_id, partitions)| {
            let mut t = share_fetch_response::ShareFetchableTopicResponse::default();
            t.topic_id = topic_id;
            t.partitions = partitions;
            t
        })
        .collect();
    response
}

/// A queue's record as a Kafka batch of one, at its offset: its key, its body as the value,
/// its headers, its publish time.
fn queue_batch(record: &tidewater_storage::Record) -> Bytes {
    use tidewater_storage::format::kafka::{KafkaBatchBuilder, NewKafkaRecord, stamp_kafka_batch};
    let headers: Vec<(&[u8], Option<&[u8]>)> = record
        .headers
        .iter()
        .map(|(k, v)| (&k[..], Some(&v[..])))
        .collect();
    let mut builder = KafkaBatchBuilder::new();
    builder.push(&NewKafkaRecord {
        key: record.key.as_deref(),
        value: Some(&record.body),
        headers: &headers,
        timestamp: record.published_at_ms,
    });
    let mut batch = builder.finish();
    stamp_kafka_batch(&mut batch, record.offset, None);
    Bytes::from(batch)
}

/// Acquired offsets as Kafka's acquired-record ranges: runs of consecutive offsets with
/// the same delivery count.
fn runs(offsets: &[(u64, u32)]) -> Vec<share_fetch_response::AcquiredRecords> {
    let mut out: Vec<share_fetch_response::AcquiredRecords> = Vec::new();
    for &(offset, count) in offsets {
        let count = i16::try_from(count).unwrap_or(i16::MAX);
        match out.last_mut() {
            Some(r) if r.last_offset + 1 == offset as i64 && r.delivery_count == count => {
                r.last_offset = offset as i64;
            }
            _ => {
                let mut r = share_fetch_response::AcquiredRecords::default();
                r.first_offset = offset as i64;
                r.last_offset = offset as i64;
                r.delivery_count = count;
                out.push(r);
            }
        }
    }
    out
}

/// The stored batches of a partition holding the offsets given (sorted), back to back.
fn batches_holding(kafka: &Kafka, stream: &str, partition: u32, offsets: &[(u64, u32)]) -> Bytes {
    let mut out = BytesMut::new();
    let mut next = 0usize;
    while next < offsets.len() {
        let from = offsets[next].0;
        let Ok(batches) = kafka
            .broker
            .read_partition_batches(stream, partition, from, 1 << 20)
        else {
            break;
        };
        if batches.is_empty() {
            break;
        }
        for batch in batches {
            let end = batch.base_offset + u64::from(batch.span);
            let holds = offsets[next..]
                .iter()
                .any(|(o, _)| *o >= batch.base_offset && *o < end);
            if holds {
                out.extend_from_slice(&batch.kafka);
            }
            while next < offsets.len() && offsets[next].0 < end {
                next += 1;
            }
            if next >= offsets.len() {
                break;
            }
        }
    }
    out.freeze()
}

pub(crate) async fn acknowledge_request(
    kafka: &Kafka,
    req: ShareAcknowledgeRequest,
) -> ShareAcknowledgeResponse {
    let mut response = ShareAcknowledgeResponse::default();
    let (Some(group), Some(member)) = (req.group_id.as_ref(), req.member_id.as_ref()) else {
        response.error_code = ResponseError::InvalidRequest.code();
        response.error_message = text("a share acknowledgement names its group and member");
        return response;
    };
    let key = (group.0.to_string(), member.to_string());
    if let Some(message) = share_denied(kafka, &key.0, req.topics.iter().map(|t| t.topic_id)) {
        response.error_code = ResponseError::TopicAuthorizationFailed.code();
        response.error_message = text(message);
        return response;
    }
    if req.share_session_epoch == 0 {
        response.error_code = ResponseError::InvalidShareSessionEpoch.code();
        response.error_message =
            text("a share session is opened by a ShareFetch, not a ShareAcknowledge");
        return response;
    }
    if let Err((code, message)) = session_for(kafka, &key, req.share_session_epoch) {
        response.error_code = code.code();
        response.error_message = text(message);
        return response;
    }
    let mut requests: AckRequests = Vec::new();
    for topic in &req.topics {
        for p in &topic.partitions {
            requests.push((
                topic.topic_id,
                p.partition_index,
                p.acknowledgement_batches
                    .iter()
                    .map(|b| (b.first_offset, b.last_offset, b.acknowledge_types.clone()))
                    .collect(),
            ));
        }
    }
    let results = acknowledge(kafka, &key, requests).await;
    if req.share_session_epoch == -1 {
        let session = kafka.shares.lock().sessions.remove(&key);
        if let Some(session) = session {
            let mut releases = Releases::new();
            collect(kafka, &key.0, session, &mut releases);
            kafka.release(releases).await;
        }
    }
    let mut by_topic: BTreeMap<uuid::Uuid, Vec<share_acknowledge_response::PartitionData>> =
        BTreeMap::new();
    for ((topic_id, index), (code, message)) in results {
        let mut p = share_acknowledge_response::PartitionData::default();
        p.partition_index = index;
        p.error_code = code;
        p.error_message = message.map(StrBytes::from_string);
        by_topic.entry(topic_id).or_default().push(p);
    }
    response.responses = by_topic
        .into_iter()
        .map(|(topic_id, partitions)| {
            let mut t = share_acknowledge_response::ShareAcknowledgeTopicResponse::default();
            t.topic_id = topic_id;
            t.partitions = partitions;
            t
        })
        .collect();
    response
}

pub(crate) fn describe(
    kafka: &Kafka,
    req: ShareGroupDescribeRequest,
) -> ShareGroupDescribeResponse {
    let mut response = ShareGroupDescribeResponse::default();
    let shares = kafka.shares.lock();
    for group in req.group_ids {
        let name = group.0.to_string();
        let mut out = share_group_describe_response::DescribedGroup::default();
        out.group_id = group;
        if !crate::access::group(Operation::Describe, &name) {
            out.error_code = ResponseError::GroupAuthorizationFailed.code();
            response.groups.push(out);
            continue;
        }
        let members: Vec<(&String, &Member)> = shares
            .members
            .iter()
            .filter(|((g, _), _)| *g == name)
            .map(|((_, m), member)| (m, member))
            .collect();
        let has_subscriptions = kafka
            .broker
            .list_subscriptions(None)
            .map(|subs| subs.iter().any(|s| s.name == name))
            .unwrap_or(false);
        if members.is_empty() && !has_subscriptions {
            out.error_code = ResponseError::GroupIdNotFound.code();
            out.error_message = text(format!("share group '{name}' does not exist"));
            response.groups.push(out);
            continue;
        }
        out.group_state = StrBytes::from_static_str(if members.is_empty() {
            "Empty"
        } else {
            "Stable"
        });
        out.group_epoch = members.iter().map(|(_, m)| m.epoch).max().unwrap_or(0);
        out.assignment_epoch = out.group_epoch;
        out.assignor_name = StrBytes::from_static_str("simple");
        out.members = members
            .into_iter()
            .map(|(id, m)| {
                let mut d = share_group_describe_response::Member::default();
                d.member_id = StrBytes::from_string(id.clone());
                d.member_epoch = m.epoch;
                d.subscribed_topic_names = m
                    .topics
                    .iter()
                    .map(|t| TopicName(StrBytes::from_string(t.clone())))
                    .collect();
                let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
                for (t, p) in m.sent.iter().flatten() {
                    by_topic.entry(t).or_default().push(*p as i32);
                }
                d.assignment.topic_partitions = by_topic
                    .into_iter()
                    .map(|(t, partitions)| {
                        let mut tp = share_group_describe_response::TopicPartitions::default();
                        tp.topic_id = kafka.topic_id(t);
                        tp.topic_name = TopicName(StrBytes::from_string(t.to_string()));
                        tp.partitions = partitions;
                        tp
                    })
                    .collect();
                d
            })
            .collect();
        response.groups.push(out);
    }
    response
}

/// A share group's start offsets per partition: where its subscription's settled prefix
/// ends (the share-partition start offset).
pub(crate) fn describe_offsets(
    kafka: &Kafka,
    req: DescribeShareGroupOffsetsRequest,
) -> DescribeShareGroupOffsetsResponse {
    let mut response = DescribeShareGroupOffsetsResponse::default();
    for group in req.groups {
        let name = group.group_id.0.to_string();
        let mut out =
            describe_share_group_offsets_response::DescribeShareGroupOffsetsResponseGroup::default(
            );
        out.group_id = group.group_id;
        if !crate::access::group(Operation::Describe, &name) {
            out.error_code = ResponseError::GroupAuthorizationFailed.code();
            response.groups.push(out);
            continue;
        }
        let subs: Vec<_> = kafka
            .broker
            .list_subscriptions(None)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.name == name)
            .collect();
        let wanted: Option<BTreeMap<String, Vec<i32>>> = group.topics.map(|topics| {
            topics
                .into_iter()
                .map(|t| (t.topic_name.0.to_string(), t.partitions))
                .collect()
        });
        for sub in subs {
            let asked = wanted.as_ref().map(|w| w.get(&sub.stream));
            if asked == Some(None) {
                continue;
            }
            let mut t = describe_share_group_offsets_response::DescribeShareGroupOffsetsResponseTopic::default();
            t.topic_name = TopicName(StrBytes::from_string(sub.stream.clone()));
            t.topic_id = kafka.topic_id(&sub.stream);
            for p in &sub.partitions {
                if let Some(Some(parts)) = asked
                    && !parts.contains(&(p.partition as i32))
                {
                    continue;
                }
                let mut r = describe_share_group_offsets_response::DescribeShareGroupOffsetsResponsePartition::default();
                r.partition_index = p.partition as i32;
                r.start_offset = p.floor as i64;
                r.leader_epoch = 0;
                t.partitions.push(r);
            }
            out.topics.push(t);
        }
        response.groups.push(out);
    }
    response
}

/// `share.auto.offset.reset` of a group (IncrementalAlterConfigs on a GROUP resource):
/// where its subscriptions start when they are made.
pub(crate) fn set_share_start(
    kafka: &Kafka,
    group: &str,
    value: Option<&str>,
) -> Result<(), String> {
    let start = match value.map(str::trim) {
        None | Some("latest") => SubscriptionStart::Latest,
        Some("earliest") => SubscriptionStart::Earliest,
        Some(other) => {
            return Err(format!(
                "share.auto.offset.reset: '{other}' is not earliest or latest"
            ));
        }
    };
    let mut shares = kafka.shares.lock();
    if shares.starts.len() >= MAX_MEMBERS && !shares.starts.contains_key(group) {
        return Err("too many share group settings held".into());
    }
    shares.starts.insert(group.to_string(), start);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(offsets: &[u64]) -> Session {
        let mut s = Session::default();
        for o in offsets {
            s.acquired.insert(("t".into(), 0, *o), format!("r{o}"));
        }
        s
    }

    #[test]
    fn acquired_offsets_are_runs_of_one_delivery_count() {
        let r = runs(&[(3, 1), (4, 1), (5, 2), (7, 2), (8, 2)]);
        let got: Vec<(i64, i64, i16)> = r
            .iter()
            .map(|r| (r.first_offset, r.last_offset, r.delivery_count))
            .collect();
        assert_eq!(got, vec![(3, 4, 1), (5, 5, 2), (7, 8, 2)]);
    }

    #[test]
    fn acknowledgements_take_the_receipts_they_name() {
        let mut s = session(&[1, 2, 3, 4, 6]);
        // One type for a range: every acquired offset in it (5 was never acquired: a gap).
        let acks = take_acks(&mut s, "t", 0, &[(1, 3, vec![ACCEPT])]).unwrap();
        assert_eq!(acks.accept, vec!["r1", "r2", "r3"]);
        // One type per offset.
        let acks = take_acks(&mut s, "t", 0, &[(4, 6, vec![RELEASE, GAP, REJECT])]).unwrap();
        assert_eq!(
            (acks.release, acks.reject),
            (vec!["r4".to_string()], vec!["r6".to_string()])
        );
        assert!(s.acquired.is_empty());
    }

    #[test]
    fn acknowledgements_are_all_or_none() {
        let mut s = session(&[1, 2]);
        let err = take_acks(
            &mut s,
            "t",
            0,
            &[(1, 1, vec![ACCEPT]), (9, 9, vec![ACCEPT])],
        )
        .unwrap_err();
        assert_eq!(err.0, ResponseError::InvalidRecordState.code());
        assert_eq!(s.acquired.len(), 2, "nothing taken when a batch is refused");
        let err = take_acks(&mut s, "t", 0, &[(1, 1, vec![ACCEPT]), (2, 2, vec![9])]).unwrap_err();
        assert_eq!(err.0, ResponseError::InvalidRequest.code());
        assert_eq!(s.acquired.len(), 2);
        // A gap on an acquired offset releases it; an overflowing range is refused.
        let acks = take_acks(&mut s, "t", 0, &[(1, 1, vec![GAP])]).unwrap();
        assert_eq!(acks.release, vec!["r1"]);
        let err = take_acks(&mut s, "t", 0, &[(0, i64::MAX, vec![ACCEPT, REJECT])]).unwrap_err();
        assert_eq!(err.0, ResponseError::InvalidRequest.code());
    }

    #[test]
    fn renewals_keep_the_receipt_and_strangers_are_refused() {
        let mut s = session(&[10]);
        let acks = take_acks(&mut s, "t", 0, &[(10, 10, vec![RENEW])]).unwrap();
        assert_eq!(acks.renew, vec!["r10"]);
        assert_eq!(s.acquired.len(), 1, "a renewed record stays acquired");
        let err = take_acks(&mut s, "t", 0, &[(11, 11, vec![ACCEPT])]).unwrap_err();
        assert_eq!(err.0, ResponseError::InvalidRecordState.code());
        let err = take_acks(&mut s, "t", 0, &[(10, 12, vec![ACCEPT, ACCEPT])]).unwrap_err();
        assert_eq!(
            err.0,
            ResponseError::InvalidRequest.code(),
            "types must be one or one per offset"
        );
        // A huge range with one type walks only what is acquired.
        let acks = take_acks(&mut s, "t", 0, &[(0, i64::MAX - 1, vec![ACCEPT])]).unwrap();
        assert_eq!(acks.accept, vec!["r10"]);
    }
}
