//! A consumer-group member: joins a group for streams, is handed partitions by the broker,
//! fetches them ahead into a bounded buffer, and commits what was consumed (docs/streams.md).
//!
//! Two background tasks do the work: the *membership* task joins, heartbeats, takes the
//! partitions it is given (starting each at the group's committed offset) and gives up the
//! ones it must (committing them first when auto-commit is on); the *fetcher* reads every
//! partition held in one Fetch request at a time. `next` hands records out in order per
//! partition and counts each as consumed. A partition given up or sought while its records
//! wait in the buffer has them dropped, so a record is never handed out after its partition
//! moved on.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tidewater_format::kafka::{BatchRecord, batch_records, check_kafka_batch, split_kafka_batches};
use tidewater_proto::{CommitOffset, CommittedOffset, FetchPartition, Frame, StreamPartition};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::{Client, ClientError};

/// Where a partition with no committed offset starts (Kafka's `auto.offset.reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
}

/// What changed in a member's partitions (`GroupConsumerOptions::on_rebalance`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    /// Handed to this member; records of them follow.
    Assigned(Vec<(String, u32)>),
    /// Given up (after the commit, with auto-commit on): no more records of them come.
    Revoked(Vec<(String, u32)>),
    /// Taken away without a chance to commit: the member's session expired. It joins
    /// again.
    Lost(Vec<(String, u32)>),
}

pub type RebalanceCallback = Arc<dyn Fn(&Rebalance) + Send + Sync>;

#[derive(Clone)]
pub struct GroupConsumerOptions {
    /// Without a heartbeat for this long, the broker gives the member's partitions to
    /// the others (1 s at least; the broker's `max_session_timeout_ms` at most).
    pub session_timeout: Duration,
    /// A static member's name: joining again under it takes its partitions back with no
    /// rebalance (Kafka's `group.instance.id`).
    pub instance: Option<String>,
    /// Commit what was consumed this often (and before giving a partition up, and at
    /// `close`); `None`: only `commit` commits.
    pub auto_commit: Option<Duration>,
    pub start: StartFrom,
    /// Bytes one fetch may bring, and one partition's share of them.
    pub max_fetch_bytes: u32,
    pub max_partition_bytes: u32,
    /// How long a fetch waits at the broker for records.
    pub max_wait: Duration,
    /// Fetches' worth of records held ahead of `next`.
    pub prefetch: usize,
    pub on_rebalance: Option<RebalanceCallback>,
}

impl Default for GroupConsumerOptions {
    fn default() -> Self {
        GroupConsumerOptions {
            session_timeout: Duration::from_secs(10),
            instance: None,
            auto_commit: Some(Duration::from_secs(5)),
            start: StartFrom::Earliest,
            max_fetch_bytes: 4 << 20,
            max_partition_bytes: 1 << 20,
            max_wait: Duration::from_millis(500),
            prefetch: 4,
            on_rebalance: None,
        }
    }
}

impl std::fmt::Debug for GroupConsumerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumerOptions")
            .field("session_timeout", &self.session_timeout)
            .field("instance", &self.instance)
            .field("auto_commit", &self.auto_commit)
            .field("start", &self.start)
            .field("max_fetch_bytes", &self.max_fetch_bytes)
            .field("max_partition_bytes", &self.max_partition_bytes)
            .field("max_wait", &self.max_wait)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

/// A record read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub stream: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    /// ms since the epoch: the producer's, or the broker's on a LogAppendTime stream.
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// Where a held partition stands. Replaced (and the old one marked stale) when the
/// partition is sought or given up, so records fetched for the old one are dropped.
struct Cursor {
    /// The offset after the last record handed out by `next`.
    consumed: AtomicU64,
    stale: AtomicBool,
}

struct Held {
    cursor: Arc<Cursor>,
    /// The next offset to fetch.
    fetch: u64,
    /// What the group has committed for it (skip commits that change nothing).
    committed: Option<u64>,
}

#[derive(Default)]
struct State {
    member: Option<String>,
    held: BTreeMap<(String, u32), Held>,
    closed: bool,
    /// A problem `next` reports (once) before going on.
    error: Option<ClientError>,
}

struct Shared {
    client: Client,
    group: String,
    streams: Vec<String>,
    opts: GroupConsumerOptions,
    state: Mutex<State>,
    /// The held partitions changed (the fetcher looks again).
    changed: Notify,
    /// A commit or a heartbeat is wanted now (a revocation is waiting).
    heartbeat_now: Notify,
    /// An error was stored for `next` to report.
    failed: Notify,
}

impl Shared {
    fn fail(&self, err: ClientError) {
        self.state.lock().error = Some(err);
        self.failed.notify_one();
    }
}

