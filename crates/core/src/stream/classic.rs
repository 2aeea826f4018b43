//! Kafka's classic consumer group protocol (JoinGroup, SyncGroup, Heartbeat, LeaveGroup),
//! without I/O: time is passed in, and each call returns, beside its own answer, the
//! answers it completes for requests parked earlier (a JoinGroup waits until every member
//! has joined again; a follower's SyncGroup waits for the leader's). The assignment is the
//! clients' (the leader runs the assignor); the broker keeps the membership, the
//! generation and the opaque protocol metadata and assignments, as Kafka's group
//! coordinator does:
//!
//! - `Empty` → `PreparingRebalance` when a member joins; it completes when every member has
//!   joined again (or at the rebalance deadline, without those that did not): a new
//!   generation, a protocol every member supports, a leader (who gets the members'
//!   metadata) → `CompletingRebalance`; the leader's SyncGroup hands each member its
//!   assignment → `Stable`.
//! - A member that joins, leaves, or misses its session timeout starts a rebalance; the
//!   others learn of it from their heartbeats (`RebalanceInProgress`) and join again.
//! - A new member's first JoinGroup (version 4 and later) is answered with a member id to
//!   join with (`MemberIdRequired`, KIP-394), so a client that retries does not leave
//!   ghost members behind. A static member (`group.instance.id`) joining with no member id
//!   takes its old place (the old id is fenced).

use std::collections::{BTreeMap, BTreeSet};

/// Why a request was refused (each is one of Kafka's error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClassicError {
    #[error("unknown member id: join the group again")]
    UnknownMemberId,
    #[error("the group's generation moved on: join the group again")]
    IllegalGeneration,
    #[error("the group is rebalancing: join the group again")]
    RebalanceInProgress,
    #[error("the member's protocol type or assignors match none the group's members use")]
    InconsistentGroupProtocol,
    #[error("join again with the member id given")]
    MemberIdRequired,
    #[error("another member took this group.instance.id")]
    FencedInstanceId,
    #[error("the group has its maximum of members (max_group_members)")]
    GroupMaxSizeReached,
    #[error("the session timeout is outside 1000..=max_session_timeout_ms")]
    InvalidSessionTimeout,
}

/// A JoinGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// Empty for a new member.
    pub member_id: String,
    pub instance: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: u64,
    pub rebalance_timeout_ms: u64,
    pub protocol_type: String,
    /// Assignors the member supports, in its order of preference, with its metadata.
    pub protocols: Vec<(String, Vec<u8>)>,
    /// Whether a new member must first be given an id (JoinGroup v4+).
    pub require_known_member_id: bool,
}

/// A completed JoinGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub member_id: String,
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    /// For the leader: every member's id, instance and metadata for the chosen protocol.
    pub members: Vec<(String, Option<String>, Vec<u8>)>,
}

/// An immediate answer to a JoinGroup or SyncGroup, or a note that it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Now(Result<T, (ClassicError, Option<String>)>),
    Wait { member_id: String },
}

/// Answers completed for parked requests, by member id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Completed {
    pub joins: Vec<(String, Result<Joined, ClassicError>)>,
    pub syncs: Vec<(String, Result<Vec<u8>, ClassicError>)>,
}

