//! Streams and consumer groups through the broker against a reference model, under random
//! produces, fetches, commits, joins, leaves, heartbeats, session expiries, partition
//! growth, lookups by time and restarts at any step.
//!
//! Checked at every step: every acknowledged record is where its produce said, in order,
//! offsets dense from 0; a fetch from any offset returns exactly the model's records from
//! there; a lookup by time finds the model's first record at or after it; no partition is
//! held by two live members; once members have heartbeated until nothing changes, every
//! partition is held by exactly one; committed offsets survive restarts; lag figures are
//! exactly end minus committed.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tidewater_core::harness::{Harness, HarnessOptions, START_MS};
use tidewater_core::stream::config::StreamPatch;
use tidewater_core::stream::partition::partition_for_key;
use tidewater_core::stream::records::NewStreamRecord;
use tidewater_core::{AckLevel, ErrorCode};

const STREAM: &str = "s";
const GROUPS: [&str; 2] = ["g0", "g1"];
const SESSION_MS: u64 = 10_000;
/// Time passes in steps that never add up to a session exactly.
const STEP_MS: i64 = 3_001;
const MAX_PARTITIONS: u32 = 5;

#[derive(Debug, Clone)]
enum Action {
    /// Records: (key, partition), each `None` or a small number.
    Produce(Vec<(Option<u8>, Option<u8>)>),
    Fetch {
        partition: u8,
        from: u8,
    },
    Commit {
        group: u8,
        partition: u8,
        at: u8,
    },
    Join {
        group: u8,
        slot: u8,
    },
    Leave {
        group: u8,
        slot: u8,
    },
    /// Every member heartbeats (giving up what it is told to, taking what it is given).
    Heartbeat,
    /// Time passes; members that did not heartbeat for a session are removed.
    Advance,
    ByTime {
        partition: u8,
        at: u8,
    },
    Grow,
    Restart,
    Lag {
        group: u8,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        5 => prop::collection::vec((prop::option::of(0u8..20), prop::option::weighted(0.2, 0u8..8)), 1..6)
            .prop_map(Action::Produce),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(partition, from)| Action::Fetch { partition, from }),
        2 => (0u8..2, any::<u8>(), any::<u8>()).prop_map(|(group, partition, at)| Action::Commit { group, partition, at }),
        2 => (0u8..2, 0u8..3).prop_map(|(group, slot)| Action::Join { group, slot }),
        1 => (0u8..2, 0u8..3).prop_map(|(group, slot)| Action::Leave { group, slot }),
        4 => Just(Action::Heartbeat),
        1 => Just(Action::Advance),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(partition, at)| Action::ByTime { partition, at }),
        1 => Just(Action::Grow),
        1 => Just(Action::Restart),
        1 => (0u8..2).prop_map(|group| Action::Lag { group }),
    ]
}

struct Member {
    id: String,
    last_seen: i64,
    owned: BTreeSet<(String, u32)>,
}

#[derive(Default)]
struct Model {
    /// Per partition: (value, timestamp) in offset order.
    records: Vec<Vec<(String, i64)>>,
    committed: BTreeMap<(usize, u32), u64>,
    members: BTreeMap<(usize, u8), Member>,
    produced: u64,
}

fn scaled(n: u64, by: u8) -> u64 {
    n * u64::from(by) / 255
}

fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
        h.broker()
            .put_stream(
                STREAM,
                &StreamPatch {
                    partitions: Some(2),
                    ..StreamPatch::default()
                },
            )
            .await
            .unwrap();
        let mut m = Model {
            records: vec![Vec::new(); 2],
            ..Model::default()
        };
        for (step, action) in actions.into_iter().enumerate() {
            let b = h.broker().clone();
            let n = m.records.len() as u32;
            let now = h.clock.now();
            match action {
                Action::Produce(spec) => {
                    let records: Vec<NewStreamRecord> = spec
                        .iter()
                        .map(|(key, partition)| {
                            m.produced += 1;
                            NewStreamRecord {
                                key: key.map(|k| format!("k{k}").into_bytes()),
                                value: Some(format!("v{}", m.produced).into_bytes()),
                                timestamp: Some(START_MS + m.produced as i64 * 10),
                                partition: partition.map(|p| u32::from(p) % n),
                                ..NewStreamRecord::default()
                            }
                        })
                        .collect();
                    let level = if step % 2 == 0 {
                        AckLevel::Durable
                    } else {
                        AckLevel::Written
                    };
                    let produced = b.produce(STREAM, &records, level).await.unwrap();
                    let mut keyless = BTreeSet::new();
                    for (record, &(p, offset)) in records.iter().zip(&produced.offsets) {
                        let expected = match (&record.partition, &record.key) {
                            (Some(p), _) => Some(*p),
                            (None, Some(key)) => Some(partition_for_key(key, n)),
                            (None, None) => {
                                keyless.insert(p);
                                None
                            }
                        };
                        if let Some(expected) = expected {
                            prop_assert_eq!(p, expected, "step {}: misplaced", step);
                        }
                        let part = &mut m.records[p as usize];
                        prop_assert_eq!(
                            offset,
                            part.len() as u64,
                            "step {}: offsets are dense",
                            step
                        );
                        part.push((
                            String::from_utf8(record.value.clone().unwrap()).unwrap(),
                            record.timestamp.unwrap(),
                        ));
                    }
                    prop_assert!(
                        keyless.len() <= 1,
                        "one produce's keyless records share a partition"
                    );
                }
                Action::Fetch { partition, from } => {
                    let p = u32::from(partition) % n;
                    let expected = &m.records[p as usize];
                    let from = scaled(expected.len() as u64, from);
                    let mut next = from;
                    let mut got = Vec::new();
                    // Written produces become readable once durable: wait for them.
                    b.store().wait_synced();
                    loop {
                        let (records, after, fetched) =
                            b.fetch_records(STREAM, p, next, 200, 0).await.unwrap();
                        prop_assert_eq!(fetched.end_offset, expected.len() as u64);
                        if records.is_empty() {
                            break;
                        }
                        for r in records {
                            got.push((
                                r.offset,
                                String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
                                r.timestamp,
                            ));
                        }
                        next = after;
                    }
                    let want: Vec<(u64, String, i64)> = expected
                        .iter()
                        .enumerate()
                        .skip(from as usize)
                        .map(|(i, (v, t))| (i as u64, v.clone(), *t))
                        .collect();
                    prop_assert_eq!(got, want, "step {}: fetch of {} from {}", step, p, from);
                }
                Action::Commit {
                    group,
                    partition,
                    at,
                } => {
                    let p = u32::from(partition) % n;
                    b.store().wait_synced();
                    let offset = scaled(m.records[p as usize].len() as u64, at);
                    b.commit(GROUPS[group as usize], STREAM, p, offset, "")
                        .await
                        .unwrap();
                    m.committed.insert((group as usize, p), offset);
                }
                Action::Join { group, slot } => {
                    m.members
                        .entry((group as usize, slot))
                        .or_insert_with(|| Member {
                            id: b
                                .join_group(
                                    GROUPS[group as usize],
                                    None,
                                    &[STREAM.to_string()],
                                    SESSION_MS,
                                )
                                .unwrap(),
                            last_seen: now,
                            owned: BTreeSet::new(),
                        });
                }
                Action::Leave { group, slot } => {
                    if let Some(member) = m.members.remove(&(group as usize, slot)) {
                        b.leave_group(GROUPS[group as usize], &member.id).unwrap();
                    }
                }
                Action::Heartbeat => heartbeat_all(&b, &mut m, now)?,
                Action::Advance => {
                    h.advance(STEP_MS).await;
                    let now = h.clock.now();
                    // The broker removes them too (maintenance ran): their ids are unknown now.
                    m.members
                        .retain(|_, member| now - member.last_seen <= SESSION_MS as i64);
                }
                Action::ByTime { partition, at } => {
                    let p = u32::from(partition) % n;
                    b.store().wait_synced();
                    let records = &m.records[p as usize];
                    // A time among the records', or past them all.
                    let time = START_MS + scaled(m.produced * 10 + 20, at) as i64;
                    let expected = records
                        .iter()
                        .position(|(_, t)| *t >= time)
                        .map(|i| i as u64);
                    let got = b.offset_for_time(STREAM, p, time).unwrap();
                    prop_assert_eq!(got, expected, "step {}: by time {} in {}", step, time, p);
                }
                Action::Grow => {
                    if n < MAX_PARTITIONS {
                        b.put_stream(
                            STREAM,
                            &StreamPatch {
                                partitions: Some(n + 1),
                                ..StreamPatch::default()
                            },
                        )
                        .await
                        .unwrap();
                        m.records.push(Vec::new());
                    }
                }
                Action::Restart => {
                    h.restart();
                    // Membership is not durable: every member must join again.
                    for ((g, _), member) in std::mem::take(&mut m.members) {
                        let err = h
                            .broker()
                            .heartbeat(GROUPS[g], &member.id, &member.owned)
                            .unwrap_err();
                        prop_assert!(
                            matches!(
                                err.code,
                                ErrorCode::GroupNotFound | ErrorCode::UnknownMember
                            ),
                            "{:?}",
                            err
                        );
                    }
                }
                Action::Lag { group } => check_lag(&b, &m, group as usize).await?,
            }
            no_partition_held_twice(&m)?;
        }
        // The end: every group's committed offsets and lag are exact, and members that
        // heartbeat until nothing changes hold every partition once.
        let b = h.broker().clone();
        for g in 0..GROUPS.len() {
            check_lag(&b, &m, g).await?;
        }
        let now = h.clock.now();
        for _ in 0..4 {
            heartbeat_all(&b, &mut m, now)?;
        }
        let n = m.records.len() as u32;
        for g in 0..GROUPS.len() {
            let held: Vec<&(String, u32)> = m
                .members
                .iter()
                .filter(|((group, _), _)| *group == g)
                .flat_map(|(_, member)| member.owned.iter())
                .collect();
            if m.members.keys().any(|(group, _)| *group == g) {
                let partitions: BTreeSet<u32> = held.iter().map(|tp| tp.1).collect();
                prop_assert_eq!(
                    held.len() as u32,
                    n,
                    "group {} holds each partition once",
                    g
                );
                prop_assert_eq!(partitions, (0..n).collect::<BTreeSet<_>>());
            }
        }
        // Committed offsets survive a restart (membership does not).
        h.restart();
        m.members.clear();
        for g in 0..GROUPS.len() {
            check_lag(h.broker(), &m, g).await?;
        }
        Ok(())
    })
}