struct Chunk {
    cursor: Arc<Cursor>,
    records: Vec<StreamRecord>,
}

/// A member of a consumer group: a stream of records from the partitions the broker
/// hands it.
///
/// ```no_run
/// # async fn demo() -> Result<(), tidewater_client::ClientError> {
/// use tidewater_client::{Client, ClientOptions, GroupConsumerOptions};
///
/// let client = Client::new("127.0.0.1:7071", ClientOptions::default());
/// let mut consumer =
///     client.group_consumer("billing", &["orders"], GroupConsumerOptions::default());
/// while let Some(record) = consumer.next().await {
///     let record = record?;
///     println!("{}/{} @{}: {:?}", record.stream, record.partition, record.offset, record.value);
/// }
/// consumer.close().await?; // commits what was consumed and leaves the group
/// # Ok(())
/// # }
/// ```
pub struct GroupConsumer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Chunk>,
    current: Option<(Arc<Cursor>, VecDeque<StreamRecord>)>,
    tasks: Vec<JoinHandle<()>>,
}

impl GroupConsumer {
    pub(crate) fn start(
        client: Client,
        group: &str,
        streams: &[&str],
        opts: GroupConsumerOptions,
    ) -> GroupConsumer {
        let (tx, rx) = mpsc::channel(opts.prefetch.max(1));
        let shared = Arc::new(Shared {
            client,
            group: group.to_string(),
            streams: streams.iter().map(|s| s.to_string()).collect(),
            opts,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            heartbeat_now: Notify::new(),
            failed: Notify::new(),
        });
        let tasks = vec![
            tokio::spawn(membership(shared.clone())),
            tokio::spawn(fetcher(shared.clone(), tx)),
        ];
        GroupConsumer {
            shared,
            rx,
            current: None,
            tasks,
        }
    }

    /// The next record, in offset order within its partition; `None` once closed. An
    /// error is reported once and the consumer goes on (it rejoins, refetches).
    pub async fn next(&mut self) -> Option<Result<StreamRecord, ClientError>> {
        loop {
            if let Some(err) = self.shared.state.lock().error.take() {
                return Some(Err(err));
            }
            if let Some((cursor, records)) = &mut self.current {
                if !cursor.stale.load(Ordering::Relaxed)
                    && let Some(record) = records.pop_front()
                {
                    cursor.consumed.store(record.offset + 1, Ordering::Relaxed);
                    return Some(Ok(record));
                }
                self.current = None;
            }
            let chunk = tokio::select! {
                chunk = self.rx.recv() => chunk?,
                () = self.shared.failed.notified() => continue,
            };
            self.current = Some((chunk.cursor, chunk.records.into()));
        }
    }

    /// The member id the broker gave this consumer, once it joined.
    pub fn member(&self) -> Option<String> {
        self.shared.state.lock().member.clone()
    }

    /// The partitions this member holds now.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.shared.state.lock().held.keys().cloned().collect()
    }

    /// The offset after the last record `next` returned, per partition held.
    pub fn positions(&self) -> Vec<((String, u32), u64)> {
        self.shared
            .state
            .lock()
            .held
            .iter()
            .map(|(tp, h)| (tp.clone(), h.cursor.consumed.load(Ordering::Relaxed)))
            .collect()
    }

    /// Commits what `next` returned so far in every partition held (durable when this
    /// returns).
    pub async fn commit(&self) -> Result<(), ClientError> {
        commit_held(&self.shared, None).await
    }

    /// Reads a held partition from `offset` next (records fetched before are dropped).
    pub fn seek(&self, stream: &str, partition: u32, offset: u64) -> Result<(), ClientError> {
        let mut state = self.shared.state.lock();
        let Some(held) = state.held.get_mut(&(stream.to_string(), partition)) else {
            return Err(ClientError::Server {
                code: "partition_not_assigned".into(),
                message: format!(
                    "partition {partition} of stream '{stream}' is not held by this member"
                ),
            });
        };
        held.cursor.stale.store(true, Ordering::Relaxed);
        held.cursor = Arc::new(Cursor {
            consumed: AtomicU64::new(offset),
            stale: AtomicBool::new(false),
        });
        held.fetch = offset;
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    /// Reads every held partition from the first record at or after `timestamp` (ms since
    /// the epoch); a partition with no record that late goes to its end.
    pub async fn seek_to_time(&self, timestamp: i64) -> Result<(), ClientError> {
        for (stream, partition) in self.assignment() {
            let offset =
                list_offset(&self.shared.client, &stream, partition, timestamp.max(0)).await?;
            let offset = match offset {
                Some(offset) => offset,
                None => list_offset(&self.shared.client, &stream, partition, -1)
                    .await?
                    .unwrap_or(0),
            };
            // The partition may have moved on meanwhile: then there is nothing to seek.
            let _ = self.seek(&stream, partition, offset);
        }
        Ok(())
    }

    /// Commits what was consumed (with auto-commit on), leaves the group (its partitions
    /// go to the others at once) and stops.
    pub async fn close(mut self) -> Result<(), ClientError> {
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        let committed = if self.shared.opts.auto_commit.is_some() {
            commit_held(&self.shared, None).await
        } else {
            Ok(())
        };
        let member = {
            let mut state = self.shared.state.lock();
            state.closed = true;
            state.member.take()
        };
        if let Some(member) = member {
            self.shared
                .client
                .request(Frame::LeaveGroup {
                    group: self.shared.group.clone(),
                    member,
                })
                .await?;
        }
        committed
    }
}