impl Completed {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.syncs.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Empty,
    PreparingRebalance { deadline_ms: i64 },
    CompletingRebalance { deadline_ms: i64 },
    Stable,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance { .. } => "PreparingRebalance",
            State::CompletingRebalance { .. } => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClassicMember {
    pub instance: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: u64,
    pub rebalance_timeout_ms: u64,
    pub protocols: Vec<(String, Vec<u8>)>,
    pub assignment: Vec<u8>,
    last_seen_ms: i64,
    /// Its JoinGroup waits for the rebalance to complete.
    joining: bool,
    /// Its SyncGroup waits for the leader's.
    syncing: bool,
}

/// A classic group.
#[derive(Debug, Clone)]
pub struct ClassicGroup {
    state: State,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, ClassicMember>,
    /// Ids handed out by `MemberIdRequired`, not joined yet, with when they lapse.
    pending: BTreeMap<String, i64>,
    next_id: u64,
    max_members: usize,
}

impl ClassicGroup {
    pub fn new(max_members: usize) -> ClassicGroup {
        ClassicGroup {
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_id: 0,
            max_members,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn generation(&self) -> i32 {
        self.generation
    }

    pub fn protocol_type(&self) -> Option<&str> {
        self.protocol_type.as_deref()
    }

    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    pub fn members(&self) -> &BTreeMap<String, ClassicMember> {
        &self.members
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.pending.is_empty()
    }

    fn new_member_id(&mut self, client_id: &str, nonce: u64) -> String {
        self.next_id += 1;
        let prefix: String = client_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .take(64)
            .collect();
        let prefix = if prefix.is_empty() { "member" } else { &prefix };
        format!("{prefix}-{nonce:016x}{:04x}", self.next_id & 0xffff)
    }

    /// A JoinGroup. `nonce` makes a new member's id unguessable and never reused.
    pub fn join(
        &mut self,
        req: JoinRequest,
        nonce: u64,
        now_ms: i64,
    ) -> (Answer<Joined>, Completed) {
        let mut done = Completed::default();
        let refuse =
            |e: ClassicError, id: Option<String>| (Answer::Now(Err((e, id))), Completed::default());
        if !self.members.is_empty()
            && (self.protocol_type.as_deref() != Some(req.protocol_type.as_str())
                || !self.supports_common_protocol(&req.protocols))
        {
            return refuse(ClassicError::InconsistentGroupProtocol, None);
        }
        if req.protocols.is_empty() {
            return refuse(ClassicError::InconsistentGroupProtocol, None);
        }
        let mut member_id = req.member_id.clone();
        if member_id.is_empty() {
            // A static member coming back: it takes its old place under a new id.
            let old = req.instance.as_ref().and_then(|i| {
                self.members
                    .iter()
                    .find(|(_, m)| m.instance.as_ref() == Some(i))
                    .map(|(id, _)| id.clone())
            });
            member_id = self.new_member_id(&req.client_id, nonce);
            if let Some(old) = old {
                let mut member = self.members.remove(&old).expect("found above");
                if member.joining {
                    done.joins
                        .push((old.clone(), Err(ClassicError::FencedInstanceId)));
                }
                if member.syncing {
                    done.syncs
                        .push((old.clone(), Err(ClassicError::FencedInstanceId)));
                }
                member.joining = false;
                member.syncing = false;
                if self.leader.as_deref() == Some(old.as_str()) {
                    self.leader = Some(member_id.clone());
                }
                self.members.insert(member_id.clone(), member);
            } else {
                if self.members.len() + self.pending.len() >= self.max_members {
                    return refuse(ClassicError::GroupMaxSizeReached, None);
                }
                // A static member is known by its instance: it needs no round trip.
                if req.require_known_member_id && req.instance.is_none() {
                    self.pending.insert(
                        member_id.clone(),
                        now_ms.saturating_add(req.session_timeout_ms as i64),
                    );
                    return (
                        Answer::Now(Err((ClassicError::MemberIdRequired, Some(member_id)))),
                        done,
                    );
                }
            }
        } else if !self.members.contains_key(&member_id) && !self.pending.contains_key(&member_id) {
            // An old id with a static member's instance: another process has that instance
            // now (this one is a zombie).
            if req.instance.as_ref().is_some_and(|i| {
                self.members
                    .values()
                    .any(|m| m.instance.as_ref() == Some(i))
            }) {
                return refuse(ClassicError::FencedInstanceId, None);
            }
            return refuse(ClassicError::UnknownMemberId, None);
        } else if let Some(instance) = &req.instance
            && let Some(m) = self.members.get(&member_id)
            && m.instance.as_ref() != Some(instance)
        {
            return refuse(ClassicError::FencedInstanceId, None);
        }
        self.pending.remove(&member_id);
        let existing = self.members.get(&member_id).cloned();
        // A follower of a stable group joining again with nothing changed (it lost the
        // answer) is answered at once, with no rebalance.
        if let Some(m) = &existing
            && self.state == State::Stable
            && m.protocols == req.protocols
            && self.leader.as_deref() != Some(member_id.as_str())
        {
            let joined = self.joined(&member_id);
            self.members
                .get_mut(&member_id)
                .expect("exists")
                .last_seen_ms = now_ms;
            return (Answer::Now(Ok(joined)), done);
        }
        let member = self
            .members
            .entry(member_id.clone())
            .or_insert(ClassicMember {
                instance: req.instance.clone(),
                client_id: req.client_id.clone(),
                client_host: req.client_host.clone(),
                session_timeout_ms: req.session_timeout_ms,
                rebalance_timeout_ms: req.rebalance_timeout_ms,
                protocols: Vec::new(),
                assignment: Vec::new(),
                last_seen_ms: now_ms,
                joining: false,
                syncing: false,
            });
        if member.joining {
            // The same member joined twice (a retry): the older request is superseded.
            done.joins
                .push((member_id.clone(), Err(ClassicError::RebalanceInProgress)));
        }
        member.protocols = req.protocols;
        member.session_timeout_ms = req.session_timeout_ms;
        member.rebalance_timeout_ms = req.rebalance_timeout_ms;
        member.client_id = req.client_id;
        member.client_host = req.client_host;
        member.instance = req.instance;
        member.last_seen_ms = now_ms;
        member.joining = true;
        if self.protocol_type.is_none() {
            self.protocol_type = Some(req.protocol_type);
        }
        self.prepare_rebalance(now_ms, &mut done);
        self.try_complete_join(now_ms, &mut done);
        // The answer may be among those just completed.
        // (The last one: a superseded copy of this member's join was answered first.)
        if let Some(pos) = done.joins.iter().rposition(|(m, _)| *m == member_id) {
            let (_, result) = done.joins.remove(pos);
            return (Answer::Now(result.map_err(|e| (e, None))), done);
        }
        (Answer::Wait { member_id }, done)
    }

    /// A SyncGroup: the leader's carries every member's assignment.
    pub fn sync(
        &mut self,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Vec<u8>)>,
        now_ms: i64,
    ) -> (Answer<Vec<u8>>, Completed) {
        let mut done = Completed::default();
        let Some(member) = self.members.get_mut(member_id) else {
            return (
                Answer::Now(Err((ClassicError::UnknownMemberId, None))),
                done,
            );
        };
        member.last_seen_ms = now_ms;
        if generation != self.generation {
            return (
                Answer::Now(Err((ClassicError::IllegalGeneration, None))),
                done,
            );
        }
        match self.state {
            State::Empty | State::PreparingRebalance { .. } => (
                Answer::Now(Err((ClassicError::RebalanceInProgress, None))),
                done,
            ),
            State::Stable => (Answer::Now(Ok(member.assignment.clone())), done),
            State::CompletingRebalance { .. } => {
                if self.leader.as_deref() != Some(member_id) {
                    member.syncing = true;
                    return (
                        Answer::Wait {
                            member_id: member_id.to_string(),
                        },
                        done,
                    );
                }
                let mut given: BTreeMap<String, Vec<u8>> = assignments.into_iter().collect();
                for (id, m) in self.members.iter_mut() {
                    m.assignment = given.remove(id).unwrap_or_default();
                    if m.syncing {
                        m.syncing = false;
                        done.syncs.push((id.clone(), Ok(m.assignment.clone())));
                    }
                }
                self.state = State::Stable;
                let mine = self.members[member_id].assignment.clone();
                (Answer::Now(Ok(mine)), done)
            }
        }
    }

    /// A Heartbeat.
    pub fn heartbeat(
        &mut self,
        member_id: &str,
        instance: Option<&str>,
        generation: i32,
        now_ms: i64,
    ) -> Result<(), ClassicError> {
        let Some(member) = self.members.get_mut(member_id) else {
            return Err(if instance.is_some_and(|i| self.has_instance(i)) {
                ClassicError::FencedInstanceId
            } else {
                ClassicError::UnknownMemberId
            });
        };
        member.last_seen_ms = now_ms;
        match self.state {
            State::PreparingRebalance { .. } => Err(ClassicError::RebalanceInProgress),
            _ if generation != self.generation => Err(ClassicError::IllegalGeneration),
            _ => Ok(()),
        }
    }

    fn has_instance(&self, instance: &str) -> bool {
        self.members
            .values()
            .any(|m| m.instance.as_deref() == Some(instance))
    }

    /// Whether a member may commit offsets now (OffsetCommit with a generation).
    pub fn check_commit(&self, member_id: &str, generation: i32) -> Result<(), ClassicError> {
        if !self.members.contains_key(member_id) {
            return Err(ClassicError::UnknownMemberId);
        }
        if generation != self.generation {
            return Err(ClassicError::IllegalGeneration);
        }
        if matches!(self.state, State::CompletingRebalance { .. }) {
            return Err(ClassicError::RebalanceInProgress);
        }
        Ok(())
    }

    /// A LeaveGroup of one member (by id, or by instance when the id is empty).
    pub fn leave(
        &mut self,
        member_id: &str,
        instance: Option<&str>,
        now_ms: i64,
    ) -> (Result<(), ClassicError>, Completed) {
        let mut done = Completed::default();
        let id = if member_id.is_empty() {
            instance.and_then(|i| {
                self.members
                    .iter()
                    .find(|(_, m)| m.instance.as_deref() == Some(i))
                    .map(|(id, _)| id.clone())
            })
        } else {
            Some(member_id.to_string())
        };
        let Some(id) = id.filter(|id| self.members.contains_key(id)) else {
            if self.pending.remove(member_id).is_some() {
                return (Ok(()), done);
            }
            return (Err(ClassicError::UnknownMemberId), done);
        };
        if let (Some(i), Some(m)) = (instance, self.members.get(&id))
            && m.instance.as_deref() != Some(i)
        {
            return (Err(ClassicError::FencedInstanceId), done);
        }
        self.remove(&id, ClassicError::UnknownMemberId, now_ms, &mut done);
        (Ok(()), done)
    }

    /// Expires members whose session lapsed and ends rebalances past their deadline.
    pub fn tick(&mut self, now_ms: i64) -> (Completed, Vec<String>) {
        let mut done = Completed::default();
        self.pending.retain(|_, until| *until > now_ms);
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| {
                // A member parked in a JoinGroup or a SyncGroup is waiting on the others,
                // not gone (the rebalance's own deadlines bound the wait).
                !m.joining
                    && !m.syncing
                    && m.last_seen_ms.saturating_add(m.session_timeout_ms as i64) <= now_ms
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.remove(id, ClassicError::UnknownMemberId, now_ms, &mut done);
        }
        match self.state {
            State::PreparingRebalance { deadline_ms } if now_ms >= deadline_ms => {
                // Those that did not join again are out.
                let late: Vec<String> = self
                    .members
                    .iter()
                    .filter(|(_, m)| !m.joining)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in late {
                    self.members.remove(&id);
                }
                self.try_complete_join(now_ms, &mut done);
                if self.members.is_empty() {
                    self.become_empty();
                }
            }
            State::CompletingRebalance { deadline_ms } if now_ms >= deadline_ms => {
                // The leader never sent the assignments: start over.
                self.prepare_rebalance(now_ms, &mut done);
            }
            _ => {}
        }
        (done, expired)
    }

    fn remove(&mut self, id: &str, why: ClassicError, now_ms: i64, done: &mut Completed) {
        let Some(member) = self.members.remove(id) else {
            return;
        };
        if member.joining {
            done.joins.push((id.to_string(), Err(why)));
        }
        if member.syncing {
            done.syncs.push((id.to_string(), Err(why)));
        }
        if self.leader.as_deref() == Some(id) {
            self.leader = None;
        }
        if self.members.is_empty() {
            self.become_empty();
            return;
        }
        self.prepare_rebalance(now_ms, done);
        self.try_complete_join(now_ms, done);
    }

    fn become_empty(&mut self) {
        if self.state != State::Empty {
            self.generation += 1;
        }
        self.state = State::Empty;
        self.protocol = None;
        self.protocol_type = None;
        self.leader = None;
    }

    /// Moves to `PreparingRebalance` (if not there already): parked syncs are told to join
    /// again.
    fn prepare_rebalance(&mut self, now_ms: i64, done: &mut Completed) {
        if matches!(self.state, State::PreparingRebalance { .. }) {
            return;
        }
        for (id, m) in self.members.iter_mut() {
            if m.syncing {
                m.syncing = false;
                done.syncs
                    .push((id.clone(), Err(ClassicError::RebalanceInProgress)));
            }
        }
        let timeout = self.rebalance_timeout_ms();
        self.state = State::PreparingRebalance {
            deadline_ms: now_ms.saturating_add(timeout as i64),
        };
    }

    /// How long a rebalance phase may take: the longest any member asked for.
    fn rebalance_timeout_ms(&self) -> u64 {
        self.members
            .values()
            .map(|m| m.rebalance_timeout_ms)
            .max()
            .unwrap_or(0)
    }

    /// Completes the join phase once every member has joined again.
    fn try_complete_join(&mut self, now_ms: i64, done: &mut Completed) {
        if !matches!(self.state, State::PreparingRebalance { .. })
            || self.members.is_empty()
            || self.members.values().any(|m| !m.joining)
        {
            return;
        }
        let Some(protocol) = self.choose_protocol() else {
            // Cannot happen: joins are refused unless they share a protocol.
            for (id, m) in self.members.iter_mut() {
                m.joining = false;
                done.joins
                    .push((id.clone(), Err(ClassicError::InconsistentGroupProtocol)));
            }
            return;
        };
        self.generation += 1;
        self.protocol = Some(protocol);
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        let timeout = self.rebalance_timeout_ms();
        self.state = State::CompletingRebalance {
            deadline_ms: now_ms.saturating_add(timeout as i64),
        };
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let joined = self.joined(&id);
            let m = self.members.get_mut(&id).expect("listed");
            m.joining = false;
            m.last_seen_ms = now_ms;
            done.joins.push((id, Ok(joined)));
        }
    }

