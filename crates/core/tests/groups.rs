//! The consumer group coordinator (`stream::group`) under random joins, leaves, heartbeats,
//! session expiries and stream growth, with clients that do as told (drop what is revoked,
//! take what is assigned). At every step no partition is held by two members; once every
//! member has heartbeated until nothing changes, every partition of a subscribed stream is
//! held by exactly one of its subscribers, and each stream is balanced (its subscribers'
//! shares differ by at most one).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tidewater_core::stream::group::{Group, TopicPartition};

const STREAMS: [&str; 3] = ["a", "b", "c"];
const SESSION_MS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Action {
    Join {
        streams: u8,
        instance: Option<u8>,
    },
    Leave(usize),
    Heartbeat(usize),
    /// Every member but one heartbeats, then time passes beyond a session.
    Silence(usize),
    Grow {
        stream: usize,
        by: u32,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (1u8..8, prop::option::of(0u8..3)).prop_map(|(streams, instance)| Action::Join { streams, instance }),
        1 => any::<usize>().prop_map(Action::Leave),
        5 => any::<usize>().prop_map(Action::Heartbeat),
        1 => any::<usize>().prop_map(Action::Silence),
        1 => (0usize..3, 1u32..4).prop_map(|(stream, by)| Action::Grow { stream, by }),
    ]
}

struct World {
    group: Group,
    partitions: BTreeMap<String, u32>,
    /// What each member's client holds.
    clients: BTreeMap<String, BTreeSet<TopicPartition>>,
    subscriptions: BTreeMap<String, BTreeSet<String>>,
    /// Static instance name -> its current member id.
    instances: BTreeMap<String, String>,
    next_id: u64,
    now: i64,
}

impl World {
    fn heartbeat(&mut self, id: &str) -> Result<(), TestCaseError> {
        let mine = self.clients[id].clone();
        let a = self
            .group
            .heartbeat(id, &mine, self.now)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let held = self.clients.get_mut(id).unwrap();
        for r in &a.revoked {
            held.remove(r);
        }
        held.extend(a.assigned);
        // Partitions of a deleted stream are simply gone.
        let partitions = self.partitions.clone();
        held.retain(|(s, p)| partitions.get(s).is_some_and(|n| p < n));
        Ok(())
    }

    fn no_partition_held_twice(&self) -> Result<(), TestCaseError> {
        let mut seen = BTreeSet::new();
        for (id, held) in &self.clients {
            for tp in held {
                prop_assert!(
                    seen.insert(tp.clone()),
                    "{tp:?} held twice (again by {id}): {:?}",
                    self.clients
                );
            }
        }
        Ok(())
    }

    /// Heartbeats every member until two rounds in a row change nothing (a partition given
    /// up in one round is handed out in the next).
    fn settle(&mut self) -> Result<(), TestCaseError> {
        let mut stable = 0;
        for _ in 0..40 {
            let before = self.clients.clone();
            let ids: Vec<String> = self.clients.keys().cloned().collect();
            for id in ids {
                self.heartbeat(&id)?;
                self.no_partition_held_twice()?;
            }
            stable = if self.clients == before {
                stable + 1
            } else {
                0
            };
            if stable == 2 {
                break;
            }
        }
        for (stream, &n) in &self.partitions {
            let subscribers: Vec<&String> = self
                .subscriptions
                .iter()
                .filter(|(_, s)| s.contains(stream))
                .map(|(id, _)| id)
                .collect();
            if subscribers.is_empty() {
                continue;
            }
            let mut shares = Vec::new();
            for id in &subscribers {
                shares.push(
                    self.clients[*id]
                        .iter()
                        .filter(|(s, _)| s == stream)
                        .count(),
                );
            }
            let held: usize = shares.iter().sum();
            prop_assert_eq!(
                held,
                n as usize,
                "{} not all held: {:?}",
                stream,
                self.clients
            );
            let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            prop_assert!(
                hi - lo <= 1,
                "{} unbalanced {:?}: {:?}",
                stream,
                shares,
                self.clients
            );
        }
        for (id, held) in &self.clients {
            for (s, _) in held {
                prop_assert!(
                    self.subscriptions[id].contains(s),
                    "{id} holds {s}, not subscribed"
                );
            }
        }
        Ok(())
    }
}

fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let mut w = World {
        group: Group::default(),
        partitions: STREAMS.iter().map(|s| (s.to_string(), 3)).collect(),
        clients: BTreeMap::new(),
        subscriptions: BTreeMap::new(),
        instances: BTreeMap::new(),
        next_id: 0,
        now: 0,
    };
    for action in actions {
        w.now += 10;
        match action {
            Action::Join { streams, instance } => {
                let names: Vec<String> = STREAMS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| streams & (1 << i) != 0)
                    .map(|(_, s)| s.to_string())
                    .collect();
                let instance = instance.map(|i| format!("host-{i}"));
                let partitions: BTreeMap<String, u32> = w.partitions.clone();
                w.next_id += 1;
                let fresh = format!("m{}", w.next_id);
                let replaced = instance.as_ref().and_then(|i| w.instances.get(i).cloned());
                let id = w.group.join(
                    fresh,
                    instance.as_deref(),
                    &names,
                    SESSION_MS,
                    w.now,
                    &|s| partitions.get(s).copied(),
                );
                // A static member coming back: its old client is gone (fenced), the new one
                // starts with nothing and is handed the old one's partitions.
                if let Some(old) = replaced
                    && w.clients.contains_key(&old)
                {
                    w.clients.remove(&old);
                    w.subscriptions.remove(&old);
                }
                if let Some(i) = instance {
                    w.instances.insert(i, id.clone());
                }
                w.clients.entry(id.clone()).or_default();
                w.subscriptions.insert(id, names.into_iter().collect());
            }
            Action::Leave(i) if !w.clients.is_empty() => {
                let id = w.clients.keys().nth(i % w.clients.len()).unwrap().clone();
                let partitions = w.partitions.clone();
                prop_assert!(w.group.leave(&id, &|s| partitions.get(s).copied()));
                // A member that leaves stops consuming first.
                w.clients.remove(&id);
                w.subscriptions.remove(&id);
            }
            Action::Heartbeat(i) if !w.clients.is_empty() => {
                let id = w.clients.keys().nth(i % w.clients.len()).unwrap().clone();
                w.heartbeat(&id)?;
            }
            Action::Silence(i) if !w.clients.is_empty() => {
                let silent = w.clients.keys().nth(i % w.clients.len()).unwrap().clone();
                w.now += SESSION_MS as i64 / 2;
                let ids: Vec<String> = w
                    .clients
                    .keys()
                    .filter(|id| **id != silent)
                    .cloned()
                    .collect();
                for id in ids {
                    w.heartbeat(&id)?;
                }
                w.now += SESSION_MS as i64 / 2 + 1;
                let partitions = w.partitions.clone();
                let gone = w.group.expire(w.now, &|s| partitions.get(s).copied());
                prop_assert_eq!(gone, vec![silent.clone()]);
                // Its client is presumed dead: what it held is free again.
                w.clients.remove(&silent);
                w.subscriptions.remove(&silent);
            }
            Action::Grow { stream, by } => {
                *w.partitions.get_mut(STREAMS[stream]).unwrap() += by;
                let partitions = w.partitions.clone();
                w.group.streams_changed(&|s| partitions.get(s).copied());
            }
            _ => {}
        }
        w.no_partition_held_twice()?;
    }
    w.settle()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn partitions_are_held_once_and_settle_balanced(actions in prop::collection::vec(action(), 1..60)) {
        run(actions)?;
    }
}
