//! Kafka's classic consumer groups (`stream::classic`, sans-IO) served: parked JoinGroup
//! and SyncGroup requests wait on channels the state machine's completions answer, and
//! maintenance expires sessions and rebalance deadlines. A group name is one group: while
//! a classic group has members, tidewater's own members cannot join it (nor the reverse),
//! and its committed offsets are the same ones every front end reads.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::Broker;
use crate::error::{BrokerError, ErrorCode};
use crate::stream::classic::{
    Answer, ClassicError, ClassicGroup, Completed, JoinRequest, Joined, consumer_assignment,
};

type JoinResult = Result<Joined, (ClassicError, Option<String>)>;
/// A parked request's answer, by (group, member).
type Waiters<T> = HashMap<(String, String), oneshot::Sender<Result<T, ClassicError>>>;
/// Members with the partitions they were assigned, (stream, partition) each.
type Assigned = Vec<(String, Vec<(String, u32)>)>;

/// A refusal before the group was asked: the group name, or a session timeout, out of
/// bounds; a tidewater group of that name has members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassicRefusal {
    Group(ClassicError),
    InvalidGroupId(String),
    /// The name belongs to a tidewater group with members.
    InUse(String),
}

#[derive(Default)]
struct State {
    groups: HashMap<String, ClassicGroup>,
    joins: Waiters<Joined>,
    syncs: Waiters<Vec<u8>>,
}

impl State {
    fn deliver(&mut self, group: &str, done: Completed) {
        for (member, result) in done.joins {
            if let Some(tx) = self.joins.remove(&(group.to_string(), member)) {
                let _ = tx.send(result);
            }
        }
        for (member, result) in done.syncs {
            if let Some(tx) = self.syncs.remove(&(group.to_string(), member)) {
                let _ = tx.send(result);
            }
        }
    }
}

/// The classic groups of a broker.
#[derive(Default)]
pub(crate) struct ClassicGroups {
    state: Mutex<State>,
}

impl ClassicGroups {
    /// Whether a classic group of that name has members.
    pub(crate) fn has_members(&self, group: &str) -> bool {
        self.state
            .lock()
            .groups
            .get(group)
            .is_some_and(|g| !g.members().is_empty())
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.state.lock().groups.keys().cloned().collect()
    }
}

/// A classic group as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassicInfo {
    pub state: &'static str,
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    pub members: Vec<ClassicMemberInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassicMemberInfo {
    pub member_id: String,
    pub instance: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// Its metadata for the chosen protocol, and its assignment, as the clients sent them.
    pub metadata: Vec<u8>,
    pub assignment: Vec<u8>,
}

impl Broker {
    fn check_classic(
        &self,
        group: &str,
        session_timeout_ms: Option<u64>,
    ) -> Result<(), ClassicRefusal> {
        if super::groups::check_group_name(group).is_err() {
            return Err(ClassicRefusal::InvalidGroupId(format!(
                "invalid group id '{}': use 1 to 249 characters of A-Z a-z 0-9 . _ -",
                group.chars().take(40).collect::<String>()
            )));
        }
        if let Some(ms) = session_timeout_ms
            && !(1_000..=self.inner.limits.max_session_timeout_ms).contains(&ms)
        {
            return Err(ClassicRefusal::Group(ClassicError::InvalidSessionTimeout));
        }
        if self.group_has_members(group) {
            return Err(ClassicRefusal::InUse(format!(
                "group '{group}' has tidewater members (server-assigned): a Kafka classic member cannot join it; use another group id"
            )));
        }
        Ok(())
    }