    /// The current generation as member `id` sees it.
    fn joined(&self, id: &str) -> Joined {
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        let members = if leader == id {
            self.members
                .iter()
                .map(|(mid, m)| {
                    let metadata = m
                        .protocols
                        .iter()
                        .find(|(name, _)| *name == protocol)
                        .map(|(_, meta)| meta.clone())
                        .unwrap_or_default();
                    (mid.clone(), m.instance.clone(), metadata)
                })
                .collect()
        } else {
            Vec::new()
        };
        Joined {
            member_id: id.to_string(),
            generation: self.generation,
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            protocol,
            leader,
            members,
        }
    }

    fn supports_common_protocol(&self, protocols: &[(String, Vec<u8>)]) -> bool {
        protocols.iter().any(|(name, _)| {
            self.members
                .values()
                .all(|m| m.protocols.iter().any(|(n, _)| n == name))
        })
    }

    /// The protocol every member supports with the most votes (each member votes for the
    /// first of its list that all support), as Kafka chooses.
    fn choose_protocol(&self) -> Option<String> {
        let common: BTreeSet<&String> = self
            .members
            .values()
            .next()?
            .protocols
            .iter()
            .map(|(n, _)| n)
            .filter(|n| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(x, _)| x == *n))
            })
            .collect();
        let mut votes: BTreeMap<&String, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some((name, _)) = m.protocols.iter().find(|(n, _)| common.contains(n)) {
                *votes.entry(name).or_default() += 1;
            }
        }
        votes
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(name, _)| name.clone())
    }
}

