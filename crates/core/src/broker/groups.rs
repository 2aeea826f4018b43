//! Consumer groups: membership and assignment (`stream::group`, sans-IO), and committed
//! offsets, durable as records of one hidden log (`#offsets`): a commit appends the group's
//! new offset for a partition and settles the record it replaces, in one journal write, so
//! the log's unsettled records are exactly the latest commits (bounded by groups x
//! partitions) and its settled segments go at checkpoints. Recovery reads them back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;
use tidewater_storage::{
    AckLevel, BatchBuilder, LogReader, NewRecord, Op, OpResult, RecoveredLog, Store,
};

use super::Broker;
use crate::error::{BrokerError, ErrorCode};
use crate::plan::to_ranges;
use crate::stream::group::{Assignment, Group, GroupError, TopicPartition};
use crate::stream::records::decode_batch;

/// Streams one member may read.
pub const MAX_MEMBER_STREAMS: usize = 100;

/// The name of the log holding committed offsets (no queue or stream can have it).
pub(crate) const OFFSETS_LOG: &str = "#offsets";

/// Which protocol a group's members use: Kafka's classic one (the clients assign), or
/// tidewater's server-side assignment (its own consumers and Kafka's consumer protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Classic,
    Consumer,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    /// The next offset to consume.
    pub offset: u64,
    #[serde(default)]
    pub metadata: String,
    pub committed_at_ms: i64,
}

/// A committed offset's place: (group, stream, partition).
type OffsetKey = (String, String, u32);

/// The committed-offsets log and what its unsettled records say.
pub(crate) struct Offsets {
    log: Option<(u64, LogReader)>,
    /// (group, stream, partition) -> (the record's offset in the log, what it says).
    latest: BTreeMap<OffsetKey, (u64, Committed)>,
}

/// Groups and their committed offsets.
pub(crate) struct Groups {
    groups: Mutex<HashMap<String, Group>>,
    /// Held across a commit's write: one commit at a time.
    offsets: tokio::sync::Mutex<Offsets>,
    /// What the committed offsets are now, for readers that must not wait for a commit in
    /// flight (metrics, describe): updated when a commit lands.
    view: Mutex<BTreeMap<OffsetKey, Committed>>,
    /// Per group, the last time maintenance saw it with members (or, for the groups found
    /// at open, the open): the expiry of committed offsets counts from this or from the
    /// newest commit, whichever is later, so a group whose members stop after a quiet week
    /// keeps its offsets, and a restart expires nothing early.
    seen: Mutex<HashMap<String, i64>>,
    /// The kind of each group last seen with members (Kafka tools tell a classic group from a
    /// consumer-protocol one even when it is empty); kept while the group has offsets. In
    /// memory: after a restart an empty group is shown as classic, as Kafka shows a group
    /// of offsets alone.
    kinds: Mutex<HashMap<String, GroupKind>>,
    /// When maintenance looks for expired offsets next (ms, the broker's clock).
    next_expiry_scan_ms: AtomicI64,
}

impl Groups {
    /// From the offsets log found at open (if any): its unsettled records.
    pub(crate) fn recover(
        store: &Store,
        log: Option<RecoveredLog>,
        now_ms: i64,
    ) -> Result<Groups, String> {
        let mut offsets = Offsets {
            log: None,
            latest: BTreeMap::new(),
        };
        if let Some(log) = log {
            let reader = store.reader(log.uid).expect("a recovered log has a reader");
            let mut from = log.ack_floor;
            while from < log.next_offset {
                let records = reader
                    .read(from, 10_000, 16 << 20)
                    .map_err(|e| format!("the offsets log: {e}"))?;
                let Some(last) = records.last().map(|r| r.offset) else {
                    break;
                };
                for record in records {
                    if log.settled.contains(record.offset) {
                        continue;
                    }
                    let key = parse_key(&record.id).ok_or_else(|| {
                        format!("the offsets log: a record at {} has no key", record.offset)
                    })?;
                    let committed: Committed = serde_json::from_slice(&record.body)
                        .map_err(|e| format!("the offsets log: record {}: {e}", record.offset))?;
                    offsets.latest.insert(key, (record.offset, committed));
                }
                from = last + 1;
            }
            offsets.log = Some((log.uid, reader));
        }
        let view = offsets
            .latest
            .iter()
            .map(|(k, (_, c))| (k.clone(), c.clone()))
            .collect();
        let seen = offsets
            .latest
            .keys()
            .map(|(group, _, _)| (group.clone(), now_ms))
            .collect();
        Ok(Groups {
            groups: Mutex::new(HashMap::new()),
            offsets: tokio::sync::Mutex::new(offsets),
            view: Mutex::new(view),
            kinds: Mutex::new(HashMap::new()),
            seen: Mutex::new(seen),
            next_expiry_scan_ms: AtomicI64::new(i64::MIN),
        })
    }
}

fn record_key(group: &str, stream: &str, partition: u32) -> Vec<u8> {
    format!("{group}\0{stream}\0{partition}").into_bytes()
}