impl Drop for GroupConsumer {
    /// Without `close`, the member stops heartbeating; the broker gives its partitions to
    /// the others once its session times out.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn tps(partitions: &[(String, u32)]) -> Vec<StreamPartition> {
    partitions
        .iter()
        .map(|(stream, partition)| StreamPartition {
            stream: stream.clone(),
            partition: *partition,
        })
        .collect()
}

async fn list_offset(
    client: &Client,
    stream: &str,
    partition: u32,
    at: i64,
) -> Result<Option<u64>, ClientError> {
    match client
        .request(Frame::ListOffset {
            stream: stream.to_string(),
            partition,
            at,
        })
        .await?
    {
        Frame::Offset { offset } => Ok(offset),
        other => Err(unexpected("ListOffset", &other)),
    }
}

fn unexpected(what: &str, reply: &Frame) -> ClientError {
    ClientError::Protocol(format!("unexpected reply to {what}: {reply:?}"))
}

/// Commits the consumed positions of the held partitions (`only`: of these), skipping
/// those already committed there.
async fn commit_held(
    shared: &Shared,
    only: Option<&BTreeSet<(String, u32)>>,
) -> Result<(), ClientError> {
    let (member, offsets) = {
        let state = shared.state.lock();
        let Some(member) = state.member.clone() else {
            return Ok(());
        };
        let offsets: Vec<CommitOffset> = state
            .held
            .iter()
            .filter(|(tp, _)| only.is_none_or(|only| only.contains(*tp)))
            .filter_map(|((stream, partition), held)| {
                let offset = held.cursor.consumed.load(Ordering::Relaxed);
                (held.committed != Some(offset)).then(|| CommitOffset {
                    stream: stream.clone(),
                    partition: *partition,
                    offset,
                    metadata: String::new(),
                })
            })
            .collect();
        (member, offsets)
    };
    if offsets.is_empty() {
        return Ok(());
    }
    match shared
        .client
        .request(Frame::Commit {
            group: shared.group.clone(),
            member,
            offsets: offsets.clone(),
        })
        .await?
    {
        Frame::Ok => {
            let mut state = shared.state.lock();
            for o in offsets {
                if let Some(held) = state.held.get_mut(&(o.stream, o.partition)) {
                    held.committed = Some(o.offset);
                }
            }
            Ok(())
        }
        other => Err(unexpected("Commit", &other)),
    }
}

fn report(shared: &Shared, event: Rebalance) {
    if let Some(callback) = &shared.opts.on_rebalance {
        callback(&event);
    }
}