fn heartbeat_all(b: &tidewater_core::Broker, m: &mut Model, now: i64) -> Result<(), TestCaseError> {
    for ((g, _), member) in m.members.iter_mut() {
        let assignment = b
            .heartbeat(GROUPS[*g], &member.id, &member.owned)
            .map_err(|e| TestCaseError::fail(format!("a live member's heartbeat: {e:?}")))?;
        member.last_seen = now;
        for tp in &assignment.revoked {
            member.owned.remove(tp);
        }
        member.owned.extend(assignment.assigned);
    }
    Ok(())
}

fn no_partition_held_twice(m: &Model) -> Result<(), TestCaseError> {
    for g in 0..GROUPS.len() {
        let mut seen = BTreeSet::new();
        for ((group, _), member) in &m.members {
            if *group == g {
                for tp in &member.owned {
                    prop_assert!(seen.insert(tp.clone()), "group {}: {:?} held twice", g, tp);
                }
            }
        }
    }
    Ok(())
}

async fn check_lag(b: &tidewater_core::Broker, m: &Model, g: usize) -> Result<(), TestCaseError> {
    b.store().wait_synced();
    let expected: BTreeMap<u32, (u64, u64)> = m
        .committed
        .iter()
        .filter(|((group, _), _)| *group == g)
        .map(|((_, p), &c)| {
            let end = m.records[*p as usize].len() as u64;
            (*p, (c, end - c))
        })
        .collect();
    if expected.is_empty() && m.members.keys().all(|(group, _)| *group != g) {
        return Ok(());
    }
    let info = b
        .describe_group(GROUPS[g])
        .await
        .map_err(|e| TestCaseError::fail(format!("describe {}: {e:?}", GROUPS[g])))?;
    let got: BTreeMap<u32, (u64, u64)> = info
        .offsets
        .iter()
        .map(|o| (o.partition, (o.committed, o.lag)))
        .collect();
    prop_assert_eq!(
        got,
        expected,
        "group {}: committed offsets and lag",
        GROUPS[g]
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn streams_and_groups_match_the_model(actions in prop::collection::vec(action(), 1..50)) {
        run(actions)?;
    }
}