/// The partitions a member of a `consumer` group was assigned, from the assignment its
/// leader sent (Kafka's ConsumerProtocolAssignment: a version, then topics with their
/// partitions). `None` if it is not one.
pub fn consumer_assignment(bytes: &[u8]) -> Option<Vec<(String, Vec<i32>)>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let _version = i16::from_be_bytes(take(2)?.try_into().ok()?);
    let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let name = String::from_utf8(take(usize::try_from(len).ok()?)?.to_vec()).ok()?;
        let count = i32::from_be_bytes(take(4)?.try_into().ok()?);
        let mut partitions = Vec::new();
        for _ in 0..count.max(0) {
            partitions.push(i32::from_be_bytes(take(4)?.try_into().ok()?));
        }
        out.push((name, partitions));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(member: &str, protocols: &[&str]) -> JoinRequest {
        JoinRequest {
            member_id: member.to_string(),
            instance: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
            protocol_type: "consumer".into(),
            protocols: protocols
                .iter()
                .map(|p| (p.to_string(), p.as_bytes().to_vec()))
                .collect(),
            require_known_member_id: true,
        }
    }

    /// Joins a new member through MemberIdRequired; returns its id and the answer.
    fn join_new(g: &mut ClassicGroup, nonce: u64, now: i64) -> (String, Answer<Joined>, Completed) {
        let (first, _) = g.join(req("", &["range"]), nonce, now);
        let Answer::Now(Err((ClassicError::MemberIdRequired, Some(id)))) = first else {
            panic!("{first:?}");
        };
        let (answer, done) = g.join(req(&id, &["range"]), nonce, now);
        (id, answer, done)
    }

    #[test]
    fn one_member_joins_syncs_and_is_stable() {
        let mut g = ClassicGroup::new(10);
        let (id, answer, _) = join_new(&mut g, 1, 0);
        let Answer::Now(Ok(joined)) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(joined.leader, id);
        assert_eq!(joined.generation, 1);
        assert_eq!(joined.members.len(), 1);
        let (sync, _) = g.sync(&id, 1, vec![(id.clone(), b"A".to_vec())], 1);
        assert_eq!(sync, Answer::Now(Ok(b"A".to_vec())));
        assert_eq!(g.state(), State::Stable);
        assert_eq!(g.heartbeat(&id, None, 1, 2), Ok(()));
        assert_eq!(
            g.heartbeat(&id, None, 0, 2),
            Err(ClassicError::IllegalGeneration)
        );
        assert_eq!(
            g.heartbeat("nobody", None, 1, 2),
            Err(ClassicError::UnknownMemberId)
        );
    }

    #[test]
    fn a_second_member_rebalances_the_group_and_followers_wait_for_the_leader() {
        let mut g = ClassicGroup::new(10);
        let (a, _, _) = join_new(&mut g, 1, 0);
        g.sync(&a, 1, vec![(a.clone(), b"all".to_vec())], 0);
        // b joins: it waits for a to join again.
        let (b, answer, _) = join_new(&mut g, 2, 10);
        assert!(matches!(answer, Answer::Wait { .. }));
        assert_eq!(
            g.heartbeat(&a, None, 1, 11),
            Err(ClassicError::RebalanceInProgress)
        );
        // a may still commit for its generation before joining again.
        assert_eq!(g.check_commit(&a, 1), Ok(()));
        let (answer, done) = g.join(req(&a, &["range"]), 0, 12);
        let Answer::Now(Ok(joined)) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(joined.generation, 2);
        assert_eq!(joined.leader, a, "the leader stays the leader");
        assert_eq!(joined.members.len(), 2);
        assert_eq!(done.joins.len(), 1);
        assert_eq!(done.joins[0].0, b);
        assert!(
            done.joins[0].1.as_ref().unwrap().members.is_empty(),
            "followers get no member list"
        );
        // b syncs first and waits; a's sync completes it.
        let (answer, _) = g.sync(&b, 2, vec![], 13);
        assert!(matches!(answer, Answer::Wait { .. }));
        assert_eq!(
            g.check_commit(&b, 2),
            Err(ClassicError::RebalanceInProgress)
        );
        let (answer, done) = g.sync(
            &a,
            2,
            vec![(a.clone(), b"p0".to_vec()), (b.clone(), b"p1".to_vec())],
            14,
        );
        assert_eq!(answer, Answer::Now(Ok(b"p0".to_vec())));
        assert_eq!(done.syncs, vec![(b.clone(), Ok(b"p1".to_vec()))]);
        assert_eq!(g.state(), State::Stable);
    }

    #[test]
    fn a_lapsed_session_or_a_leave_rebalances_the_rest() {
        let mut g = ClassicGroup::new(10);
        let (a, _, _) = join_new(&mut g, 1, 0);
        let (b, _, _) = join_new(&mut g, 2, 0);
        g.join(req(&a, &["range"]), 0, 0);
        g.sync(&a, 2, vec![], 0);
        g.sync(&b, 2, vec![], 0);
        assert_eq!(g.state(), State::Stable);
        // b keeps its session; a goes silent.
        g.heartbeat(&b, None, 2, 9_000).unwrap();
        let (_, expired) = g.tick(10_000);
        assert_eq!(expired, vec![a.clone()]);
        assert!(matches!(g.state(), State::PreparingRebalance { .. }));
        assert_eq!(
            g.heartbeat(&b, None, 2, 10_001),
            Err(ClassicError::RebalanceInProgress)
        );
        let (answer, _) = g.join(req(&b, &["range"]), 0, 10_002);
        let Answer::Now(Ok(joined)) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(joined.leader, b);
        assert_eq!(joined.generation, 3);
        let (left, _) = g.leave(&b, None, 10_003);
        assert_eq!(left, Ok(()));
        assert_eq!(g.state(), State::Empty);
        assert!(g.members().is_empty());
    }

    #[test]
    fn a_member_that_does_not_join_again_is_dropped_at_the_deadline() {
        let mut g = ClassicGroup::new(10);
        let (a, _, _) = join_new(&mut g, 1, 0);
        g.sync(&a, 1, vec![], 0);
        let (b, answer, _) = join_new(&mut g, 2, 100);
        assert!(matches!(answer, Answer::Wait { .. }));
        // a heartbeats (so its session holds) but never joins again.
        g.heartbeat(&a, None, 1, 20_000).ok();
        let (done, _) = g.tick(100 + 30_000);
        assert_eq!(done.joins.len(), 1);
        assert_eq!(done.joins[0].0, b);
        assert_eq!(done.joins[0].1.as_ref().unwrap().leader, b);
        assert!(!g.members().contains_key(&a));
    }

    #[test]
    fn protocols_must_be_shared_and_unknown_ids_refused() {
        let mut g = ClassicGroup::new(10);
        join_new(&mut g, 1, 0);
        let (answer, _) = g.join(req("", &["sticky"]), 2, 0);
        assert!(matches!(
            answer,
            Answer::Now(Err((ClassicError::InconsistentGroupProtocol, _)))
        ));
        let (answer, _) = g.join(req("made-up", &["range"]), 2, 0);
        assert!(matches!(
            answer,
            Answer::Now(Err((ClassicError::UnknownMemberId, _)))
        ));
        let mut full = ClassicGroup::new(1);
        join_new(&mut full, 1, 0);
        let (answer, _) = full.join(req("", &["range"]), 2, 0);
        assert!(matches!(
            answer,
            Answer::Now(Err((ClassicError::GroupMaxSizeReached, _)))
        ));
    }

    #[test]
    fn a_static_member_takes_its_place_back() {
        let mut g = ClassicGroup::new(10);
        let mut r = req("", &["range"]);
        r.instance = Some("worker-1".into());
        let (first, _) = g.join(r.clone(), 1, 0);
        let Answer::Now(Ok(joined)) = first else {
            panic!("{first:?}")
        };
        let old = joined.member_id;
        g.sync(&old, 1, vec![(old.clone(), b"x".to_vec())], 0);
        let (again, _) = g.join(r, 2, 5);
        let Answer::Now(Ok(joined)) = again else {
            panic!("{again:?}")
        };
        assert_ne!(joined.member_id, old);
        assert_eq!(g.members().len(), 1);
        assert_eq!(
            g.heartbeat(&old, Some("worker-1"), 2, 6),
            Err(ClassicError::FencedInstanceId)
        );
        // The old process joining with its old id is fenced too.
        let mut zombie = req(&old, &["range"]);
        zombie.instance = Some("worker-1".into());
        let (answer, _) = g.join(zombie, 3, 7);
        assert!(matches!(
            answer,
            Answer::Now(Err((ClassicError::FencedInstanceId, _)))
        ));
    }

    #[test]
    fn consumer_assignments_decode() {
        let mut bytes = vec![0, 1, 0, 0, 0, 1, 0, 3];
        bytes.extend_from_slice(b"ord");
        bytes.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            consumer_assignment(&bytes),
            Some(vec![("ord".to_string(), vec![4, 7])])
        );
        assert_eq!(consumer_assignment(&bytes[..9]), None);
    }
}