    /// A JoinGroup: answered now, or once the group's rebalance completes (at the latest at
    /// its deadline).
    pub async fn classic_join(
        &self,
        group: &str,
        req: JoinRequest,
    ) -> Result<JoinResult, ClassicRefusal> {
        self.check_classic(group, Some(req.session_timeout_ms))?;
        self.set_group_kind(group, super::groups::GroupKind::Classic);
        let wait = Duration::from_millis(req.rebalance_timeout_ms.max(req.session_timeout_ms))
            + Duration::from_secs(5);
        let rx = {
            let mut state = self.inner.classic.state.lock();
            if !state.groups.contains_key(group) {
                let max = self.inner.limits.max_groups;
                if state.groups.len() >= max {
                    return Err(ClassicRefusal::InvalidGroupId(format!(
                        "the broker holds its maximum of {max} classic groups (max_groups)"
                    )));
                }
            }
            let max_members = self.inner.limits.max_group_members;
            let g = state
                .groups
                .entry(group.to_string())
                .or_insert_with(|| ClassicGroup::new(max_members));
            let (answer, done) = g.join(req, self.inner.nonces.nonce(), self.now_ms());
            state.deliver(group, done);
            match answer {
                Answer::Now(result) => return Ok(result),
                Answer::Wait { member_id } => {
                    let (tx, rx) = oneshot::channel();
                    state.joins.insert((group.to_string(), member_id), tx);
                    rx
                }
            }
        };
        Ok(match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result.map_err(|e| (e, None)),
            _ => Err((ClassicError::RebalanceInProgress, None)),
        })
    }

    /// A SyncGroup: the leader's hands out the assignments; a follower's waits for them.
    pub async fn classic_sync(
        &self,
        group: &str,
        member: &str,
        generation: i32,
        assignments: Vec<(String, Vec<u8>)>,
    ) -> Result<Result<Vec<u8>, ClassicError>, ClassicRefusal> {
        self.check_classic(group, None)?;
        let (rx, wait) = {
            let mut state = self.inner.classic.state.lock();
            let Some(g) = state.groups.get_mut(group) else {
                return Ok(Err(ClassicError::UnknownMemberId));
            };
            let wait = g
                .members()
                .get(member)
                .map_or(0, |m| m.rebalance_timeout_ms.max(m.session_timeout_ms));
            let (answer, done) = g.sync(member, generation, assignments, self.now_ms());
            state.deliver(group, done);
            match answer {
                Answer::Now(result) => return Ok(result.map_err(|(e, _)| e)),
                Answer::Wait { member_id } => {
                    let (tx, rx) = oneshot::channel();
                    state.syncs.insert((group.to_string(), member_id), tx);
                    (rx, Duration::from_millis(wait) + Duration::from_secs(5))
                }
            }
        };
        Ok(match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result,
            _ => Err(ClassicError::RebalanceInProgress),
        })
    }

    pub fn classic_heartbeat(
        &self,
        group: &str,
        member: &str,
        instance: Option<&str>,
        generation: i32,
    ) -> Result<(), ClassicError> {
        let mut state = self.inner.classic.state.lock();
        let g = state
            .groups
            .get_mut(group)
            .ok_or(ClassicError::UnknownMemberId)?;
        g.heartbeat(member, instance, generation, self.now_ms())
    }

    /// A LeaveGroup of one member (by id, or by instance with an empty id).
    pub fn classic_leave(
        &self,
        group: &str,
        member: &str,
        instance: Option<&str>,
    ) -> Result<(), ClassicError> {
        let mut state = self.inner.classic.state.lock();
        let Some(g) = state.groups.get_mut(group) else {
            return Err(ClassicError::UnknownMemberId);
        };
        let (result, done) = g.leave(member, instance, self.now_ms());
        state.deliver(group, done);
        result
    }

    /// Commits for a member of a classic group (generation and member id as the client
    /// sent them): only while it is a member of the current generation. A commit with no
    /// member (generation -1) is taken only while the group has no members of either kind.
    pub async fn classic_commit(
        &self,
        group: &str,
        member: &str,
        generation: i32,
        commits: &[(String, u32, u64, String)],
    ) -> Result<Result<(), ClassicError>, BrokerError> {
        {
            let state = self.inner.classic.state.lock();
            let g = state.groups.get(group).filter(|g| !g.members().is_empty());
            match (generation < 0 && member.is_empty(), g) {
                (true, None) => {}
                (true, Some(_)) => return Ok(Err(ClassicError::UnknownMemberId)),
                (false, None) => return Ok(Err(ClassicError::UnknownMemberId)),
                (false, Some(g)) => {
                    if let Err(e) = g.check_commit(member, generation) {
                        return Ok(Err(e));
                    }
                }
            }
        }
        if generation < 0 && member.is_empty() {
            self.commit_as_member(group, None, commits).await?;
        } else {
            self.commit_many(group, commits).await?;
        }
        Ok(Ok(()))
    }

    /// A classic group's state and members, if the broker knows it.
    pub fn classic_describe(&self, group: &str) -> Option<ClassicInfo> {
        let state = self.inner.classic.state.lock();
        let g = state.groups.get(group)?;
        let protocol = g.protocol().unwrap_or_default().to_string();
        Some(ClassicInfo {
            state: if g.members().is_empty() {
                "Empty"
            } else {
                g.state().name()
            },
            generation: g.generation(),
            protocol_type: g.protocol_type().unwrap_or_default().to_string(),
            leader: g.leader().unwrap_or_default().to_string(),
            members: g
                .members()
                .iter()
                .map(|(id, m)| ClassicMemberInfo {
                    member_id: id.clone(),
                    instance: m.instance.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: m
                        .protocols
                        .iter()
                        .find(|(n, _)| *n == protocol)
                        .map(|(_, meta)| meta.clone())
                        .unwrap_or_default(),
                    assignment: m.assignment.clone(),
                })
                .collect(),
            protocol,
        })
    }

    /// The partitions each member of a classic `consumer` group was assigned (for
    /// `describe_group`).
    pub(super) fn classic_assigned(&self, group: &str) -> Option<(u64, Assigned)> {
        let info = self.classic_describe(group)?;
        if info.members.is_empty() {
            return None;
        }
        let members = info
            .members
            .iter()
            .map(|m| {
                let assigned = consumer_assignment(&m.assignment)
                    .unwrap_or_default()
                    .into_iter()
                    .flat_map(|(topic, parts)| {
                        parts
                            .into_iter()
                            .filter_map(move |p| u32::try_from(p).ok().map(|p| (topic.clone(), p)))
                    })
                    .collect();
                (m.member_id.clone(), assigned)
            })
            .collect();
        Some((u64::try_from(info.generation).unwrap_or(0), members))
    }

    /// Whether a classic group of that name has members.
    pub fn classic_has_members(&self, group: &str) -> bool {
        self.inner.classic.has_members(group)
    }

    /// Expires sessions and rebalance deadlines (maintenance); forgets empty groups.
    pub(super) fn maintain_classic_groups(&self) {
        let now = self.now_ms();
        let mut state = self.inner.classic.state.lock();
        let names: Vec<String> = state.groups.keys().cloned().collect();
        for name in names {
            let Some(g) = state.groups.get_mut(&name) else {
                continue;
            };
            let (done, expired) = g.tick(now);
            let empty = g.is_empty();
            for member in expired {
                tracing::info!(group = %name, member = %member, "Kafka group member's session expired: member removed");
            }
            state.deliver(&name, done);
            if empty {
                state.groups.remove(&name);
            }
        }
        // Waiters whose requests went away (a closed connection) are dropped.
        state.joins.retain(|_, tx| !tx.is_closed());
        state.syncs.retain(|_, tx| !tx.is_closed());
    }
}

/// The broker error a refusal is, for callers that speak them.
impl From<ClassicRefusal> for BrokerError {
    fn from(r: ClassicRefusal) -> BrokerError {
        match r {
            ClassicRefusal::Group(e) => BrokerError::new(ErrorCode::InvalidRequest, e.to_string()),
            ClassicRefusal::InvalidGroupId(m) | ClassicRefusal::InUse(m) => {
                BrokerError::new(ErrorCode::InvalidRequest, m)
            }
        }
    }
}