fn parse_key(id: &[u8]) -> Option<OffsetKey> {
    let text = std::str::from_utf8(id).ok()?;
    let mut parts = text.split('\0');
    let (group, stream, partition) = (parts.next()?, parts.next()?, parts.next()?);
    Some((
        group.to_string(),
        stream.to_string(),
        partition.parse().ok()?,
    ))
}

/// A group as shown: members and what they hold, and each committed partition's lag.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub generation: u64,
    pub members: Vec<MemberInfo>,
    pub offsets: Vec<PartitionLag>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberInfo {
    pub member: String,
    pub assigned: Vec<TopicPartitionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicPartitionInfo {
    pub stream: String,
    pub partition: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLag {
    pub stream: String,
    pub partition: u32,
    pub committed: u64,
    pub metadata: String,
    pub end_offset: u64,
    /// Records not yet consumed: end minus committed.
    pub lag: u64,
    /// Age of the oldest record not yet consumed (0 when none).
    pub lag_ms: u64,
}

fn group_error(group: &str, err: GroupError) -> BrokerError {
    BrokerError::new(ErrorCode::UnknownMember, format!("group '{group}': {err}"))
}

/// Group names follow the rules of stream names.
pub(super) fn check_group_name(group: &str) -> Result<(), BrokerError> {
    crate::stream::config::validate_stream_name(group).map_err(|_| {
        BrokerError::new(
            ErrorCode::InvalidRequest,
            format!(
                "invalid group name '{}': the rules of stream names apply",
                group.chars().take(40).collect::<String>()
            ),
        )
    })
}

/// Where `reset_offsets` moves a group's committed offsets (kafka-consumer-groups'
/// `--to-earliest`, `--to-latest`, `--to-datetime`, `--shift-by`, `--to-offset`). Every
/// target is kept within the partition's range, from its start to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The partition's start.
    Earliest,
    /// The partition's end: the group skips everything there is now.
    Latest,
    /// The first offset whose record's timestamp is at least this time (ms since the
    /// epoch), or the end when every record is older.
    Datetime(i64),
    /// The committed offset moved by this many (the partition's start when nothing is
    /// committed: where a member starts by default).
    ShiftBy(i64),
    /// This offset.
    Offset(u64),
}

/// One partition of a reset: its committed offset before (`None`: nothing committed) and
/// after.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OffsetReset {
    pub stream: String,
    pub partition: u32,
    pub from: Option<u64>,
    pub to: u64,
}

