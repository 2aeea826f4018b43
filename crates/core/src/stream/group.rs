//! A consumer group's membership and partition assignment, without I/O (time is passed in).
//!
//! Members join for a set of streams and heartbeat; the broker assigns the partitions of
//! those streams among them (server-side, as Kafka's KIP-848 consumer groups do):
//!
//! - **Balanced per stream**: with `n` partitions and `m` members subscribed to a stream,
//!   each member gets `n / m` of them, and `n % m` members one more.
//! - **Sticky**: a member keeps the partitions it has as long as that stays balanced; a
//!   rebalance moves only what must move (a member joined, left, or a stream grew).
//! - **Cooperative**: a partition moves to its new owner only once its previous owner has
//!   given it up (a heartbeat whose `owned` no longer lists it), so two members never own
//!   one partition, and a rebalance stops no member from consuming what it keeps.
//! - **Sessions**: a member whose heartbeats stop for its session timeout is removed and its
//!   partitions go to the others. A member may name itself (`instance`, Kafka's static
//!   membership): joining again under that name takes its place back, partitions included,
//!   with no rebalance.

use std::collections::{BTreeMap, BTreeSet};

/// A partition of a stream.
pub type TopicPartition = (String, u32);

/// One member's view after a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Bumped whenever the target assignment changes.
    pub generation: u64,
    /// What the member may consume now (it owns them once it says so).
    pub assigned: BTreeSet<TopicPartition>,
    /// What it must stop consuming (commit, then leave them out of `owned`).
    pub revoked: BTreeSet<TopicPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("member '{0}' is not in the group (its session expired, or it left): join again")]
    UnknownMember(String),
}

#[derive(Debug, Clone)]
struct Member {
    streams: BTreeSet<String>,
    session_timeout_ms: u64,
    last_seen_ms: i64,
    /// What it said it consumes (only ever what it was given).
    owned: BTreeSet<TopicPartition>,
    instance: Option<String>,
}

/// A consumer group: members, and the target assignment of their streams' partitions.
#[derive(Debug, Clone, Default)]
pub struct Group {
    generation: u64,
    members: BTreeMap<String, Member>,
    /// Partition -> the member it should go to.
    target: BTreeMap<TopicPartition, String>,
}

impl Group {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether a member joined under this instance name.
    pub fn has_instance(&self, instance: &str) -> bool {
        self.members
            .values()
            .any(|m| m.instance.as_deref() == Some(instance))
    }