/// Joins, heartbeats, and takes or gives up partitions as the broker says.
async fn membership(shared: Arc<Shared>) {
    let mut attempt = 0u32;
    loop {
        match member_session(&shared).await {
            Ok(()) => return,
            Err(err) => {
                // Lost the membership or the connection: what was held is gone.
                let lost: Vec<(String, u32)> = {
                    let mut state = shared.state.lock();
                    state.member = None;
                    let held = std::mem::take(&mut state.held);
                    for h in held.values() {
                        h.cursor.stale.store(true, Ordering::Relaxed);
                    }
                    held.into_keys().collect()
                };
                shared.fail(err);
                shared.changed.notify_waiters();
                if !lost.is_empty() {
                    report(&shared, Rebalance::Lost(lost));
                }
                tokio::time::sleep(crate::backoff(&shared.client.inner.opts, attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// One membership: from join until it is lost (an error) or the consumer closes.
async fn member_session(shared: &Shared) -> Result<(), ClientError> {
    let opts = &shared.opts;
    let session_ms = u32::try_from(opts.session_timeout.as_millis()).unwrap_or(u32::MAX);
    let reply = shared
        .client
        .request(Frame::JoinGroup {
            group: shared.group.clone(),
            instance: opts.instance.clone().unwrap_or_default(),
            session_timeout_ms: session_ms,
            streams: shared.streams.clone(),
        })
        .await?;
    let (member, heartbeat_ms) = match reply {
        Frame::Joined {
            member,
            heartbeat_ms,
        } => (member, heartbeat_ms),
        other => return Err(unexpected("JoinGroup", &other)),
    };
    shared.state.lock().member = Some(member.clone());
    let heartbeat = Duration::from_millis(u64::from(heartbeat_ms.max(100)));
    let mut next_commit = opts
        .auto_commit
        .map(|every| tokio::time::Instant::now() + every);
    loop {
        let owned: Vec<(String, u32)> = shared.state.lock().held.keys().cloned().collect();
        let reply = shared
            .client
            .request(Frame::Heartbeat {
                group: shared.group.clone(),
                member: member.clone(),
                owned: tps(&owned),
            })
            .await?;
        let Frame::Assignment {
            assigned, revoked, ..
        } = reply
        else {
            return Err(unexpected("Heartbeat", &reply));
        };
        let revoked: BTreeSet<(String, u32)> = revoked
            .into_iter()
            .map(|p| (p.stream, p.partition))
            .collect();
        if !revoked.is_empty() {
            if opts.auto_commit.is_some() {
                commit_held(shared, Some(&revoked)).await?;
            }
            {
                let mut state = shared.state.lock();
                for tp in &revoked {
                    if let Some(held) = state.held.remove(tp) {
                        held.cursor.stale.store(true, Ordering::Relaxed);
                    }
                }
            }
            shared.changed.notify_waiters();
            report(shared, Rebalance::Revoked(revoked.into_iter().collect()));
            continue; // tell the broker at once, so the new owner can start
        }
        let new: Vec<(String, u32)> = {
            let state = shared.state.lock();
            assigned
                .into_iter()
                .map(|p| (p.stream, p.partition))
                .filter(|tp| !state.held.contains_key(tp))
                .collect()
        };
        if !new.is_empty() {
            take(shared, &new).await?;
            report(shared, Rebalance::Assigned(new));
        }
        if let Some(at) = next_commit
            && tokio::time::Instant::now() >= at
        {
            commit_held(shared, None).await?;
            next_commit = opts
                .auto_commit
                .map(|every| tokio::time::Instant::now() + every);
        }
        let mut wait = heartbeat;
        if let Some(at) = next_commit {
            wait = wait.min(at.saturating_duration_since(tokio::time::Instant::now()));
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.heartbeat_now.notified() => {}
        }
        if shared.state.lock().closed {
            return Ok(());
        }
    }
}

/// Starts holding partitions: each at the group's committed offset, else where
/// `start` says.
async fn take(shared: &Shared, new: &[(String, u32)]) -> Result<(), ClientError> {
    let reply = shared
        .client
        .request(Frame::FetchCommitted {
            group: shared.group.clone(),
            partitions: tps(new),
        })
        .await?;
    let Frame::Committed { offsets } = reply else {
        return Err(unexpected("FetchCommitted", &reply));
    };
    for CommittedOffset {
        stream,
        partition,
        offset,
        ..
    } in offsets
    {
        let start = match offset {
            Some(offset) => offset,
            None => {
                let at = match shared.opts.start {
                    StartFrom::Earliest => -2,
                    StartFrom::Latest => -1,
                };
                list_offset(&shared.client, &stream, partition, at)
                    .await?
                    .unwrap_or(0)
            }
        };
        shared.state.lock().held.insert(
            (stream, partition),
            Held {
                cursor: Arc::new(Cursor {
                    consumed: AtomicU64::new(start),
                    stale: AtomicBool::new(false),
                }),
                fetch: start,
                committed: offset,
            },
        );
    }
    shared.changed.notify_waiters();
    Ok(())
}

/// Fetches every held partition, one Fetch at a time, into the buffer `next` reads.
async fn fetcher(shared: Arc<Shared>, tx: mpsc::Sender<Chunk>) {
    let opts = &shared.opts;
    let mut rotate = 0usize;
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let mut wanted: Vec<((String, u32), u64, Arc<Cursor>)> = shared
            .state
            .lock()
            .held
            .iter()
            .map(|(tp, h)| (tp.clone(), h.fetch, h.cursor.clone()))
            .collect();
        if wanted.is_empty() {
            changed.await;
            continue;
        }
        // Start with a different partition each time: under a small max_fetch_bytes the
        // first ones would otherwise take it all.
        rotate = rotate.wrapping_add(1);
        let n = wanted.len();
        wanted.rotate_left(rotate % n);
        let frame = Frame::Fetch {
            wait_ms: u32::try_from(opts.max_wait.as_millis()).unwrap_or(u32::MAX),
            max_bytes: opts.max_fetch_bytes,
            partitions: wanted
                .iter()
                .map(|((stream, partition), offset, _)| FetchPartition {
                    stream: stream.clone(),
                    partition: *partition,
                    offset: *offset,
                    max_bytes: opts.max_partition_bytes,
                })
                .collect(),
        };
        let reply = tokio::select! {
            reply = shared.client.request(frame) => reply,
            // A partition came or went, or was sought: fetch what is held now.
            () = &mut changed => continue,
        };
        let partitions = match reply {
            Ok(Frame::Fetched { partitions }) => partitions,
            Ok(other) => {
                shared.fail(unexpected("Fetch", &other));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(err) => {
                shared.fail(err);
                tokio::time::sleep(crate::backoff(&shared.client.inner.opts, 3)).await;
                continue;
            }
        };
        for (answer, (tp, offset, cursor)) in partitions.into_iter().zip(wanted) {
            if !answer.code.is_empty() {
                if answer.code == "offset_out_of_range" {
                    // Past the end (the partition was recreated, or the position was
                    // sought too far): start again where `start` says.
                    let at = match opts.start {
                        StartFrom::Earliest => -2,
                        StartFrom::Latest => -1,
                    };
                    if let Ok(Some(to)) = list_offset(&shared.client, &tp.0, tp.1, at).await {
                        let mut state = shared.state.lock();
                        if let Some(held) = state.held.get_mut(&tp)
                            && Arc::ptr_eq(&held.cursor, &cursor)
                        {
                            held.fetch = to;
                            cursor.consumed.store(to, Ordering::Relaxed);
                        }
                    }
                }
                shared.fail(ClientError::Server {
                    code: answer.code,
                    message: answer.message,
                });
                continue;
            }
            let stream: Arc<str> = Arc::from(tp.0.as_str());
            let (records, next) = match decode(&stream, tp.1, answer.records, offset) {
                Ok(decoded) => decoded,
                Err(err) => {
                    shared.fail(err);
                    continue;
                }
            };
            {
                let mut state = shared.state.lock();
                match state.held.get_mut(&tp) {
                    // On past the batches' offsets, records or not: a compacted partition's
                    // batches span offsets whose records are gone (the fetch used to stay
                    // on such a batch for ever).
                    Some(held) if Arc::ptr_eq(&held.cursor, &cursor) => held.fetch = next,
                    _ => continue, // given up or sought meanwhile
                }
            }
            if records.is_empty() {
                // Nothing handed out is pending before `offset`: the position moves past
                // the gap too (what a commit saves).
                let _ = cursor.consumed.compare_exchange(
                    offset,
                    next,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                continue;
            }
            if tx.send(Chunk { cursor, records }).await.is_err() {
                return;
            }
        }
    }
}

/// The records of a fetched record set from `from` on, each batch's CRC checked, and the
/// offset after the last batch's (a batch may span offsets past its last record).
fn decode(
    stream: &Arc<str>,
    partition: u32,
    set: Vec<u8>,
    from: u64,
) -> Result<(Vec<StreamRecord>, u64), ClientError> {
    let bad = |why: String| {
        ClientError::Protocol(format!(
            "partition {partition} of stream '{stream}': a fetched batch is invalid: {why}"
        ))
    };
    let set = Bytes::from(set);
    let mut out = Vec::new();
    let mut next = from;
    for batch in split_kafka_batches(&set) {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let header = check_kafka_batch(batch).map_err(|e| bad(e.to_string()))?;
        if header.compression() != 0 {
            return Err(bad(format!(
                "compressed (codec {}): this client reads uncompressed batches",
                header.compression()
            )));
        }
        let base = u64::try_from(header.base_offset).map_err(|_| bad("negative offset".into()))?;
        next = next.max(base + header.offset_span());
        for found in batch_records(batch, &header, base, from) {
            let BatchRecord {
                offset,
                timestamp,
                record,
            } = found.map_err(|e| bad(e.to_string()))?;
            let headers = record
                .headers()
                .map(|h| {
                    h.map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into_owned(),
                            v.map(|v| set.slice_ref(v)),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            out.push(StreamRecord {
                stream: stream.clone(),
                partition,
                offset,
                timestamp,
                key: record.key.map(|k| set.slice_ref(k)),
                value: record.value.map(|v| set.slice_ref(v)),
                headers,
            });
        }
    }
    Ok((out, next))
}