impl Broker {
    fn partition_counts(&self) -> impl Fn(&str) -> Option<u32> + '_ {
        move |stream: &str| {
            self.inner
                .streams
                .read()
                .get(stream)
                .map(|s| s.partition_handles_now().len() as u32)
        }
    }

    /// Joins `group` for `streams` (and with `instance`, takes that static member's place
    /// back). Returns the member id.
    pub fn join_group(
        &self,
        group: &str,
        instance: Option<&str>,
        streams: &[String],
        session_timeout_ms: u64,
    ) -> Result<String, BrokerError> {
        self.join_group_as(group, None, instance, streams, session_timeout_ms)
    }

    /// As `join_group`, under a member id the client chose (Kafka's consumer protocol,
    /// KIP-848: a random id of its own, 1 to 64 characters of A-Z a-z 0-9 _ - + / = .), for
    /// streams that need not exist yet. A member already there under that id joins again:
    /// it is replaced.
    pub fn join_group_as(
        &self,
        group: &str,
        member_id: Option<&str>,
        instance: Option<&str>,
        streams: &[String],
        session_timeout_ms: u64,
    ) -> Result<String, BrokerError> {
        check_group_name(group)?;
        if let Some(id) = member_id
            && (id.is_empty()
                || id.len() > 64
                || !id.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'_' | b'-' | b'+' | b'/' | b'=' | b'.')
                }))
        {
            return Err(BrokerError::invalid(
                "a member id is 1 to 64 characters of A-Z a-z 0-9 _ - + / = .",
            ));
        }
        let limits = &self.inner.limits;
        if !(1_000..=limits.max_session_timeout_ms).contains(&session_timeout_ms) {
            return Err(BrokerError::invalid(format!(
                "session_timeout_ms must be 1000..={} (max_session_timeout_ms)",
                limits.max_session_timeout_ms
            )));
        }
        if let Some(instance) = instance {
            crate::stream::config::validate_stream_name(instance).map_err(|_| {
                BrokerError::invalid(format!(
                    "invalid instance name '{}': 1 to 200 characters of A-Z a-z 0-9 . _ -",
                    instance.chars().take(40).collect::<String>()
                ))
            })?;
        }
        if streams.is_empty() || streams.len() > MAX_MEMBER_STREAMS {
            return Err(BrokerError::invalid(format!(
                "a member joins for 1 to {MAX_MEMBER_STREAMS} streams"
            )));
        }
        // A Kafka consumer (client-chosen id) may subscribe to topics not made yet, as in
        // Kafka: they have no partitions until they exist (maintenance assigns them then).
        if member_id.is_none() {
            for stream in streams {
                self.get_stream(stream)?;
            }
        }
        if self.classic_has_members(group) {
            return Err(BrokerError::invalid(format!(
                "group '{group}' is a Kafka consumer group with members (classic protocol, assigned by its clients): use another group name"
            )));
        }
        let counts = self.partition_counts();
        let mut groups = self.inner.groups.groups.lock();
        if !groups.contains_key(group) && groups.len() >= limits.max_groups {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the broker holds its maximum of {} groups (max_groups)",
                    limits.max_groups
                ),
            ));
        }
        let g = groups.entry(group.to_string()).or_default();
        // A static member coming back takes its own place: it needs no new one.
        let known = instance.is_some_and(|i| g.has_instance(i));
        if !known && g.member_ids().count() >= limits.max_group_members {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "group '{group}' has its maximum of {} members (max_group_members)",
                    limits.max_group_members
                ),
            ));
        }
        // Member ids are never reused: a client holding an old id (its session expired, the
        // server restarted) cannot act for a new member. A client's own id (KIP-848) is a
        // random one it made.
        let id = match member_id {
            Some(id) => {
                if g.member_ids().any(|m| m == id) {
                    g.leave(id, &counts);
                }
                id.to_string()
            }
            None => format!(
                "{}-{:016x}",
                instance.unwrap_or("member"),
                self.inner.nonces.nonce()
            ),
        };
        let before = g.generation();
        let member = g.join(
            id,
            instance,
            streams,
            session_timeout_ms,
            self.now_ms(),
            &counts,
        );
        if g.generation() != before {
            self.inner.groups_changed.notify_waiters();
        }
        drop(groups);
        self.set_group_kind(group, GroupKind::Consumer);
        Ok(member)
    }

    /// A member's heartbeat with what it consumes now: what it may consume and what it
    /// must give up.
    pub fn heartbeat(
        &self,
        group: &str,
        member: &str,
        owned: &BTreeSet<TopicPartition>,
    ) -> Result<Assignment, BrokerError> {
        let mut groups = self.inner.groups.groups.lock();
        let g = groups.get_mut(group).ok_or_else(|| {
            BrokerError::new(
                ErrorCode::GroupNotFound,
                format!("group '{group}' has no members"),
            )
        })?;
        g.heartbeat(member, owned, self.now_ms())
            .map_err(|e| group_error(group, e))
    }

    /// Keeps a member alive until `until_ms` (its long poll is waiting).
    pub(super) fn touch_member(&self, group: &str, member: &str, until_ms: i64) {
        if let Some(g) = self.inner.groups.groups.lock().get_mut(group) {
            g.touch(member, until_ms);
        }
    }

    /// Forgets the committed offsets of a deleted stream (their records are settled).
    pub(super) async fn forget_offsets(&self, stream: &str) -> Result<(), BrokerError> {
        self.forget(|latest| {
            latest
                .keys()
                .filter(|(_, s, _)| s == stream)
                .cloned()
                .collect()
        })
        .await
        .map(|_| ())
    }

    /// Deletes a group's committed offsets of some partitions (Kafka's OffsetDelete):
    /// refused while the group has members. Returns how many there were.
    pub async fn delete_offsets(
        &self,
        group: &str,
        partitions: &[(String, u32)],
    ) -> Result<usize, BrokerError> {
        check_group_name(group)?;
        self.require_no_members(group, "its offsets can be deleted")?;
        let wanted: BTreeSet<OffsetKey> = partitions
            .iter()
            .map(|(s, p)| (group.to_string(), s.clone(), *p))
            .collect();
        self.forget(|latest| {
            wanted
                .iter()
                .filter(|k| latest.contains_key(*k))
                .cloned()
                .collect()
        })
        .await
    }

    /// Forgets the committed offsets `choose` picks (it sees the latest commits, with
    /// commits held off meanwhile): their records are settled in one journal write, all or
    /// none. Returns how many were forgotten.
    async fn forget(
        &self,
        choose: impl FnOnce(&BTreeMap<OffsetKey, (u64, Committed)>) -> Vec<OffsetKey>,
    ) -> Result<usize, BrokerError> {
        let mut offsets = self.inner.groups.offsets.lock().await;
        let Some((uid, _)) = &offsets.log else {
            return Ok(0);
        };
        let uid = *uid;
        let gone = choose(&offsets.latest);
        let records: Vec<u64> = gone
            .iter()
            .filter_map(|k| offsets.latest.get(k).map(|(at, _)| *at))
            .collect();
        if records.is_empty() {
            return Ok(0);
        }
        self.write(
            vec![Op::Settle {
                uid,
                ranges: to_ranges(&records),
            }],
            AckLevel::Durable,
        )
        .await?;
        let mut view = self.inner.groups.view.lock();
        for key in &gone {
            view.remove(key);
            offsets.latest.remove(key);
        }
        Ok(records.len())
    }

    /// Refuses (`group_not_empty`) while the group has members.
    fn require_no_members(&self, group: &str, doing: &str) -> Result<(), BrokerError> {
        let members = self
            .inner
            .groups
            .groups
            .lock()
            .get(group)
            .map_or(0, |g| g.member_ids().count())
            + self
                .classic_describe(group)
                .map_or(0, |info| info.members.len());
        if members > 0 {
            return Err(BrokerError::new(
                ErrorCode::GroupNotEmpty,
                format!(
                    "group '{group}' has {members} member{}: {doing} only while it has none. Stop its consumers first (one that stops cleanly leaves at once; one that does not is removed when its session times out)",
                    if members == 1 { "" } else { "s" }
                ),
            ));
        }
        Ok(())
    }

    /// Moves a group's committed offsets, as kafka-consumer-groups --reset-offsets does:
    /// for every partition of `streams` (each must exist), or of every stream the group has
    /// committed offsets for when `None`, to where `to` says within the partition's range.
    /// Refused while the group has members (`group_not_empty`). Unless `dry_run`, commits
    /// the new offsets in one journal write (all or none). Returns the plan, by stream and
    /// partition.
    pub async fn reset_offsets(
        &self,
        group: &str,
        streams: Option<&[String]>,
        to: ResetTo,
        dry_run: bool,
    ) -> Result<Vec<OffsetReset>, BrokerError> {
        check_group_name(group)?;
        self.require_no_members(group, "its offsets can be reset")?;
        let committed: BTreeMap<(String, u32), u64> = self
            .inner
            .groups
            .view
            .lock()
            .range((group.to_string(), String::new(), 0)..)
            .take_while(|((g, _, _), _)| g == group)
            .map(|((_, s, p), c)| ((s.clone(), *p), c.offset))
            .collect();
        let names: BTreeSet<String> = match streams {
            Some([]) => {
                return Err(BrokerError::invalid(
                    "name at least one stream to reset, or none for every stream the group has committed offsets for",
                ));
            }
            Some(list) => list.iter().cloned().collect(),
            None if committed.is_empty() => {
                return Err(BrokerError::new(
                    ErrorCode::GroupNotFound,
                    format!("group '{group}' has no committed offsets: name the streams to reset"),
                ));
            }
            None => committed.keys().map(|(s, _)| s.clone()).collect(),
        };
        let mut plan = Vec::new();
        for name in &names {
            let info = match self.get_stream(name) {
                Ok(info) => info,
                // A stream deleted since its commits were listed: nothing to reset.
                Err(_) if streams.is_none() => continue,
                Err(err) => return Err(err),
            };
            for part in &info.partitions {
                let from = committed.get(&(name.clone(), part.partition)).copied();
                let (start, end) = (part.start_offset, part.end_offset.max(part.start_offset));
                let target = match to {
                    ResetTo::Earliest => start,
                    ResetTo::Latest => end,
                    ResetTo::Datetime(ms) => self
                        .offset_for_time(name, part.partition, ms)?
                        .unwrap_or(end),
                    ResetTo::ShiftBy(by) => from.unwrap_or(start).saturating_add_signed(by),
                    ResetTo::Offset(offset) => offset,
                };
                plan.push(OffsetReset {
                    stream: name.clone(),
                    partition: part.partition,
                    from,
                    to: target.clamp(start, end),
                });
            }
        }
        if !dry_run {
            let limits = &self.inner.limits;
            if committed.is_empty() && self.list_groups().await.len() >= limits.max_groups {
                return Err(BrokerError::invalid(format!(
                    "the broker holds its maximum of {} groups (max_groups)",
                    limits.max_groups
                )));
            }
            let commits: Vec<(String, u32, u64, String)> = plan
                .iter()
                .map(|r| (r.stream.clone(), r.partition, r.to, String::new()))
                .collect();
            self.commit_many(group, &commits).await?;
            // A member that joined meanwhile may have taken a partition at the old offset.
            if let Err(err) = self.require_no_members(group, "its offsets can be reset") {
                tracing::warn!(group = %group, error = %err, "a member joined during an offset reset");
            }
        }
        Ok(plan)
    }

    /// Deletes a group: its committed offsets are settled in one journal write. Refused
    /// while it has members (`group_not_empty`); `group_not_found` when it has neither
    /// members nor committed offsets.
    pub async fn delete_group(&self, group: &str) -> Result<(), BrokerError> {
        check_group_name(group)?;
        self.require_no_members(group, "it can be deleted")?;
        let forgotten = self
            .forget(|latest| {
                latest
                    .range((group.to_string(), String::new(), 0)..)
                    .take_while(|((g, _, _), _)| g == group)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .await?;
        if forgotten == 0 {
            return Err(BrokerError::new(
                ErrorCode::GroupNotFound,
                format!("group '{group}' has no members and no committed offsets"),
            ));
        }
        // Its entry (members gone, not yet swept by maintenance) goes too.
        let mut groups = self.inner.groups.groups.lock();
        if groups.get(group).is_some_and(Group::is_empty) {
            groups.remove(group);
        }
        self.inner.groups.seen.lock().remove(group);
        self.inner.groups.kinds.lock().remove(group);
        Ok(())
    }

    /// Removes the committed offsets of groups without members once their newest commit,
    /// and the last time they had a member, are both `group_offsets_retention_ms` old
    /// (maintenance; looks at most once a minute).
    pub(super) async fn expire_group_offsets(&self) {
        let retention = self.inner.limits.group_offsets_retention_ms;
        let now = self.now_ms();
        let groups = &self.inner.groups;
        if retention == 0 || now < groups.next_expiry_scan_ms.load(Ordering::Relaxed) {
            return;
        }
        let every = i64::try_from(retention / 10)
            .unwrap_or(i64::MAX)
            .clamp(1, 60_000);
        groups
            .next_expiry_scan_ms
            .store(now.saturating_add(every), Ordering::Relaxed);
        let cutoff = now.saturating_sub(i64::try_from(retention).unwrap_or(i64::MAX));
        // Per group without members, the time its offsets' retention counts from (before
        // its commits are looked at).
        let since: HashMap<String, i64> = {
            let live = groups.groups.lock();
            let mut seen = groups.seen.lock();
            let view = groups.view.lock();
            let with_offsets: BTreeSet<&str> = view.keys().map(|(g, _, _)| g.as_str()).collect();
            seen.retain(|g, _| live.contains_key(g) || with_offsets.contains(g.as_str()));
            let classic: BTreeSet<String> = self.inner.classic.names().into_iter().collect();
            groups.kinds.lock().retain(|g, _| {
                live.contains_key(g) || with_offsets.contains(g.as_str()) || classic.contains(g)
            });
            with_offsets
                .into_iter()
                .filter(|g| live.get(*g).is_none_or(Group::is_empty))
                .map(|g| (g.to_string(), seen.get(g).copied().unwrap_or(i64::MIN)))
                .filter(|(_, at)| *at <= cutoff)
                .collect()
        };
        if since.is_empty() {
            return;
        }
        let result = self
            .forget(|latest| {
                // Decided under the commit lock: a commit that landed since counts.
                let mut newest: HashMap<&str, i64> = HashMap::new();
                for ((group, _, _), (_, c)) in latest {
                    if let Some(at) = since.get(group) {
                        let n = newest.entry(group.as_str()).or_insert(*at);
                        *n = (*n).max(c.committed_at_ms);
                    }
                }
                latest
                    .keys()
                    .filter(|(g, _, _)| newest.get(g.as_str()).is_some_and(|at| *at <= cutoff))
                    .cloned()
                    .collect()
            })
            .await;
        match result {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(
                    offsets = n,
                    retention_ms = retention,
                    "expired the committed offsets of groups without members"
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not expire committed offsets; will retry");
            }
        }
    }

    pub fn leave_group(&self, group: &str, member: &str) -> Result<(), BrokerError> {
        let counts = self.partition_counts();
        let mut groups = self.inner.groups.groups.lock();
        let g = groups.get_mut(group).ok_or_else(|| {
            BrokerError::new(
                ErrorCode::GroupNotFound,
                format!("group '{group}' has no members"),
            )
        })?;
        if !g.leave(member, &counts) {
            return Err(group_error(
                group,
                GroupError::UnknownMember(member.to_string()),
            ));
        }
        self.inner.groups_changed.notify_waiters();
        Ok(())
    }

    /// Assigns every group's partitions again after a stream grew or went away.
    pub(super) fn reassign_groups(&self) {
        let counts = self.partition_counts();
        let mut groups = self.inner.groups.groups.lock();
        let mut changed = false;
        for g in groups.values_mut() {
            let before = g.generation();
            g.streams_changed(&counts);
            changed |= g.generation() != before;
        }
        drop(groups);
        if changed {
            self.inner.groups_changed.notify_waiters();
        }
    }

    /// Changes the streams a member reads (Kafka's consumer protocol: a new subscription),
    /// keeping what it owns while the rebalance moves partitions cooperatively.
    pub fn resubscribe(
        &self,
        group: &str,
        member: &str,
        streams: &[String],
    ) -> Result<(), BrokerError> {
        if streams.is_empty() || streams.len() > MAX_MEMBER_STREAMS {
            return Err(BrokerError::invalid(format!(
                "a member joins for 1 to {MAX_MEMBER_STREAMS} streams"
            )));
        }
        let counts = self.partition_counts();
        let mut groups = self.inner.groups.groups.lock();
        let g = groups
            .get_mut(group)
            .ok_or_else(|| group_error(group, GroupError::UnknownMember(member.to_string())))?;
        let before = g.generation();
        if !g.resubscribe(member, streams, &counts) {
            return Err(group_error(
                group,
                GroupError::UnknownMember(member.to_string()),
            ));
        }
        if g.generation() != before {
            self.inner.groups_changed.notify_waiters();
        }
        Ok(())
    }

    /// Which kind of group a name is: by its members, else by the last ones it had (while it
    /// keeps offsets).
    pub fn group_kind(&self, group: &str) -> Option<GroupKind> {
        if self.classic_has_members(group) {
            return Some(GroupKind::Classic);
        }
        if self.group_has_members(group) {
            return Some(GroupKind::Consumer);
        }
        self.inner.groups.kinds.lock().get(group).copied()
    }

    pub(super) fn set_group_kind(&self, group: &str, kind: GroupKind) {
        let mut kinds = self.inner.groups.kinds.lock();
        if kinds.len() < 4 * self.inner.limits.max_groups || kinds.contains_key(group) {
            kinds.insert(group.to_string(), kind);
        }
    }

    /// Whether `member` is a member of tidewater group `group`.
    pub fn group_has_member(&self, group: &str, member: &str) -> bool {
        self.inner
            .groups
            .groups
            .lock()
            .get(group)
            .is_some_and(|g| g.member_ids().any(|m| m == member))
    }

    /// Whether a tidewater group of that name has members.
    pub(super) fn group_has_members(&self, group: &str) -> bool {
        self.inner
            .groups
            .groups
            .lock()
            .get(group)
            .is_some_and(|g| !g.is_empty())
    }

    /// Removes members whose session expired, and reassigns after streams changed
    /// (maintenance).
    pub(super) fn maintain_groups(&self) {
        let counts = self.partition_counts();
        let now = self.now_ms();
        let mut groups = self.inner.groups.groups.lock();
        let mut changed = false;
        for (name, g) in groups.iter_mut() {
            let before = g.generation();
            for member in g.expire(now, &counts) {
                tracing::info!(group = %name, member = %member, "session expired: member removed");
            }
            g.streams_changed(&counts);
            changed |= g.generation() != before;
        }
        if changed {
            self.inner.groups_changed.notify_waiters();
        }
        groups.retain(|_, g| !g.is_empty());
        // Offsets of a group with members never expire; their retention counts from now.
        let mut seen = self.inner.groups.seen.lock();
        for name in groups.keys() {
            seen.insert(name.clone(), now);
        }
        drop(seen);
        // Consumer instances whose member is gone go too.
        self.inner.consumers.lock().retain(|(group, member), _| {
            groups
                .get(group)
                .is_some_and(|g| g.member_ids().any(|m| m == member))
        });
    }

    /// Commits the offset to consume next in a partition for `group`, durably: one journal
    /// write appends it and settles the commit it replaces.
    pub async fn commit(
        &self,
        group: &str,
        stream: &str,
        partition: u32,
        offset: u64,
        metadata: &str,
    ) -> Result<(), BrokerError> {
        self.commit_many(
            group,
            &[(stream.to_string(), partition, offset, metadata.to_string())],
        )
        .await
    }

    /// Commits for a member of the group: only the partitions it owns now (a member whose
    /// session expired, or whose partition moved on, cannot overwrite its new owner's
    /// progress). Without a member (a consumer that assigns itself partitions), only while
    /// the group has no members, as Kafka does. All or none, as `commit_many`.
    pub async fn commit_as_member(
        &self,
        group: &str,
        member: Option<&str>,
        commits: &[(String, u32, u64, String)],
    ) -> Result<(), BrokerError> {
        {
            let groups = self.inner.groups.groups.lock();
            let g = groups.get(group).filter(|g| !g.is_empty());
            match (member, g) {
                (None, None) if self.classic_has_members(group) => {
                    return Err(BrokerError::new(
                        ErrorCode::UnknownMember,
                        format!(
                            "group '{group}' is a Kafka consumer group with members: only they commit its offsets"
                        ),
                    ));
                }
                (None, None) => {}
                (None, Some(g)) => {
                    return Err(BrokerError::new(
                        ErrorCode::UnknownMember,
                        format!(
                            "group '{group}' has {} members: only they commit its offsets (join it, or use another group)",
                            g.member_ids().count()
                        ),
                    ));
                }
                (Some(member), None) => {
                    return Err(group_error(
                        group,
                        GroupError::UnknownMember(member.to_string()),
                    ));
                }
                (Some(member), Some(g)) => {
                    for (stream, partition, _, _) in commits {
                        let tp = (stream.clone(), *partition);
                        if !g.owns(member, &tp).map_err(|e| group_error(group, e))? {
                            return Err(BrokerError::new(
                                ErrorCode::UnknownMember,
                                format!(
                                    "group '{group}': member '{member}' does not own partition {partition} of stream '{stream}' (it was reassigned): heartbeat for the current assignment"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        self.commit_many(group, commits).await
    }

    /// Commits several partitions' offsets for `group` in one journal write (appends the
    /// new commits, settles the ones they replace): all or none. Each must name a stream
    /// and partition that exist and an offset within it; a partition given twice takes
    /// the last.
    pub async fn commit_many(
        &self,
        group: &str,
        commits: &[(String, u32, u64, String)],
    ) -> Result<(), BrokerError> {
        // The name goes into the offsets record's key: it must be one a join would take.
        check_group_name(group)?;
        let mut wanted: BTreeMap<(String, String, u32), (u64, String)> = BTreeMap::new();
        let mut streams: HashMap<String, crate::broker::StreamInfo> = HashMap::new();
        for (stream, partition, offset, metadata) in commits {
            if metadata.len() > 4096 {
                return Err(BrokerError::invalid(
                    "commit metadata is at most 4096 bytes",
                ));
            }
            let id_len = record_key(group, stream, *partition).len();
            if id_len > tidewater_storage::format::MAX_ID_LEN {
                return Err(BrokerError::invalid(format!(
                    "group '{group}' and stream '{stream}' have names too long together to commit an offset: {id_len} bytes with the partition number, at most {}",
                    tidewater_storage::format::MAX_ID_LEN
                )));
            }
            // Each stream looked up once, however many of its partitions are committed.
            if !streams.contains_key(stream) {
                streams.insert(stream.clone(), self.get_stream(stream)?);
            }
            let info = &streams[stream];
            let Some(part) = info.partitions.get(*partition as usize) else {
                return Err(BrokerError::new(
                    ErrorCode::PartitionNotFound,
                    format!("stream '{stream}' has no partition {partition}"),
                ));
            };
            if *offset > part.end_offset {
                return Err(BrokerError::new(
                    ErrorCode::OffsetOutOfRange,
                    format!(
                        "offset {offset} is past the end of partition {partition} of stream '{stream}' (its records are at 0..{})",
                        part.end_offset
                    ),
                ));
            }
            wanted.insert(
                (group.to_string(), stream.clone(), *partition),
                (*offset, metadata.clone()),
            );
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // One commit at a time: each replaces the records the one before wrote.
        let mut offsets = self.inner.groups.offsets.lock().await;
        // A commit can make a group (one with neither members nor offsets yet): within
        // max_groups, as a join is (checked under the commit lock, so two cannot race).
        self.check_new_group(group)?;
        let uid = match &offsets.log {
            Some((uid, _)) => *uid,
            None => {
                let (uid, reader) = self.create_internal_log(OFFSETS_LOG).await?;
                offsets.log = Some((uid, reader));
                uid
            }
        };
        let now = self.now_ms();
        let mut builder = BatchBuilder::new(uid, now);
        let mut replaced = Vec::new();
        let mut committed = Vec::with_capacity(wanted.len());
        for (key, (offset, metadata)) in wanted {
            let c = Committed {
                offset,
                metadata,
                committed_at_ms: now,
            };
            let id = record_key(&key.0, &key.1, key.2);
            let body = serde_json::to_vec(&c).expect("a commit serializes");
            builder.push(&NewRecord {
                id: &id,
                body: &body,
                ..NewRecord::default()
            });
            if let Some((previous, _)) = offsets.latest.get(&key) {
                replaced.push(*previous);
            }
            committed.push((key, c));
        }
        let mut ops = vec![Op::Append {
            uid,
            batch: builder.finish(),
        }];
        if !replaced.is_empty() {
            ops.push(Op::Settle {
                uid,
                ranges: to_ranges(&replaced),
            });
        }
        let results = self.write(ops, AckLevel::Durable).await?;
        let Some(&OpResult::Appended { base_offset, .. }) = results.first() else {
            return Err(BrokerError::new(
                ErrorCode::Internal,
                "storage did not answer the commit's offset",
            ));
        };
        let mut view = self.inner.groups.view.lock();
        for (i, (key, c)) in committed.into_iter().enumerate() {
            view.insert(key.clone(), c.clone());
            offsets.latest.insert(key, (base_offset + i as u64, c));
        }
        Ok(())
    }

    /// A group: members with what they are assigned, and each committed partition's lag.
    pub async fn describe_group(&self, group: &str) -> Result<GroupInfo, BrokerError> {
        let (generation, members) = {
            let groups = self.inner.groups.groups.lock();
            match groups.get(group) {
                Some(g) => {
                    let mut members: BTreeMap<String, Vec<TopicPartitionInfo>> = g
                        .member_ids()
                        .map(|m| (m.to_string(), Vec::new()))
                        .collect();
                    for ((stream, partition), owner) in g.target() {
                        if let Some(list) = members.get_mut(owner) {
                            list.push(TopicPartitionInfo {
                                stream: stream.clone(),
                                partition: *partition,
                            });
                        }
                    }
                    (g.generation(), members)
                }
                None => match self.classic_assigned(group) {
                    // A Kafka classic group: what its leader assigned each member.
                    Some((generation, members)) => (
                        generation,
                        members
                            .into_iter()
                            .map(|(member, assigned)| {
                                let assigned = assigned
                                    .into_iter()
                                    .map(|(stream, partition)| TopicPartitionInfo {
                                        stream,
                                        partition,
                                    })
                                    .collect();
                                (member, assigned)
                            })
                            .collect(),
                    ),
                    None => (0, BTreeMap::new()),
                },
            }
        };
        let committed: Vec<((String, String, u32), Committed)> = self
            .inner
            .groups
            .view
            .lock()
            .range((group.to_string(), String::new(), 0)..)
            .take_while(|((g, _, _), _)| g == group)
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        if members.is_empty() && committed.is_empty() {
            return Err(BrokerError::new(
                ErrorCode::GroupNotFound,
                format!("group '{group}' has no members and no committed offsets"),
            ));
        }
        let now = self.now_ms();
        let mut lags = Vec::new();
        for ((_, stream, partition), c) in committed {
            let Ok(info) = self.get_stream(&stream) else {
                continue;
            };
            let Some(part) = info.partitions.iter().find(|p| p.partition == partition) else {
                continue;
            };
            let lag = part.end_offset.saturating_sub(c.offset);
            let lag_ms = if lag == 0 {
                0
            } else {
                self.record_time(&stream, partition, c.offset)
                    .map_or(0, |t| now.saturating_sub(t).max(0) as u64)
            };
            lags.push(PartitionLag {
                stream,
                partition,
                committed: c.offset,
                metadata: c.metadata,
                end_offset: part.end_offset,
                lag,
                lag_ms,
            });
        }
        Ok(GroupInfo {
            name: group.to_string(),
            generation,
            members: members
                .into_iter()
                .map(|(member, assigned)| MemberInfo { member, assigned })
                .collect(),
            offsets: lags,
        })
    }

    /// The committed offset of a partition for a group, if any.
    pub async fn committed(&self, group: &str, stream: &str, partition: u32) -> Option<Committed> {
        self.inner
            .groups
            .view
            .lock()
            .get(&(group.to_string(), stream.to_string(), partition))
            .cloned()
    }

    /// The timestamp of the record at `offset` (or the first after it).
    fn record_time(&self, stream: &str, partition: u32, offset: u64) -> Option<i64> {
        let handle = self.inner.streams.read().get(stream).cloned()?;
        let part = handle
            .partition_handles_now()
            .get(partition as usize)
            .cloned()?;
        let batches = part.reader().read_batches(offset, 1).ok()?;
        let batch = batches.first()?;
        decode_batch(batch, offset)
            .ok()?
            .first()
            .map(|r| r.timestamp)
    }

    /// Refuses to make one more group past `max_groups`.
    fn check_new_group(&self, group: &str) -> Result<(), BrokerError> {
        let max = self.inner.limits.max_groups;
        let mut names: BTreeSet<String> = self.inner.groups.groups.lock().keys().cloned().collect();
        if names.contains(group) {
            return Ok(());
        }
        {
            let view = self.inner.groups.view.lock();
            if view
                .range((group.to_string(), String::new(), 0)..)
                .next()
                .is_some_and(|((g, _, _), _)| g == group)
            {
                return Ok(());
            }
            names.extend(view.keys().map(|(g, _, _)| g.clone()));
        }
        if names.len() >= max {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the broker holds its maximum of {max} groups (max_groups): delete one, or raise the limit"
                ),
            ));
        }
        Ok(())
    }

    /// The names of groups with members or committed offsets.
    pub async fn list_groups(&self) -> Vec<String> {
        self.group_names()
    }

    /// `list_groups`, for callers outside a runtime.
    pub fn group_names(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = self.inner.groups.groups.lock().keys().cloned().collect();
        names.extend(self.inner.classic.names());
        names.extend(
            self.inner
                .groups
                .view
                .lock()
                .keys()
                .map(|(g, _, _)| g.clone()),
        );
        names.into_iter().collect()
    }

    /// Per group and stream (for metrics): its members, the records not consumed yet over
    /// its committed partitions, and the age of the oldest of them (found among the
    /// `LAG_AGE_PARTITIONS` partitions with the most records not consumed, so a scrape
    /// reads a bounded number of batches).
    pub fn group_lags(&self) -> Vec<GroupLag> {
        let members: HashMap<String, u64> = self
            .inner
            .groups
            .groups
            .lock()
            .iter()
            .map(|(name, g)| (name.clone(), g.member_ids().count() as u64))
            .collect();
        let committed: Vec<((String, String, u32), u64)> = self
            .inner
            .groups
            .view
            .lock()
            .iter()
            .map(|(k, c)| (k.clone(), c.offset))
            .collect();
        let ends: HashMap<String, Vec<u64>> = self
            .list_streams()
            .into_iter()
            .map(|s| (s.name, s.partitions.iter().map(|p| p.end_offset).collect()))
            .collect();
        // (group, stream) -> (records behind, partition, committed offset, end) per partition.
        type Behind = Vec<(u64, u32, u64, u64)>;
        let mut by: BTreeMap<(String, String), Behind> = BTreeMap::new();
        for ((group, stream, partition), offset) in committed {
            let Some(end) = ends.get(&stream).and_then(|e| e.get(partition as usize)) else {
                continue;
            };
            by.entry((group, stream)).or_default().push((
                end.saturating_sub(offset),
                partition,
                offset,
                *end,
            ));
        }
        let now = self.now_ms();
        by.into_iter()
            .map(|((group, stream), mut parts)| {
                let lag = parts.iter().map(|(l, _, _, _)| l).sum();
                let ends = parts.iter().map(|(_, _, _, end)| end).sum();
                parts.sort_by_key(|part| std::cmp::Reverse(part.0));
                let lag_ms = parts
                    .iter()
                    .take(LAG_AGE_PARTITIONS)
                    .filter(|(l, _, _, _)| *l > 0)
                    .filter_map(|(_, p, offset, _)| self.record_time(&stream, *p, *offset))
                    .map(|t| now.saturating_sub(t).max(0) as u64)
                    .max()
                    .unwrap_or(0);
                GroupLag {
                    members: members.get(&group).copied().unwrap_or(0),
                    group,
                    stream,
                    lag,
                    lag_ms,
                    ends,
                }
            })
            .collect()
    }
}

/// Partitions per group and stream whose oldest record's age a metrics scrape reads.
pub const LAG_AGE_PARTITIONS: usize = 32;

/// A group's lag on one stream (metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    pub group: String,
    pub stream: String,
    pub members: u64,
    pub lag: u64,
    pub lag_ms: u64,
    /// The sum of the committed partitions' ends (what arrived, for the forecast).
    pub ends: u64,
}