    pub fn member_ids(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// Whether `member` owns a partition now (it was handed it, and has not given it up):
    /// only the owner commits a group's offset for it.
    pub fn owns(&self, member: &str, tp: &TopicPartition) -> Result<bool, GroupError> {
        self.members
            .get(member)
            .map(|m| m.owned.contains(tp))
            .ok_or_else(|| GroupError::UnknownMember(member.to_string()))
    }

    /// The target owner of each partition.
    pub fn target(&self) -> &BTreeMap<TopicPartition, String> {
        &self.target
    }

    /// Adds member `id` (a name never used before: the caller makes it unique, so a client
    /// holding an old member's id can never act for a new one). With an `instance` already in
    /// the group, the new id takes that member's place: its partitions and position in the
    /// assignment, with no rebalance; the old id is no longer a member (fenced, as Kafka's
    /// static membership does). `partitions` gives a stream's partition count (`None`: the
    /// stream does not exist, and has no partitions to assign).
    pub fn join(
        &mut self,
        id: String,
        instance: Option<&str>,
        streams: &[String],
        session_timeout_ms: u64,
        now_ms: i64,
        partitions: &dyn Fn(&str) -> Option<u32>,
    ) -> String {
        let streams: BTreeSet<String> = streams.iter().cloned().collect();
        let previous = instance.and_then(|instance| {
            self.members
                .iter()
                .find(|(_, m)| m.instance.as_deref() == Some(instance))
                .map(|(old, _)| old.clone())
        });
        if let Some(old) = previous {
            let mut member = self.members.remove(&old).expect("found above");
            member.last_seen_ms = now_ms;
            member.session_timeout_ms = session_timeout_ms;
            let changed = member.streams != streams;
            member.streams = streams;
            self.members.insert(id.clone(), member);
            for owner in self.target.values_mut() {
                if *owner == old {
                    *owner = id.clone();
                }
            }
            if changed {
                self.rebalance(partitions);
            }
            return id;
        }
        self.members.insert(
            id.clone(),
            Member {
                streams,
                session_timeout_ms,
                last_seen_ms: now_ms,
                owned: BTreeSet::new(),
                instance: instance.map(str::to_string),
            },
        );
        self.rebalance(partitions);
        id
    }

    /// Keeps a member alive until `until_ms` at least (a long poll in progress is a
    /// heartbeat for as long as it waits).
    pub fn touch(&mut self, member: &str, until_ms: i64) {
        if let Some(m) = self.members.get_mut(member) {
            m.last_seen_ms = m.last_seen_ms.max(until_ms);
        }
    }

    /// A member's heartbeat, with what it consumes now: what it may consume, and what it
    /// must give up.
    pub fn heartbeat(
        &mut self,
        member: &str,
        owned: &BTreeSet<TopicPartition>,
        now_ms: i64,
    ) -> Result<Assignment, GroupError> {
        let Some(me) = self.members.get_mut(member) else {
            return Err(GroupError::UnknownMember(member.to_string()));
        };
        me.last_seen_ms = now_ms;
        // It owns only what it was handed and still says it has (a client cannot claim a
        // partition it was not given).
        me.owned = me.owned.intersection(owned).cloned().collect();
        Ok(self.assignment_of(member))
    }

    fn assignment_of(&mut self, member: &str) -> Assignment {
        let mine: BTreeSet<TopicPartition> = self
            .target
            .iter()
            .filter(|(_, owner)| owner.as_str() == member)
            .map(|(tp, _)| tp.clone())
            .collect();
        // A partition another member still owns is not handed out yet.
        let held_by_others: BTreeSet<&TopicPartition> = self
            .members
            .iter()
            .filter(|(id, _)| id.as_str() != member)
            .flat_map(|(_, m)| m.owned.iter())
            .collect();
        let assigned: BTreeSet<TopicPartition> = mine
            .iter()
            .filter(|tp| !held_by_others.contains(tp))
            .cloned()
            .collect();
        let me = self.members.get_mut(member).expect("checked by the caller");
        let revoked = me.owned.difference(&mine).cloned().collect();
        // What is handed out now counts as owned until the member says otherwise: a second
        // member asking before this one's next heartbeat must not get it too.
        me.owned.extend(assigned.iter().cloned());
        Assignment {
            generation: self.generation,
            assigned,
            revoked,
        }
    }

    /// A member's streams change (Kafka's consumer protocol: it subscribed to others): it
    /// keeps what it owns of those it still reads until the rebalance moves it, cooperatively.
    /// Returns false for a member not in the group.
    pub fn resubscribe(
        &mut self,
        member: &str,
        streams: &[String],
        partitions: &dyn Fn(&str) -> Option<u32>,
    ) -> bool {
        let Some(m) = self.members.get_mut(member) else {
            return false;
        };
        let streams: BTreeSet<String> = streams.iter().cloned().collect();
        if m.streams != streams {
            m.streams = streams;
            self.rebalance(partitions);
        }
        true
    }

    /// Removes a member; its partitions go to the others.
    pub fn leave(&mut self, member: &str, partitions: &dyn Fn(&str) -> Option<u32>) -> bool {
        let left = self.members.remove(member).is_some();
        if left {
            self.rebalance(partitions);
        }
        left
    }

    /// Removes the members whose session timed out; returns them.
    pub fn expire(&mut self, now_ms: i64, partitions: &dyn Fn(&str) -> Option<u32>) -> Vec<String> {
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| now_ms.saturating_sub(m.last_seen_ms) > m.session_timeout_ms as i64)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.members.remove(id);
        }
        if !gone.is_empty() {
            self.rebalance(partitions);
        }
        gone
    }

    /// A stream's partitions changed (it grew, or was deleted): assign again.
    pub fn streams_changed(&mut self, partitions: &dyn Fn(&str) -> Option<u32>) {
        self.rebalance(partitions);
    }

    /// Recomputes the target: balanced per stream, keeping each member's partitions while
    /// balance allows.
    fn rebalance(&mut self, partitions: &dyn Fn(&str) -> Option<u32>) {
        let streams: BTreeSet<&String> = self
            .members
            .values()
            .flat_map(|m| m.streams.iter())
            .collect();
        let mut target: BTreeMap<TopicPartition, String> = BTreeMap::new();
        for stream in streams {
            let Some(n) = partitions(stream) else {
                continue;
            };
            let subscribed: Vec<&String> = self
                .members
                .iter()
                .filter(|(_, m)| m.streams.contains(stream))
                .map(|(id, _)| id)
                .collect();
            let m = subscribed.len() as u32;
            let (base, extra) = (n / m, n % m);
            // What each member has of this stream now, in the old target.
            let mut kept: BTreeMap<&String, Vec<u32>> =
                subscribed.iter().map(|id| (*id, Vec::new())).collect();
            for ((s, p), owner) in &self.target {
                if s == stream
                    && *p < n
                    && let Some(list) = kept.get_mut(owner)
                {
                    list.push(*p);
                }
            }
            // Members keeping the most come first for the `extra` larger shares.
            let mut order: Vec<&String> = subscribed.clone();
            order.sort_by_key(|id| (std::cmp::Reverse(kept[id].len()), id.to_string()));
            let mut free: BTreeSet<u32> = (0..n).collect();
            let mut quota: BTreeMap<&String, u32> = BTreeMap::new();
            for (i, id) in order.iter().enumerate() {
                let share = base + u32::from((i as u32) < extra);
                quota.insert(id, share);
                for &p in kept[id].iter().take(share as usize) {
                    free.remove(&p);
                    target.insert((stream.clone(), p), (*id).clone());
                }
            }
            // The rest, to whoever is furthest below their share.
            for p in free {
                let taken = |id: &String| {
                    target
                        .iter()
                        .filter(|((s, _), owner)| s == stream && *owner == id)
                        .count() as u32
                };
                let id = order
                    .iter()
                    .filter(|id| taken(id) < quota[*id])
                    .min_by_key(|id| (taken(id), id.to_string()))
                    .expect("the shares add up to the partitions");
                target.insert((stream.clone(), p), (*id).clone());
            }
        }
        // A partition that moved, or that no one is to have now (its stream deleted, or no
        // longer subscribed), stays its holder's until that member gives it up: its next
        // heartbeat revokes it.
        if target != self.target {
            self.target = target;
            self.generation += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts<'a>(streams: &'a [(&'a str, u32)]) -> impl Fn(&str) -> Option<u32> + 'a {
        move |s| streams.iter().find(|(n, _)| *n == s).map(|(_, p)| *p)
    }

    fn tp(s: &str, p: u32) -> TopicPartition {
        (s.to_string(), p)
    }

    /// A fresh member id, as the broker makes them (unique).
    fn id() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        format!("member-{}", NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Heartbeats every member until nothing changes; returns who owns what.
    fn settle(group: &mut Group, now: i64) -> BTreeMap<String, BTreeSet<TopicPartition>> {
        let mut owned: BTreeMap<String, BTreeSet<TopicPartition>> = group
            .member_ids()
            .map(|id| (id.to_string(), BTreeSet::new()))
            .collect();
        let mut stable = 0;
        for _ in 0..20 {
            let before = owned.clone();
            let ids: Vec<String> = owned.keys().cloned().collect();
            for id in ids {
                let mine = owned[&id].clone();
                let a = group.heartbeat(&id, &mine, now).unwrap();
                let entry = owned.get_mut(&id).unwrap();
                for r in &a.revoked {
                    entry.remove(r);
                }
                entry.extend(a.assigned);
            }
            stable = if owned == before { stable + 1 } else { 0 };
            if stable == 2 {
                break;
            }
        }
        owned
    }

    fn check(owned: &BTreeMap<String, BTreeSet<TopicPartition>>, streams: &[(&str, u32)]) {
        let mut seen = BTreeSet::new();
        for parts in owned.values() {
            for p in parts {
                assert!(seen.insert(p.clone()), "{p:?} owned twice: {owned:?}");
            }
        }
        for (s, n) in streams {
            for p in 0..*n {
                assert!(seen.contains(&tp(s, p)), "{s}/{p} unowned: {owned:?}");
            }
            let per: Vec<usize> = owned
                .values()
                .map(|o| o.iter().filter(|(x, _)| x == s).count())
                .collect();
            let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
            assert!(hi - lo <= 1, "{s} unbalanced: {owned:?}");
        }
    }

    #[test]
    fn members_share_partitions_and_keep_theirs_when_one_joins() {
        let streams = [("a", 6)];
        let p = counts(&streams);
        let mut g = Group::default();
        let one = g.join(id(), None, &["a".into()], 10_000, 0, &p);
        let owned = settle(&mut g, 0);
        assert_eq!(owned[&one].len(), 6);
        let two = g.join(id(), None, &["a".into()], 10_000, 0, &p);
        let owned = settle(&mut g, 0);
        check(&owned, &streams);
        assert_eq!((owned[&one].len(), owned[&two].len()), (3, 3));
        let before = owned[&one].clone();
        let three = g.join(id(), None, &["a".into()], 10_000, 0, &p);
        let owned = settle(&mut g, 0);
        check(&owned, &streams);
        assert!(
            owned[&one].is_subset(&before),
            "one kept part of what it had"
        );
        assert_eq!(owned[&three].len(), 2);
    }

    #[test]
    fn a_partition_moves_only_after_its_owner_gives_it_up() {
        let streams = [("a", 2)];
        let p = counts(&streams);
        let mut g = Group::default();
        let one = g.join(id(), None, &["a".into()], 10_000, 0, &p);
        let all = g.heartbeat(&one, &BTreeSet::new(), 0).unwrap().assigned;
        assert_eq!(all.len(), 2);
        let two = g.join(id(), None, &["a".into()], 10_000, 0, &p);
        // one has not given anything up yet: two gets nothing.
        assert!(
            g.heartbeat(&two, &BTreeSet::new(), 0)
                .unwrap()
                .assigned
                .is_empty()
        );
        let a = g.heartbeat(&one, &all, 0).unwrap();
        assert_eq!(a.revoked.len(), 1);
        let kept: BTreeSet<TopicPartition> = all.difference(&a.revoked).cloned().collect();
        g.heartbeat(&one, &kept, 0).unwrap();
        let b = g.heartbeat(&two, &BTreeSet::new(), 0).unwrap();
        assert_eq!(b.assigned, a.revoked);
    }

    #[test]
    fn sessions_expire_and_static_members_come_back_to_their_partitions() {
        let streams = [("a", 4), ("b", 1)];
        let p = counts(&streams);
        let mut g = Group::default();
        let one = g.join(
            id(),
            Some("host-1"),
            &["a".into(), "b".into()],
            1_000,
            0,
            &p,
        );
        let two = g.join(id(), None, &["a".into()], 1_000, 0, &p);
        let owned = settle(&mut g, 0);
        check(&owned, &streams);
        let generation = g.generation();
        // host-1 restarts and joins again under its name: a new id takes the old one's
        // partitions with no rebalance, and the old id is fenced.
        let again = g.join(
            id(),
            Some("host-1"),
            &["a".into(), "b".into()],
            1_000,
            500,
            &p,
        );
        assert_ne!(again, one);
        assert_eq!(g.generation(), generation);
        assert!(
            g.heartbeat(&one, &owned[&one], 600).is_err(),
            "the old id is fenced"
        );
        let mine = g.heartbeat(&again, &BTreeSet::new(), 600).unwrap();
        assert_eq!(mine.assigned, owned[&one], "the same partitions");
        let one = again;
        // two stops heartbeating: gone after its session, its partitions to host-1.
        g.heartbeat(&one, &mine.assigned, 1_400).unwrap();
        assert_eq!(g.expire(1_600, &p), vec![two.clone()]);
        assert_eq!(
            g.heartbeat(&two, &BTreeSet::new(), 1_600),
            Err(GroupError::UnknownMember(two))
        );
        let owned = settle(&mut g, 1_600);
        assert_eq!(owned[&one].len(), 5);
    }

    /// The member cap let a member in past it when its instance name was a prefix of a
    /// present one's ("a" next to "a-b": the check looked at id prefixes).
    #[test]
    fn instances_are_told_apart_by_name_not_by_id_prefix() {
        let streams = [("a", 1)];
        let p = counts(&streams);
        let mut g = Group::default();
        g.join("a-b-1f".into(), Some("a-b"), &["a".into()], 1_000, 0, &p);
        assert!(g.has_instance("a-b"));
        assert!(!g.has_instance("a"));
    }

    #[test]
    fn growth_and_deletion_reassign() {
        let mut counts_now = vec![("a", 2)];
        let mut g = Group::default();
        let one = g.join(id(), None, &["a".into()], 10_000, 0, &counts(&counts_now));
        let two = g.join(id(), None, &["a".into()], 10_000, 0, &counts(&counts_now));
        settle(&mut g, 0);
        counts_now[0].1 = 5;
        g.streams_changed(&counts(&counts_now));
        let owned = settle(&mut g, 0);
        check(&owned, &counts_now);
        g.streams_changed(&counts(&[]));
        let owned = settle(&mut g, 0);
        assert!(owned[&one].is_empty() && owned[&two].is_empty());
    }
}
