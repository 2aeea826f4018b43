//! Store behaviour across reopen, torn tails, checkpoints and retention.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::Duration;

use tidewater_storage::{
    AckLevel, BatchBuilder, NewRecord, Op, OpResult, Store, StoreOptions, WriteError,
};

fn opts() -> StoreOptions {
    StoreOptions {
        fsync: false,
        checkpoint_interval: Duration::from_secs(3600),
        ..StoreOptions::default()
    }
}

fn batch(uid: u64, bodies: &[&str]) -> Vec<u8> {
    let mut builder = BatchBuilder::new(uid, 1_000);
    for body in bodies {
        builder.push(&NewRecord {
            id: body.as_bytes(),
            body: body.as_bytes(),
            ..Default::default()
        });
    }
    builder.finish()
}

fn create(store: &Store, name: &str) -> u64 {
    match store
        .submit_wait(
            vec![Op::CreateLog {
                name: name.into(),
                config: "{}".into(),
                id_window: None,
            }],
            AckLevel::Durable,
        )
        .unwrap()[0]
    {
        OpResult::Created { uid } => uid,
        ref other => panic!("unexpected {other:?}"),
    }
}

/// Appends one batch durably; returns where it landed.
fn append(store: &Store, uid: u64, bodies: &[&str]) -> OpResult {
    let mut results = store
        .submit_wait(
            vec![Op::Append {
                uid,
                batch: batch(uid, bodies),
            }],
            AckLevel::Durable,
        )
        .unwrap();
    results.remove(0)
}

fn appended(base_offset: u64, count: u32) -> OpResult {
    OpResult::Appended { base_offset, count }
}

fn bodies(store: &Store, uid: u64, from: u64) -> Vec<String> {
    let reader = store.reader(uid).unwrap();
    reader
        .read(from, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect()
}

#[test]
fn appended_batches_survive_reopen_with_offsets_and_settled_state() {
    let dir = tempfile::tempdir().unwrap();
    let uid;
    {
        let (store, recovered) = Store::open(dir.path(), opts()).unwrap();
        assert!(recovered.is_empty());
        uid = create(&store, "orders");
        // Remember client ids for a minute, at most 3 of them.
        store
            .submit_wait(
                vec![Op::IdWindow {
                    uid,
                    window_ms: 60_000,
                    max: 3,
                }],
                AckLevel::Durable,
            )
            .unwrap();
        assert_eq!(append(&store, uid, &["a", "b", "c"]), appended(0, 3));
        let second = store
            .submit_wait(
                vec![Op::Append {
                    uid,
                    batch: batch(uid, &["d"]),
                }],
                AckLevel::Written,
            )
            .unwrap();
        assert_eq!(
            second,
            vec![OpResult::Appended {
                base_offset: 3,
                count: 1
            }]
        );
        store
            .submit_wait(
                vec![Op::Settle {
                    uid,
                    ranges: vec![0..1, 2..3],
                }],
                AckLevel::Durable,
            )
            .unwrap();
        store
            .submit_wait(
                vec![Op::Retry {
                    uid,
                    offset: 1,
                    deliver_at_ms: 50,
                    delivery_count: 2,
                    at_ms: 40,
                    error: "nope".into(),
                }],
                AckLevel::Durable,
            )
            .unwrap();
        assert_eq!(bodies(&store, uid, 0), ["a", "b", "c", "d"]);
        assert_eq!(bodies(&store, uid, 2), ["c", "d"]);
        // No clean shutdown: drop the process state by leaking the store's threads' work.
        std::mem::forget(store);
    }
    // The leaked store still holds the flock; a reopen in the same process must wait for it,
    // so exercise recovery from journal-only state via a copy of the directory.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    fs::remove_file(copy.path().join("LOCK")).unwrap();
    let (store, recovered) = Store::open(copy.path(), opts()).unwrap();
    assert_eq!(recovered.len(), 1);
    let log = &recovered[0];
    assert_eq!(
        (log.uid, log.name.as_str(), log.next_offset, log.ack_floor),
        (uid, "orders", 4, 1)
    );
    assert!(log.settled.contains(2));
    assert_eq!(log.retries[&1].delivery_count, 2);
    assert_eq!(log.retries[&1].errors[0].1, "nope");
    let ids: Vec<&[u8]> = log.recent_ids.ids.iter().map(|(_, id)| &id[..]).collect();
    assert_eq!(ids, [b"b", b"c", b"d"], "replayed ids, bounded by max");
    assert_eq!(log.recent_ids.window_ms, 60_000);
    // Settled offsets are still readable until their segment is deleted.
    assert_eq!(bodies(&store, uid, 0), ["a", "b", "c", "d"]);
    assert_eq!(append(&store, uid, &["e"]), appended(4, 1));
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for item in fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            fs::create_dir_all(&target).unwrap();
            copy_dir(&item.path(), &target);
        } else {
            fs::copy(item.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_torn_journal_tail_is_cut_and_earlier_entries_kept() {
    let dir = tempfile::tempdir().unwrap();
    let uid;
    {
        let (store, _) = Store::open(dir.path(), opts()).unwrap();
        uid = create(&store, "q");
        append(&store, uid, &["one", "two"]);
        std::mem::forget(store);
    }
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    fs::remove_file(copy.path().join("LOCK")).unwrap();
    // Garbage and a half entry after the last good one, and the segment lost its tail.
    let journal_dir = copy.path().join("journal");
    let newest = fs::read_dir(&journal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let mut file = OpenOptions::new().append(true).open(&newest).unwrap();
    file.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 4, 9, 9])
        .unwrap();
    drop(file);
    let log_dir = fs::read_dir(copy.path().join("logs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let seg = fs::read_dir(&log_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let len = fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 3)
        .unwrap();

    let (store, recovered) = Store::open(copy.path(), opts()).unwrap();
    assert_eq!(recovered[0].next_offset, 2);
    assert_eq!(bodies(&store, uid, 0), ["one", "two"]);
    assert_eq!(append(&store, uid, &["three"]), appended(2, 1));
    drop(store);
    let (store, _) = Store::open(copy.path(), opts()).unwrap();
    assert_eq!(bodies(&store, uid, 0), ["one", "two", "three"]);
}

#[test]
fn settled_segments_are_deleted_at_checkpoint_and_reads_skip_them() {
    let dir = tempfile::tempdir().unwrap();
    let small = StoreOptions {
        segment_roll_bytes: 1024,
        journal_roll_bytes: 16 << 10,
        ..opts()
    };
    let (store, _) = Store::open(dir.path(), small.clone()).unwrap();
    let uid = create(&store, "q");
    let body = "x".repeat(200);
    for _ in 0..200 {
        append(&store, uid, &[&body]);
    }
    let log_dir = fs::read_dir(dir.path().join("logs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let segments_before = fs::read_dir(&log_dir).unwrap().count();
    assert!(segments_before > 10, "{segments_before} segments");
    store
        .submit_wait(
            vec![Op::Settle {
                uid,
                ranges: vec![0..190],
            }],
            AckLevel::Durable,
        )
        .unwrap();
    // Enough journal traffic to roll the journal and so checkpoint.
    for _ in 0..400 {
        store
            .submit_wait(
                vec![Op::Settle {
                    uid,
                    ranges: vec![0..190],
                }],
                AckLevel::Durable,
            )
            .unwrap();
    }
    let segments_after = fs::read_dir(&log_dir).unwrap().count();
    assert!(
        segments_after < 5,
        "{segments_before} -> {segments_after} segments"
    );
    let remaining = store
        .reader(uid)
        .unwrap()
        .read(0, usize::MAX, usize::MAX)
        .unwrap();
    assert!(remaining.first().unwrap().offset <= 190 && remaining.last().unwrap().offset == 199);
    drop(store);
    let (_store, recovered) = Store::open(dir.path(), small).unwrap();
    assert_eq!(
        (recovered[0].ack_floor, recovered[0].next_offset),
        (190, 200)
    );
}

#[test]
fn a_refused_request_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    let uid = create(&store, "q");
    let mut bad = batch(uid, &["x"]);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(
        store
            .submit_wait(vec![Op::Append { uid, batch: bad }], AckLevel::Durable)
            .is_err()
    );
    assert!(
        store
            .submit_wait(
                vec![Op::Settle {
                    uid,
                    ranges: vec![0..5]
                }],
                AckLevel::Durable
            )
            .is_err()
    );
    assert!(
        store
            .submit_wait(
                vec![Op::Append {
                    uid: 99,
                    batch: batch(99, &["x"])
                }],
                AckLevel::Durable
            )
            .is_err()
    );
    assert_eq!(append(&store, uid, &["y"]), appended(0, 1));
    drop(store);
    let (store, recovered) = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(recovered[0].next_offset, 1);
    assert_eq!(bodies(&store, uid, 0), ["y"]);
}

#[test]
fn deleted_logs_lose_their_files_and_stay_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    let keep = create(&store, "keep");
    let gone = create(&store, "gone");
    store
        .submit_wait(
            vec![Op::Append {
                uid: gone,
                batch: batch(gone, &["x"]),
            }],
            AckLevel::Durable,
        )
        .unwrap();
    store
        .submit_wait(vec![Op::DeleteLog { uid: gone }], AckLevel::Durable)
        .unwrap();
    assert!(store.reader(gone).is_none());
    drop(store);
    let (_store, recovered) = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(
        recovered.iter().map(|l| l.uid).collect::<Vec<_>>(),
        vec![keep]
    );
    assert_eq!(fs::read_dir(dir.path().join("logs")).unwrap().count(), 1);
}

#[test]
fn a_failed_fsync_poisons_the_store_and_is_never_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    // fsync #1 covers the create; #2 fails.
    let options = StoreOptions {
        fsync: true,
        fail_fsync_at: Some(2),
        ..opts()
    };
    let (store, _) = Store::open(dir.path(), options).unwrap();
    let fatal_calls = Arc::new(AtomicUsize::new(0));
    let counter = fatal_calls.clone();
    store.set_fatal_listener(Arc::new(move |what| {
        assert!(what.contains("fdatasync"), "{what}");
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    let uid = create(&store, "q");
    let failed = store.submit_wait(
        vec![Op::Append {
            uid,
            batch: batch(uid, &["lost?"]),
        }],
        AckLevel::Durable,
    );
    // Written before the failed sync: its outcome is unknown, and the reply says so.
    assert!(
        matches!(failed, Err(tidewater_storage::WriteError::SyncFailed)),
        "{failed:?}"
    );
    assert!(store.is_poisoned());
    for level in [AckLevel::Durable, AckLevel::Written] {
        let refused = store.submit_wait(
            vec![Op::Append {
                uid,
                batch: batch(uid, &["after"]),
            }],
            level,
        );
        assert!(
            matches!(refused, Err(tidewater_storage::WriteError::Poisoned)),
            "{refused:?}"
        );
    }
    assert_eq!(
        fatal_calls.load(Ordering::SeqCst),
        1,
        "the fatal listener runs once"
    );
    drop(store);
    // A restart recovers from the journal: the write whose fsync failed was never acknowledged,
    // so whether it is there or not, the store opens and accepts writes again.
    let (store, recovered) = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(recovered.len(), 1);
    assert!(
        store
            .submit_wait(
                vec![Op::Append {
                    uid,
                    batch: batch(uid, &["again"])
                }],
                AckLevel::Durable
            )
            .is_ok()
    );
}

/// Reads of a few records copy about those records (from the record mark before them),
/// not the rest of their batch: a read that filters with `want` once ran to the end of
/// the batch, and a one-record read copied a 64 KiB chunk.
#[test]
fn reads_stop_near_the_records_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    let uid = create(&store, "amplification");
    let bodies: Vec<String> = (0..5_000).map(|i| format!("{i:0>150}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    assert_eq!(append(&store, uid, &refs), appended(0, 5_000));
    let reader = store.reader(uid).unwrap();
    let record = reader.disk_bytes() / 5_000;
    let cost = |read: &dyn Fn() -> usize, expect: usize| {
        let before = reader.bytes_read();
        assert_eq!(read(), expect);
        reader.bytes_read() - before
    };
    // Every other record of 100 (a fairness round's picks), then a single record.
    let picks: Vec<u64> = (1_000..1_100).step_by(2).collect();
    let want = |o: u64| picks.binary_search(&o).is_ok();
    let spread = cost(
        &|| reader.read_where(1_000, 1_100, &want).unwrap().len(),
        50,
    );
    assert!(
        spread < 2 * 100 * record,
        "{spread} bytes read for 100 records"
    );
    let one = cost(&|| reader.read(2_500, 1, 1).unwrap().len(), 1);
    assert!(one <= 8 * 1024, "{one} bytes read for one record");
    let run = cost(&|| reader.read(3_000, 500, usize::MAX).unwrap().len(), 500);
    assert!(run < 2 * 500 * record, "{run} bytes read for 500 records");
}

#[test]
fn single_records_are_read_from_inside_large_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    let uid = create(&store, "big");
    let bodies: Vec<String> = (0..3_000).map(|i| format!("{i:0>120}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    assert_eq!(append(&store, uid, &refs[..1_000]), appended(0, 1_000));
    assert_eq!(append(&store, uid, &refs[1_000..]), appended(1_000, 2_000));
    let reader = store.reader(uid).unwrap();
    for offset in (0..3_000).step_by(7).chain([999, 1_000, 2_999]) {
        let got = reader.read(offset, 1, 1).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].offset, offset);
        assert_eq!(got[0].body, bodies[offset as usize].as_bytes());
        assert_eq!(got[0].published_at_ms, 1_000);
    }
    let picked = reader.read_where(10, 2_600, &|o| o % 500 == 0).unwrap();
    let offsets: Vec<u64> = picked.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [500, 1_000, 1_500, 2_000, 2_500]);
    assert_eq!(picked[2].body, bodies[1_500].as_bytes());
    let span = reader.read(995, 10, usize::MAX).unwrap();
    let offsets: Vec<u64> = span.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (995..1_005).collect::<Vec<_>>());
    drop(reader);
    store.shutdown();
    drop(store);
    // The same after reopening (marks rebuilt by the scan at open).
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    let reader = store.reader(uid).unwrap();
    for offset in [0, 1, 1_500, 2_998] {
        assert_eq!(reader.read(offset, 1, 1).unwrap()[0].offset, offset);
    }
}

/// Counts the fatal listener's calls and keeps the last reason.
fn fatal_counter(store: &Store) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = calls.clone();
    store.set_fatal_listener(std::sync::Arc::new(move |what| {
        seen.lock().unwrap().push(what.to_string());
    }));
    calls
}

/// A panic on the writer thread poisons the store (readiness reads `is_poisoned`), calls
/// the fatal listener, and every later write is refused instead of queued for nobody.
#[test]
fn a_panic_on_the_writer_thread_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let faults = std::sync::Arc::new(tidewater_storage::Faults::default());
    let options = StoreOptions {
        faults: faults.clone(),
        ..opts()
    };
    let (store, _) = Store::open(dir.path(), options).unwrap();
    let fatal = fatal_counter(&store);
    let uid = create(&store, "q");
    assert_eq!(append(&store, uid, &["before"]), appended(0, 1));
    faults
        .panic_writer
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = store.submit_wait(
        vec![Op::Append {
            uid,
            batch: batch(uid, &["during"]),
        }],
        AckLevel::Durable,
    );
    assert!(failed.is_err(), "{failed:?}");
    // The round's requests are dropped while the thread unwinds, just before it poisons.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // (The listener runs just after the store is marked poisoned.)
    while fatal.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(store.is_poisoned());
    let reasons = fatal.lock().unwrap().clone();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("writer thread panicked"), "{reasons:?}");
    assert_eq!(store.poison_reason().as_deref(), Some(reasons[0].as_str()));
    for level in [AckLevel::Durable, AckLevel::Written] {
        let refused = store.submit_wait(
            vec![Op::Append {
                uid,
                batch: batch(uid, &["after"]),
            }],
            level,
        );
        assert!(
            matches!(refused, Err(tidewater_storage::WriteError::Poisoned)),
            "{refused:?}"
        );
    }
    // A listener set after the fact still hears of it (the server sets its own after open).
    let late = fatal_counter(&store);
    assert_eq!(
        late.lock().unwrap().len(),
        0,
        "the fatal listener runs once"
    );
    drop(store);
    let (store, recovered) = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(recovered[0].next_offset, 1);
    assert_eq!(bodies(&store, uid, 0), ["before"]);
}

/// A panic on the syncer thread poisons the store: durable writes are answered (refused),
/// not left waiting for a sync that will never come.
#[test]
fn a_panic_on_the_syncer_thread_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let faults = std::sync::Arc::new(tidewater_storage::Faults::default());
    let options = StoreOptions {
        faults: faults.clone(),
        ..opts()
    };
    let (store, _) = Store::open(dir.path(), options).unwrap();
    let uid = create(&store, "q");
    faults
        .panic_syncer
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = store.submit_wait(
        vec![Op::Append {
            uid,
            batch: batch(uid, &["during"]),
        }],
        AckLevel::Durable,
    );
    assert!(
        matches!(failed, Err(tidewater_storage::WriteError::Poisoned)),
        "{failed:?}"
    );
    assert!(store.is_poisoned());
    // Set after the poisoning: called at once.
    let fatal = fatal_counter(&store);
    let reasons = fatal.lock().unwrap().clone();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("syncer thread panicked"), "{reasons:?}");
    for level in [AckLevel::Durable, AckLevel::Written] {
        let refused = store.submit_wait(
            vec![Op::Append {
                uid,
                batch: batch(uid, &["after"]),
            }],
            level,
        );
        assert!(
            matches!(refused, Err(tidewater_storage::WriteError::Poisoned)),
            "{refused:?}"
        );
    }
}

/// A checkpoint that cannot open its directory (no file descriptor left) is not a failed
/// fsync: it is counted, retried a second later, and the store goes on. Nothing it would
/// replace is deleted until the directory is fsynced.
#[test]
fn a_checkpoint_that_cannot_open_its_directory_is_retried_not_fatal() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let faults = std::sync::Arc::new(tidewater_storage::Faults::default());
    let options = StoreOptions {
        fsync: true,
        checkpoint_interval: Duration::from_millis(20),
        faults: faults.clone(),
        ..opts()
    };
    let (store, _) = Store::open(dir.path(), options.clone()).unwrap();
    let fatal = fatal_counter(&store);
    faults
        .checkpoint_dir_open_failures
        .store(2, Ordering::SeqCst);
    let uid = create(&store, "q");
    assert_eq!(append(&store, uid, &["a"]), appended(0, 1));
    let count = |sub: &str| fs::read_dir(dir.path().join(sub)).unwrap().count();
    let mut next = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (faults.checkpoint_dir_open_failures.load(Ordering::SeqCst) > 0
        || count("journal") > 1
        || count("checkpoint") > 1)
        && std::time::Instant::now() < deadline
    {
        assert!(!store.is_poisoned(), "{:?}", store.poison_reason());
        next += 1;
        assert_eq!(append(&store, uid, &["more"]), appended(next, 1));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        faults.checkpoint_dir_open_failures.load(Ordering::SeqCst),
        0
    );
    assert_eq!(store.checkpoint_failures(), 2);
    assert!(!store.is_poisoned(), "{:?}", store.poison_reason());
    assert!(fatal.lock().unwrap().is_empty());
    assert_eq!((count("journal"), count("checkpoint")), (1, 1));
    drop(store);
    let (_store, recovered) = Store::open(dir.path(), options).unwrap();
    assert_eq!(recovered[0].next_offset, next + 1);
}

/// Every new name (log directory, segment, journal, checkpoint) is followed by an fsync of
/// its directory before anything depends on it; a checkpoint's rename is preceded by a
/// sync of the journal that recovery would replay if the rename were lost. (A log
/// directory's parent was not fsynced: after a power loss the checkpointed log could vanish.)
#[test]
fn new_names_are_made_durable_by_a_directory_fsync() {
    use tidewater_storage::FsOp;
    let dir = tempfile::tempdir().unwrap();
    let faults = std::sync::Arc::new(tidewater_storage::Faults::default());
    faults
        .record_fs_ops
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let options = StoreOptions {
        fsync: true,
        segment_roll_bytes: 1024,
        journal_roll_bytes: 16 << 10,
        faults: faults.clone(),
        ..opts()
    };
    let data = dir.path().join("data");
    let (store, _) = Store::open(&data, options.clone()).unwrap();
    let uid = create(&store, "q");
    let body = "x".repeat(200);
    for _ in 0..100 {
        append(&store, uid, &[&body]);
    }
    drop(store);
    // Recovery of a log created after the last checkpoint recreates its directory.
    let (store, _) = Store::open(&data, options).unwrap();
    create(&store, "r");
    drop(store);
    let ops = faults.fs_ops.lock().unwrap().clone();
    let synced_after = |at: usize, dir: &std::path::Path| {
        ops[at + 1..]
            .iter()
            .any(|op| matches!(op, FsOp::SyncDir(d) if d == dir))
    };
    let mut checked = 0;
    for (at, op) in ops.iter().enumerate() {
        let path = match op {
            FsOp::CreateDir(p) | FsOp::CreateFile(p) | FsOp::Rename { to: p, .. } => p,
            _ => continue,
        };
        let parent = path.parent().unwrap();
        assert!(
            synced_after(at, parent),
            "{op:?} is not followed by an fsync of {}",
            parent.display()
        );
        checked += 1;
    }
    let created_logs = ops
        .iter()
        .filter(|op| matches!(op, FsOp::CreateDir(p) if p.parent().unwrap().ends_with("logs")))
        .count();
    assert!(created_logs >= 2, "{ops:#?}");
    assert!(checked > 10, "{ops:#?}");
    for (at, op) in ops.iter().enumerate() {
        if let FsOp::Rename { .. } = op {
            assert!(
                ops[..at]
                    .iter()
                    .rev()
                    .take_while(|op| !matches!(op, FsOp::Rename { .. }))
                    .any(|op| matches!(op, FsOp::SyncFile(p) if p.extension().unwrap() == "jnl")),
                "{op:?} without a sync of the journal before it"
            );
        }
    }
}

/// A store with 20 single-message segments (offsets 0..20) of log "q", cleanly shut down.
fn twenty_segments(dir: &std::path::Path) -> (u64, std::path::PathBuf, Vec<std::path::PathBuf>) {
    let options = StoreOptions {
        segment_roll_bytes: 60,
        ..opts()
    };
    let (store, _) = Store::open(dir, options).unwrap();
    let uid = create(&store, "q");
    for i in 0..20 {
        let body = format!("m{i:02}");
        assert_eq!(append(&store, uid, &[&body]), appended(i, 1));
    }
    // Offsets 5..7 are acked: nothing is lost if they are missing.
    store
        .submit_wait(
            vec![Op::Settle {
                uid,
                ranges: vec![5..7],
            }],
            AckLevel::Durable,
        )
        .unwrap();
    drop(store);
    let log_dir = dir.join("logs").join(format!("{uid:016x}"));
    let mut segments: Vec<_> = fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert_eq!(segments.len(), 20, "{segments:?}");
    (uid, log_dir, segments)
}

fn repair_opts() -> StoreOptions {
    StoreOptions {
        repair_missing: true,
        ..opts()
    }
}

/// Opens, expecting a refusal that names the log, the place and the offsets; then repairs,
/// checks the report, and reopens without the repair option (nothing unsettled is missing
/// any more). Returns the store after the repair.
fn refused_then_repaired(
    dir: &std::path::Path,
    uid: u64,
    place: &str,
    expect: Vec<std::ops::Range<u64>>,
) -> Store {
    let err = match Store::open(dir, opts()) {
        Err(err) => err,
        Ok(_) => panic!("opened with missing data"),
    };
    let text = err.to_string();
    let tidewater_storage::OpenError::Missing(missing) = err else {
        panic!("{text}");
    };
    assert_eq!(missing.len(), 1, "{text}");
    assert_eq!(missing[0].log_uid, uid);
    assert_eq!(missing[0].offsets, expect, "{text}");
    assert!(text.contains("log 'q'"), "{text}");
    assert!(text.contains(place), "{text}");
    assert!(text.contains("repair_missing"), "{text}");
    {
        let (store, _) = Store::open(dir, repair_opts()).unwrap();
        let report = store.repair_report();
        assert_eq!(report.len(), 1, "{report:?}");
        assert_eq!(report[0].offsets, expect);
    }
    let (store, recovered) = Store::open(dir, opts()).unwrap();
    assert!(store.repair_report().is_empty());
    for range in &expect {
        for offset in range.clone() {
            assert!(
                offset < recovered[0].ack_floor || recovered[0].settled.contains(offset),
                "dropped offset {offset} is settled"
            );
        }
    }
    assert_eq!(recovered[0].next_offset, 20);
    store
}

fn offsets(store: &Store, uid: u64) -> Vec<u64> {
    let reader = store.reader(uid).unwrap();
    let records = reader.read(0, usize::MAX, usize::MAX).unwrap();
    records.iter().map(|r| r.offset).collect()
}

#[test]
fn a_missing_log_directory_refuses_the_open_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, log_dir, _) = twenty_segments(dir.path());
    fs::remove_dir_all(&log_dir).unwrap();
    let store = refused_then_repaired(dir.path(), uid, "directory is missing", vec![0..5, 7..20]);
    assert!(offsets(&store, uid).is_empty());
    assert_eq!(append(&store, uid, &["new"]), appended(20, 1));
    assert_eq!(offsets(&store, uid), [20]);
}

#[test]
fn missing_leading_segments_refuse_the_open_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, _, segments) = twenty_segments(dir.path());
    for segment in &segments[..3] {
        fs::remove_file(segment).unwrap();
    }
    let store = refused_then_repaired(dir.path(), uid, "00000000000000000003.seg", vec![0..3]);
    assert_eq!(offsets(&store, uid), (3..20).collect::<Vec<_>>());
}

#[test]
fn missing_middle_segments_refuse_the_open_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, _, segments) = twenty_segments(dir.path());
    for segment in &segments[4..10] {
        fs::remove_file(segment).unwrap();
    }
    let store = refused_then_repaired(
        dir.path(),
        uid,
        "00000000000000000003.seg ends at offset 4",
        vec![4..5, 7..10],
    );
    let expect: Vec<u64> = (0..4).chain(10..20).collect();
    assert_eq!(offsets(&store, uid), expect);
}

#[test]
fn missing_trailing_segments_and_a_cut_segment_refuse_the_open_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, _, segments) = twenty_segments(dir.path());
    for segment in &segments[17..] {
        fs::remove_file(segment).unwrap();
    }
    // The segment of offset 12 loses half of its batch.
    let len = fs::metadata(&segments[12]).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&segments[12])
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = match Store::open(dir.path(), opts()) {
        Err(err) => err.to_string(),
        Ok(_) => panic!("opened with missing data"),
    };
    assert!(err.contains("offsets 12..13"), "{err}");
    assert!(err.contains("offsets 17..20"), "{err}");
    let (store, _) = Store::open(dir.path(), repair_opts()).unwrap();
    let dropped: Vec<_> = store
        .repair_report()
        .iter()
        .flat_map(|m| m.offsets.clone())
        .collect();
    assert_eq!(dropped, [12..13, 17..20]);
    let expect: Vec<u64> = (0..12).chain(13..17).collect();
    assert_eq!(offsets(&store, uid), expect);
    assert_eq!(append(&store, uid, &["new"]), appended(20, 1));
    drop(store);
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    let expect: Vec<u64> = (0..12).chain(13..17).chain([20]).collect();
    assert_eq!(offsets(&store, uid), expect);
}

/// Missing files that held only settled messages lose nothing: the open goes on.
#[test]
fn missing_settled_segments_are_no_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, _, segments) = twenty_segments(dir.path());
    for segment in &segments[5..7] {
        fs::remove_file(segment).unwrap();
    }
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    assert!(store.repair_report().is_empty());
    let expect: Vec<u64> = (0..5).chain(7..20).collect();
    assert_eq!(offsets(&store, uid), expect);
}

/// Options for a store on the simulated disk: every write fdatasynced, no checkpoints of
/// the writer's own, one request per round.
fn sim_opts(fs: &tidewater_storage::sim::SimFs) -> StoreOptions {
    StoreOptions {
        fsync: true,
        journal_roll_bytes: u64::MAX,
        checkpoint_interval: Duration::from_secs(86_400 * 365),
        fs: std::sync::Arc::new(fs.clone()),
        lockstep: true,
        ..StoreOptions::default()
    }
}

/// On a fresh simulated disk: logs `src` (three records) and `dst`, then, each as one
/// request, a move (a copy appended to `dst`, the original settled in `src`) and a create
/// with an id window. Returns the disk, the path of the last journal and the journal
/// positions before the move, between the two requests and after the create.
fn move_then_create(seed: u64) -> (tidewater_storage::sim::SimFs, std::path::PathBuf, [u64; 3]) {
    use tidewater_storage::Fs;
    let fs = tidewater_storage::sim::SimFs::new(seed);
    let data = std::path::Path::new("/data");
    fs.create_dir_durable(data).unwrap();
    let (store, _) = Store::open(data, sim_opts(&fs)).unwrap();
    let jdir = data.join("journal");
    let last = fs.read_dir(&jdir).unwrap().into_iter().max().unwrap();
    let journal = jdir.join(last);
    let journal_len = || fs.read(&journal).unwrap().len() as u64;
    let src = create(&store, "src");
    let dst = create(&store, "dst");
    append(&store, src, &["a", "b", "c"]);
    let before = journal_len();
    let move_ops = vec![
        Op::Append {
            uid: dst,
            batch: batch(dst, &["b"]),
        },
        Op::Settle {
            uid: src,
            ranges: vec![1..2],
        },
    ];
    store.submit_wait(move_ops, AckLevel::Durable).unwrap();
    let between = journal_len();
    let create_op = Op::CreateLog {
        name: "windowed".into(),
        config: "{}".into(),
        id_window: Some((60_000, 100)),
    };
    store
        .submit_wait(vec![create_op], AckLevel::Durable)
        .unwrap();
    store.wait_synced();
    let after = journal_len();
    fs.cut_now();
    drop(store);
    fs.power_loss();
    (fs, journal, [before, between, after])
}

/// A power loss keeps a prefix of a request's journal write (or its length with zeros past
/// the tear): replay must apply the request whole or not at all. A move kept in part used
/// to leave the copy without the settle (a duplicate); a create kept in part, the log
/// without its id window (deduplication off).
#[test]
fn a_request_torn_anywhere_in_its_journal_write_recovers_all_or_nothing() {
    use tidewater_storage::{Fs, OpenHow};
    let (_, _, [before, between, after]) = move_then_create(1);
    assert!(before < between && between < after);
    for cut in before..=after {
        for zeroed in [false, true] {
            let (fs, journal, _) = move_then_create(1);
            let file = fs.open(&journal, OpenHow::READ_WRITE).unwrap();
            assert_eq!(file.size().unwrap(), after);
            // Zeros over zeros change nothing: the write is torn where the first byte
            // that differs is lost.
            let original = fs.read(&journal).unwrap();
            let torn_at = if zeroed {
                (cut..after)
                    .find(|&i| original[i as usize] != 0)
                    .unwrap_or(after)
            } else {
                cut
            };
            if zeroed {
                file.write_all_at(&vec![0; (after - cut) as usize], cut)
                    .unwrap();
            } else {
                file.set_len(cut).unwrap();
            }
            file.sync_all().unwrap();
            drop(file);
            let data = std::path::Path::new("/data");
            let (store, logs) = Store::open(data, sim_opts(&fs))
                .unwrap_or_else(|e| panic!("cut at {cut} (zeroed: {zeroed}): {e}"));
            let what = format!("journal cut at {cut} of {before}..{after} (zeroed: {zeroed})");
            let (src, dst) = (&logs[0], &logs[1]);
            assert_eq!((src.name.as_str(), dst.name.as_str()), ("src", "dst"));
            let moved = torn_at >= between;
            assert_eq!(dst.next_offset, moved as u64, "{what}");
            assert_eq!(src.settled.contains(1), moved, "{what}: the settle");
            assert_eq!(src.unsettled(), 3 - moved as u64, "{what}");
            assert_eq!(bodies(&store, dst.uid, 0).len(), moved as usize, "{what}");
            let created = torn_at == after;
            assert_eq!(logs.len(), 2 + created as usize, "{what}");
            if created {
                let w = &logs[2].recent_ids;
                assert_eq!((w.window_ms, w.max), (60_000, 100), "{what}");
            }
        }
    }
}

/// An entry that checks out (length and CRC) but whose kind this version does not know was
/// written by a newer version, not torn by a power loss: the open refuses, naming it, and
/// leaves the journal as it is. (It used to be cut off as a torn tail when in the last
/// journal: acknowledged entries lost without a word on a downgrade.)
#[test]
fn an_intact_entry_of_an_unknown_kind_refuses_the_open_even_in_the_last_journal() {
    use tidewater_storage::{Fs, OpenError, OpenHow};
    let (fs, journal, [_, _, after]) = move_then_create(2);
    let body = [99u8, 1, 2, 3];
    let mut entry = Vec::new();
    entry.extend_from_slice(&(body.len() as u32).to_le_bytes());
    entry.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    entry.extend_from_slice(&body);
    let file = fs.open(&journal, OpenHow::READ_WRITE).unwrap();
    file.write_all_at(&entry, after).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let data = std::path::Path::new("/data");
    match Store::open(data, sim_opts(&fs)) {
        Err(OpenError::Corrupt {
            path,
            position,
            reason,
        }) => {
            assert_eq!((path, position), (journal.clone(), after));
            assert!(reason.contains("unknown"), "{reason}");
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("opened, past an entry it does not know"),
    }
    assert_eq!(fs.read(&journal).unwrap().len() as u64, after + 8 + 4);
}

/// Checkpoints are written as version 03 (the journals after them may hold groups, which a
/// binary knowing only 02 must refuse rather than cut off); version 02 still reads, and so
/// do the journals written before groups (single entries are unchanged).
#[test]
fn checkpoints_are_written_as_03_or_04_with_views_and_02_still_reads() {
    use tidewater_storage::fuzzing::{decode_checkpoint, encode_checkpoint};
    let log = tidewater_storage::LogState::new(4, "q".into(), "{}".into());
    let mut bytes = encode_checkpoint(5, &[&log]);
    assert_eq!(&bytes[..8], b"TWCKPT03");
    bytes[..8].copy_from_slice(b"TWCKPT02");
    let (next_uid, logs) = decode_checkpoint(&bytes).unwrap();
    assert_eq!((next_uid, logs), (5, vec![log.clone()]));
    bytes[..8].copy_from_slice(b"TWCKPT05");
    assert!(decode_checkpoint(&bytes).is_err());
    // A view needs version 04 (each log's source); 04 reads back what it wrote.
    let mut view = tidewater_storage::LogState::new(5, "#sub/q/s/0".into(), String::new());
    view.source = Some(4);
    let bytes = encode_checkpoint(6, &[&log, &view]);
    assert_eq!(&bytes[..8], b"TWCKPT04");
    assert_eq!(decode_checkpoint(&bytes).unwrap(), (6, vec![log, view]));
}

/// Until this process has a version 03 checkpoint in place (the open's checkpoint failed:
/// here, its directory could not be opened for the fsync), a multi-entry request is written
/// unframed, as before groups: an older binary recovering from the version 02 checkpoint
/// would otherwise cut the journal at the first group. The next checkpoint turns groups on.
#[test]
fn groups_are_written_only_once_a_checkpoint_of_this_version_is_in_place() {
    use std::sync::atomic::Ordering;
    let fs = tidewater_storage::sim::SimFs::new(3);
    let data = std::path::Path::new("/data");
    fs.create_dir_durable(data).unwrap();
    {
        let (store, _) = Store::open(data, sim_opts(&fs)).unwrap();
        create(&store, "src");
    } // a clean shutdown: a checkpoint, so the next open's has work to do
    let opts = sim_opts(&fs);
    let faults = opts.faults.clone();
    // (Retried by the writer until it succeeds: keep it failing for a while.)
    faults
        .checkpoint_dir_open_failures
        .store(1_000, Ordering::SeqCst);
    let (store, logs) = Store::open(data, opts).unwrap();
    assert!(store.checkpoint_failures() >= 1);
    let (src, dst) = (logs[0].uid, create(&store, "dst"));
    append(&store, src, &["a"]);
    let move_ops = |n: &str| {
        vec![
            Op::Append {
                uid: dst,
                batch: batch(dst, &[n]),
            },
            Op::Settle {
                uid: src,
                ranges: vec![0..1],
            },
        ]
    };
    let groups = || {
        use tidewater_storage::Fs;
        let jdir = data.join("journal");
        let last = fs.read_dir(&jdir).unwrap().into_iter().max().unwrap();
        let bytes = fs.read(&jdir.join(last)).unwrap();
        let mut pos = 16;
        let mut groups = 0;
        while pos < bytes.len() {
            let (unit, len) = tidewater_storage::journal::decode_unit(&bytes[pos..]).unwrap();
            groups += matches!(unit, tidewater_storage::journal::Unit::Group(_)) as usize;
            pos += len;
        }
        groups
    };
    store.submit_wait(move_ops("a"), AckLevel::Durable).unwrap();
    assert_eq!(groups(), 0, "no group before a checkpoint of this version");
    faults
        .checkpoint_dir_open_failures
        .store(0, Ordering::SeqCst);
    store.checkpoint().unwrap();
    store.submit_wait(move_ops("b"), AckLevel::Durable).unwrap();
    assert_eq!(groups(), 1);
}

/// Issue 9, item 15: every segment kept a file descriptor open for as long as it lived, so
/// 10,000 queues (two logs each) needed 20,000 descriptors and a long backlog one per
/// segment. On a disk whose process may hold 48 handles, 300 logs of four segments each
/// are written, checkpointed (every segment synced), read, reopened (every segment
/// scanned) and read again: the store holds at most its cache's 16 segment files, and
/// nothing is lost. Before the cache, the 44th log's segment failed with EMFILE.
#[test]
fn many_logs_live_in_a_bounded_number_of_open_files() {
    use tidewater_storage::sim::SimFs;
    let fs = SimFs::new(9);
    fs.create_dir_durable(std::path::Path::new("/data"))
        .unwrap();
    fs.set_handle_limit(Some(48));
    let dir = std::path::Path::new("/data");
    let options = || StoreOptions {
        max_open_segment_files: 16,
        segment_roll_bytes: 64,
        ..sim_opts(&fs)
    };
    let body = |log: usize, n: usize| format!("log {log} message {n}: {}", "x".repeat(40));
    let logs = 300;
    let uids: Vec<u64> = {
        let (store, _) = Store::open(dir, options()).unwrap();
        let uids: Vec<u64> = (0..logs)
            .map(|i| create(&store, &format!("q{i}")))
            .collect();
        for round in 0..4 {
            for (i, &uid) in uids.iter().enumerate() {
                let text = body(i, round);
                assert_eq!(
                    append(&store, uid, &[&text]),
                    appended(round as u64, 1),
                    "log {i} round {round}"
                );
            }
        }
        store.checkpoint().unwrap();
        for (i, &uid) in uids.iter().enumerate() {
            let want: Vec<String> = (0..4).map(|n| body(i, n)).collect();
            assert_eq!(bodies(&store, uid, 0), want, "log {i}");
        }
        let files = store.segment_files();
        assert_eq!(files.capacity, 16);
        assert!(files.open <= 16, "{files:?}");
        assert!(files.opened >= logs as u64 * 4, "{files:?}");
        store.shutdown();
        uids
    };
    let (store, recovered) = Store::open(dir, options()).unwrap();
    assert_eq!(recovered.len(), logs);
    for (i, &uid) in uids.iter().enumerate() {
        let want: Vec<String> = (0..4).map(|n| body(i, n)).collect();
        assert_eq!(bodies(&store, uid, 0), want, "log {i} after reopening");
    }
    store.checkpoint().unwrap();
    assert!(store.segment_files().open <= 16);
    let (_, most) = fs.handles();
    assert!(most <= 48, "at most {most} handles were open at once");
}

/// A stream partition's log holds Kafka record batches (wrapped in tidewater's header):
/// appended with offsets stamped into both headers, read back whole as stored, found by
/// time through the time index, and the same after a restart's scan (segments roll every
/// batch or two here). A batch may span more offsets than it holds records (compaction
/// leaves gaps): offsets follow the span.
#[test]
fn stream_batches_are_stored_read_whole_and_found_by_time() {
    use tidewater_storage::format::kafka::{KafkaBatchBuilder, NewKafkaRecord, check_kafka_batch};
    use tidewater_storage::format::wrap_kafka_batch;
    let dir = tempfile::tempdir().unwrap();
    let options = || StoreOptions {
        segment_roll_bytes: 300,
        ..opts()
    };
    // (first timestamp, records): timestamps go back in time in the third batch.
    let plan: [(i64, usize); 4] = [(1_000, 3), (2_000, 2), (1_500, 4), (5_000, 1)];
    let kafka = |first: i64, n: usize| {
        let mut builder = KafkaBatchBuilder::new();
        for i in 0..n {
            let value = format!("v{first}-{i}");
            builder.push(&NewKafkaRecord {
                key: Some(b"k"),
                value: Some(value.as_bytes()),
                headers: &[],
                timestamp: first + i as i64 * 10,
            });
        }
        builder.finish()
    };
    let uid;
    {
        let (store, _) = Store::open(dir.path(), options()).unwrap();
        uid = create(&store, "stream-0");
        let mut expect_base = 0;
        for &(first, n) in &plan {
            let batch = wrap_kafka_batch(uid, &kafka(first, n)).unwrap();
            let result = store
                .submit_wait(vec![Op::Append { uid, batch }], AckLevel::Durable)
                .unwrap();
            assert_eq!(result[0], appended(expect_base, n as u32));
            expect_base += n as u64;
        }
        // Two records spanning four offsets (a compacted batch): the next batch starts 4 on.
        let mut gappy = kafka(6_000, 2);
        gappy[23..27].copy_from_slice(&3i32.to_be_bytes());
        let crc = crc32c::crc32c(&gappy[21..]);
        gappy[17..21].copy_from_slice(&crc.to_be_bytes());
        for (batch, base) in [(gappy, 10), (kafka(7_000, 1), 14)] {
            let batch = wrap_kafka_batch(uid, &batch).unwrap();
            let result = store
                .submit_wait(vec![Op::Append { uid, batch }], AckLevel::Durable)
                .unwrap();
            assert!(
                matches!(result[0], OpResult::Appended { base_offset, .. } if base_offset == base)
            );
        }
        check_stream(&store, uid);
        let err = store.reader(uid).unwrap().read(0, 10, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("Kafka batch"), "{err}");
    }
    let (store, _) = Store::open(dir.path(), options()).unwrap();
    check_stream(&store, uid);

    fn check_stream(store: &Store, uid: u64) {
        let reader = store.reader(uid).unwrap();
        let all = reader.read_batches(0, usize::MAX).unwrap();
        let bases: Vec<u64> = all.iter().map(|b| b.base_offset).collect();
        assert_eq!(bases, [0, 3, 5, 9, 10, 14]);
        for batch in &all {
            let inner = check_kafka_batch(&batch.kafka).unwrap();
            assert_eq!(
                inner.base_offset as u64, batch.base_offset,
                "stamped inside too"
            );
            assert_eq!(inner.offset_span(), u64::from(batch.span));
        }
        assert_eq!(reader.read_batches(0, 1).unwrap().len(), 1, "at least one");
        let from_inside = reader.read_batches(6, usize::MAX).unwrap();
        assert_eq!(from_inside[0].base_offset, 5, "the batch holding offset 6");
        assert_eq!(
            reader.read_batches(12, usize::MAX).unwrap()[0].base_offset,
            10
        );
        assert!(reader.read_batches(15, usize::MAX).unwrap().is_empty());
        // By time: the first batch whose largest timestamp reaches it.
        assert_eq!(reader.find_time(0).unwrap(), Some(0));
        assert_eq!(reader.find_time(1_020).unwrap(), Some(0));
        assert_eq!(reader.find_time(1_021).unwrap(), Some(3));
        assert_eq!(reader.find_time(2_010).unwrap(), Some(3));
        assert_eq!(
            reader.find_time(2_011).unwrap(),
            Some(9),
            "batch 3 peaks at 1,530"
        );
        assert_eq!(reader.find_time(6_005).unwrap(), Some(10));
        assert_eq!(reader.find_time(7_001).unwrap(), None);
    }
}

/// The in-memory segment indexes grew with the data kept (a mark per 4 KiB: about 1% of it
/// in RAM), without bound. Past `max_index_bytes`, checkpoints halve the indexes of the
/// most indexed sealed segments: the total stays within the budget (plus the active
/// segments'), and every lookup by offset or time still lands exactly, before and after a
/// restart.
#[test]
fn segment_indexes_stay_within_their_budget_and_lookups_stay_exact() {
    use tidewater_storage::format::kafka::{KafkaBatchBuilder, NewKafkaRecord};
    use tidewater_storage::format::wrap_kafka_batch;
    const BUDGET: usize = 1_024;
    let dir = tempfile::tempdir().unwrap();
    let options = || StoreOptions {
        segment_roll_bytes: 64 << 10,
        max_index_bytes: BUDGET,
        ..opts()
    };
    let (queue, stream);
    // Stream batches: one record of ~200 bytes each, timestamps rising by 10.
    let value = "x".repeat(200);
    let n_batches = 2_000u64;
    {
        let (store, _) = Store::open(dir.path(), options()).unwrap();
        queue = create(&store, "queue");
        stream = create(&store, "stream-0");
        for i in 0..n_batches {
            let mut builder = KafkaBatchBuilder::new();
            builder.push(&NewKafkaRecord {
                value: Some(value.as_bytes()),
                timestamp: 10 * i as i64,
                ..NewKafkaRecord::default()
            });
            let batch = wrap_kafka_batch(stream, &builder.finish()).unwrap();
            store
                .submit_wait(vec![Op::Append { uid: stream, batch }], AckLevel::Written)
                .unwrap();
        }
        // Queue batches of 100 records: marks inside batches too.
        for b in 0..40 {
            let bodies: Vec<String> = (0..100).map(|i| format!("q{b}-{i}-{value}")).collect();
            let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
            append(&store, queue, &refs);
        }
        store.checkpoint().unwrap();
        let (bytes, thinnings) = store.index_bytes();
        assert!(thinnings > 0, "the budget was exceeded: {bytes}");
        // Each log's active segment (at most 64 KiB: 16 marks of 48 bytes) is not thinned.
        assert!(
            bytes as usize <= BUDGET + 2 * 17 * 48,
            "{bytes} bytes of index"
        );
        check(&store, stream, queue, n_batches, &value);
    }
    let (store, _) = Store::open(dir.path(), options()).unwrap();
    check(&store, stream, queue, n_batches, &value);
    store.checkpoint().unwrap();
    assert!(store.index_bytes().0 as usize <= BUDGET + 2 * 17 * 48);
    check(&store, stream, queue, n_batches, &value);

    fn check(store: &Store, stream: u64, queue: u64, n: u64, value: &str) {
        let reader = store.reader(stream).unwrap();
        for offset in (0..n).step_by(7) {
            let got = reader.read_batches(offset, 1).unwrap();
            assert_eq!(got[0].base_offset, offset, "the batch holding {offset}");
            assert_eq!(reader.find_time(10 * offset as i64).unwrap(), Some(offset));
            assert_eq!(
                reader.find_time(10 * offset as i64 - 5).unwrap(),
                Some(offset),
                "between two batches' times"
            );
        }
        assert_eq!(reader.find_time(10 * n as i64).unwrap(), None);
        let reader = store.reader(queue).unwrap();
        for offset in (0..4_000u64).step_by(37) {
            let got = reader.read(offset, 1, usize::MAX).unwrap();
            let expect = format!("q{}-{}-{value}", offset / 100, offset % 100);
            assert_eq!(got[0].offset, offset);
            assert_eq!(String::from_utf8(got[0].body.to_vec()).unwrap(), expect);
        }
    }
}

/// Retention deletes whole sealed segments, so a segment that never fills would keep its
/// data for ever: the active segment rolls once a batch comes `segment_roll_ms` after its
/// oldest (Kafka's segment.ms), and not before; an empty segment never rolls.
#[test]
fn the_active_segment_rolls_on_age_at_append() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(
        dir.path(),
        StoreOptions {
            segment_roll_ms: 1_000,
            ..opts()
        },
    )
    .unwrap();
    let uid = create(&store, "q");
    let at = |published_at_ms: i64, body: &str| {
        let mut builder = BatchBuilder::new(uid, published_at_ms);
        builder.push(&NewRecord {
            id: body.as_bytes(),
            body: body.as_bytes(),
            ..Default::default()
        });
        store
            .submit_wait(
                vec![Op::Append {
                    uid,
                    batch: builder.finish(),
                }],
                AckLevel::Durable,
            )
            .unwrap();
        store.reader(uid).unwrap().segments()
    };
    assert_eq!(at(10_000, "a").len(), 1);
    assert_eq!(at(10_999, "b").len(), 1, "under a second: same segment");
    let segments = at(11_000, "c");
    assert_eq!(
        segments.len(),
        2,
        "a second after the oldest: a new segment"
    );
    assert_eq!((segments[0].end, segments[1].base), (2, 2));
    assert_eq!(at(11_500, "d").len(), 2);
    assert_eq!(at(12_000, "e").len(), 3);
    assert_eq!(bodies(&store, uid, 0), ["a", "b", "c", "d", "e"]);
}

/// Compaction's storage half: a run of sealed stream segments is rewritten (some records
/// left out, offsets kept, batches spanning the gaps) and merged into one file in their
/// place; reads see the new file, a rewrite that no longer fits (the active segment,
/// segments not in a durable checkpoint, a run that is not whole) changes nothing, and
/// after a reopen the same holds, with the leftovers of an unfinished rewrite (its temporary
/// file, a merged segment whose removal was lost) removed.
#[test]
fn sealed_stream_segments_are_rewritten_in_place_and_merged() {
    use tidewater_storage::format::kafka::{
        KafkaBatchBuilder, NewKafkaRecord, batch_records, check_kafka_batch, rebuild_kafka_batch,
    };
    use tidewater_storage::format::wrap_kafka_batch;
    let dir = tempfile::tempdir().unwrap();
    let options = || StoreOptions {
        segment_roll_bytes: 300,
        ..opts()
    };
    let kafka = |first: u64, n: u64| {
        let mut builder = KafkaBatchBuilder::new();
        for i in first..first + n {
            let value = format!("value-{i}");
            builder.push(&NewKafkaRecord {
                key: Some(b"k"),
                value: Some(value.as_bytes()),
                headers: &[],
                timestamp: 1_000 + i as i64,
            });
        }
        builder.finish()
    };
    // Offsets and values of every record from `from` on.
    let records = |store: &Store, uid: u64| -> Vec<(u64, String)> {
        let reader = store.reader(uid).unwrap();
        let mut out = Vec::new();
        for batch in reader.read_batches(0, usize::MAX).unwrap() {
            let header = check_kafka_batch(&batch.kafka).unwrap();
            for r in batch_records(&batch.kafka, &header, batch.base_offset, 0) {
                let r = r.unwrap();
                out.push((
                    r.offset,
                    String::from_utf8(r.record.value.unwrap().to_vec()).unwrap(),
                ));
            }
        }
        out
    };
    // Rewrites segments [first, last] keeping the records `keep` accepts.
    let rewrite = |store: &Store, uid: u64, first: u64, end: u64, keep: &dyn Fn(u64) -> bool| {
        let reader = store.reader(uid).unwrap();
        let batches: Vec<_> = reader
            .read_batches(first, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|b| b.base_offset < end)
            .collect();
        let mut rewrite = store.rewrite_segments(uid, first).unwrap();
        let n = batches.len();
        for (i, batch) in batches.iter().enumerate() {
            let header = check_kafka_batch(&batch.kafka).unwrap();
            let batch_end = if i + 1 == n {
                end
            } else {
                batch.base_offset + u64::from(batch.span)
            };
            let rebuilt = rebuild_kafka_batch(
                &batch.kafka,
                &header,
                batch.base_offset,
                (rewrite.end().max(first), batch_end),
                None,
                &mut |r| keep(r.offset),
            )
            .unwrap();
            rewrite.push(&rebuilt).unwrap();
        }
        store.replace_segments(rewrite).unwrap()
    };
    let uid;
    let all: Vec<(u64, String)> = (0..36).map(|i| (i, format!("value-{i}"))).collect();
    let kept: Vec<(u64, String)>;
    let leftover = dir.path().join("leftover.seg");
    {
        let (store, _) = Store::open(dir.path(), options()).unwrap();
        uid = create(&store, "#stream/s/0");
        for first in (0..36).step_by(3) {
            let batch = wrap_kafka_batch(uid, &kafka(first, 3)).unwrap();
            store
                .submit_wait(vec![Op::Append { uid, batch }], AckLevel::Durable)
                .unwrap();
        }
        let segments = store.reader(uid).unwrap().segments();
        assert!(segments.len() >= 5, "{segments:?}");
        assert_eq!(records(&store, uid), all);
        // Not in a durable checkpoint yet: refused.
        assert!(!rewrite(
            &store,
            uid,
            segments[0].base,
            segments[2].end,
            &|_| true
        ));
        store.checkpoint().unwrap();
        // The active segment is never rewritten; a run must be whole segments.
        let active = segments.last().unwrap();
        assert!(!rewrite(&store, uid, segments[0].base, active.end, &|_| {
            true
        }));
        assert_eq!(
            segments[1].end - segments[1].base,
            6,
            "two batches a segment"
        );
        assert!(!rewrite(
            &store,
            uid,
            segments[0].base,
            segments[1].base + 3,
            &|_| true
        ));
        assert_eq!(
            store.reader(uid).unwrap().segments(),
            segments,
            "nothing changed"
        );
        // Keep the even offsets of the first three segments, merged into one.
        let second = dir
            .path()
            .join("logs")
            .join(format!("{uid:016x}"))
            .join(format!("{:020}.seg", segments[1].base));
        fs::copy(&second, &leftover).unwrap();
        let end = segments[2].end;
        assert!(rewrite(&store, uid, segments[0].base, end, &|o| o % 2 == 0));
        assert!(!second.exists(), "the merged segments' files are removed");
        let after = store.reader(uid).unwrap().segments();
        assert_eq!(after.len(), segments.len() - 2);
        assert_eq!((after[0].base, after[0].end), (segments[0].base, end));
        assert!(after[0].bytes < segments[..3].iter().map(|s| s.bytes).sum::<u64>());
        kept = all
            .iter()
            .filter(|(o, _)| *o >= end || o % 2 == 0)
            .cloned()
            .collect();
        assert_eq!(records(&store, uid), kept);
        // Reads from inside a gap start at the batch holding it.
        let from_gap = store
            .reader(uid)
            .unwrap()
            .read_batches(1, usize::MAX)
            .unwrap();
        assert_eq!(from_gap[0].base_offset, 0);
        // A power loss that lost the removal of a merged file, and an unfinished rewrite.
        fs::copy(&leftover, &second).unwrap();
        fs::write(
            second.with_file_name(format!("{:020}.seg.compacting", end)),
            b"junk",
        )
        .unwrap();
    }
    let (store, _) = Store::open(dir.path(), options()).unwrap();
    assert_eq!(records(&store, uid), kept);
    let names: Vec<String> = walk_names(&dir.path().join("logs"));
    assert!(
        !names.iter().any(|n| n.ends_with(".compacting")),
        "{names:?}"
    );
    assert_eq!(
        names.len(),
        store.reader(uid).unwrap().segments().len(),
        "{names:?}"
    );

    fn walk_names(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk_names(&path));
            } else {
                out.push(path.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        out
    }
}

// Views: logs with no files whose offsets are another log's (a subscription's delivery
// state per stream partition).

fn create_view(store: &Store, name: &str, source: u64, floor: u64) -> Result<u64, WriteError> {
    store
        .submit_wait(
            vec![Op::CreateView {
                name: name.into(),
                source,
                floor,
            }],
            AckLevel::Durable,
        )
        .map(|results| match results[0] {
            OpResult::Created { uid } => uid,
            ref other => panic!("unexpected {other:?}"),
        })
}

fn settle(store: &Store, uid: u64, ranges: Vec<std::ops::Range<u64>>) -> Result<(), WriteError> {
    store
        .submit_wait(vec![Op::Settle { uid, ranges }], AckLevel::Durable)
        .map(drop)
}

fn retry(store: &Store, uid: u64, offset: u64, count: u32) -> Result<(), WriteError> {
    store
        .submit_wait(
            vec![Op::Retry {
                uid,
                offset,
                deliver_at_ms: 99,
                delivery_count: count,
                at_ms: 98,
                error: format!("attempt {count}"),
            }],
            AckLevel::Durable,
        )
        .map(drop)
}

fn state_of(recovered: &[tidewater_storage::LogState], uid: u64) -> &tidewater_storage::LogState {
    recovered.iter().find(|l| l.uid == uid).expect("recovered")
}

fn log_dirs(dir: &std::path::Path) -> usize {
    fs::read_dir(dir.join("logs")).unwrap().count()
}

#[test]
fn a_view_keeps_delivery_state_over_its_source_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (source, view, other);
    {
        let (store, _) = Store::open(dir.path(), opts()).unwrap();
        source = create(&store, "orders");
        append(&store, source, &["a", "b", "c"]);
        view = create_view(&store, "#sub/orders/billing/0", source, 1).unwrap();
        // Views of one log are independent; a floor past the end is the end.
        other = create_view(&store, "#sub/orders/email/0", source, 100).unwrap();
        assert_eq!(log_dirs(dir.path()), 1, "a view has no files");
        assert!(store.reader(view).is_none());
        // A view's end is its source's: offsets past it are refused, and become valid
        // once the source grows.
        assert!(matches!(
            settle(&store, view, vec![2..4]),
            Err(WriteError::Invalid(_))
        ));
        assert!(matches!(
            retry(&store, view, 3, 1),
            Err(WriteError::Invalid(_))
        ));
        // A view holds no records of its own.
        let refused = store.submit_wait(
            vec![Op::Append {
                uid: view,
                batch: batch(view, &["x"]),
            }],
            AckLevel::Durable,
        );
        assert!(
            matches!(refused, Err(WriteError::Invalid(ref m)) if m.contains("view")),
            "{refused:?}"
        );
        append(&store, source, &["d", "e"]);
        settle(&store, view, vec![2..4]).unwrap();
        retry(&store, view, 1, 2).unwrap();
        retry(&store, other, 4, 1).unwrap();
        // Appends and view settles in one request: the settle sees the appended end.
        store
            .submit_wait(
                vec![
                    Op::Append {
                        uid: source,
                        batch: batch(source, &["f"]),
                    },
                    Op::Settle {
                        uid: view,
                        ranges: vec![5..6],
                    },
                ],
                AckLevel::Durable,
            )
            .unwrap();
        // The source's own state is untouched by its views'.
        assert_eq!(bodies(&store, source, 0), ["a", "b", "c", "d", "e", "f"]);
    }
    let check = |recovered: &[tidewater_storage::LogState]| {
        let v = state_of(recovered, view);
        assert_eq!(v.source, Some(source));
        assert_eq!((v.next_offset, v.ack_floor), (6, 1));
        assert_eq!(v.settled.iter().collect::<Vec<_>>(), [2..4, 5..6]);
        assert_eq!(v.retries[&1].delivery_count, 2);
        assert_eq!(v.unsettled(), 2); // 1 and 4
        let o = state_of(recovered, other);
        assert_eq!((o.next_offset, o.ack_floor, o.retries.len()), (6, 3, 1));
        let s = state_of(recovered, source);
        assert_eq!((s.source, s.next_offset, s.ack_floor), (None, 6, 0));
    };
    // From the journal (the reopen's checkpoint holds it from then on) ...
    {
        let (_store, recovered) = Store::open(dir.path(), opts()).unwrap();
        check(&recovered);
    }
    let ckpt = fs::read_dir(dir.path().join("checkpoint"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(&fs::read(ckpt.path()).unwrap()[..8], b"TWCKPT04");
    // ... and from the checkpoint.
    let (store, recovered) = Store::open(dir.path(), opts()).unwrap();
    check(&recovered);
    // After a restart, the view's end still follows the source's.
    append(&store, source, &["g"]);
    settle(&store, view, vec![0..7]).unwrap();
    drop(store);
    let (_store, recovered) = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(state_of(&recovered, view).unsettled(), 0);
    assert_eq!(state_of(&recovered, view).next_offset, 7);
}

#[test]
fn a_view_starts_within_its_source_and_needs_a_real_source() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    let source = create(&store, "orders");
    append(&store, source, &["a", "b", "c", "d"]);
    settle(&store, source, vec![0..2]).unwrap();
    // A floor below the source's start is its start (those records are gone).
    let view = create_view(&store, "v", source, 0).unwrap();
    assert!(matches!(
        create_view(&store, "w", view, 0),
        Err(WriteError::Invalid(_))
    ));
    assert!(matches!(
        create_view(&store, "w", 999, 0),
        Err(WriteError::Invalid(_))
    ));
    // A source and its views in one request (a stream growing a partition).
    let results = store
        .submit_wait(
            vec![
                Op::CreateLog {
                    name: "orders/1".into(),
                    config: "{}".into(),
                    id_window: None,
                },
                Op::CreateView {
                    name: "v1".into(),
                    source: view + 1,
                    floor: 0,
                },
            ],
            AckLevel::Durable,
        )
        .unwrap();
    assert_eq!(
        results,
        [
            OpResult::Created { uid: view + 1 },
            OpResult::Created { uid: view + 2 }
        ]
    );
    drop(store);
    let (_store, recovered) = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(state_of(&recovered, view).ack_floor, 2);
    assert_eq!(state_of(&recovered, view + 2).source, Some(view + 1));
}

#[test]
fn a_source_is_deleted_with_or_after_its_views_never_before() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), opts()).unwrap();
    let source = create(&store, "orders");
    append(&store, source, &["a"]);
    let view = create_view(&store, "v", source, 0).unwrap();
    let second = create_view(&store, "w", source, 0).unwrap();
    let delete = |uids: &[u64]| {
        store.submit_wait(
            uids.iter().map(|&uid| Op::DeleteLog { uid }).collect(),
            AckLevel::Durable,
        )
    };
    let refused = delete(&[source, view]);
    assert!(
        matches!(refused, Err(WriteError::Invalid(ref m)) if m.contains("view")),
        "{refused:?}"
    );
    // A refused request changed nothing.
    settle(&store, view, vec![0..1]).unwrap();
    delete(&[view]).unwrap();
    assert_eq!(
        log_dirs(dir.path()),
        1,
        "deleting a view leaves its source's files"
    );
    assert_eq!(bodies(&store, source, 0), ["a"]);
    delete(&[second, source]).unwrap();
    store.checkpoint().unwrap();
    assert_eq!(log_dirs(dir.path()), 0);
    drop(store);
    let (_store, recovered) = Store::open(dir.path(), opts()).unwrap();
    assert!(recovered.is_empty(), "{recovered:?}");
}

/// A view's floor says nothing about its source's files: a checkpoint after a view settled
/// whole segments removes none of them (the source's own floor decides).
#[test]
fn a_checkpoint_after_a_view_passes_segments_removes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small = StoreOptions {
        segment_roll_bytes: 1024,
        ..opts()
    };
    let (store, _) = Store::open(dir.path(), small.clone()).unwrap();
    let source = create(&store, "orders");
    let body = "x".repeat(200);
    for _ in 0..40 {
        append(&store, source, &[&body]);
    }
    let view = create_view(&store, "v", source, 0).unwrap();
    settle(&store, view, vec![0..39]).unwrap();
    store.checkpoint().unwrap();
    store.checkpoint().unwrap();
    assert_eq!(offsets(&store, source), (0..40).collect::<Vec<_>>());
    drop(store);
    let (store, recovered) = Store::open(dir.path(), small).unwrap();
    assert_eq!(state_of(&recovered, view).ack_floor, 39);
    assert_eq!(offsets(&store, source), (0..40).collect::<Vec<_>>());
}

/// The layer above settles a view before (or with) a settle of its source that removes the
/// records (retention). An offset a view has not settled that its source no longer holds is
/// lost data: the open refuses until repaired, and the repair settles and reports it.
#[test]
fn a_view_whose_records_its_source_settled_refuses_the_open_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (source, view);
    {
        let (store, _) = Store::open(dir.path(), opts()).unwrap();
        source = create(&store, "orders");
        append(&store, source, &["a", "b", "c", "d", "e"]);
        view = create_view(&store, "#sub/orders/billing/0", source, 0).unwrap();
        // Settled together, in one request: fine.
        store
            .submit_wait(
                vec![
                    Op::Settle {
                        uid: view,
                        ranges: vec![0..1],
                    },
                    Op::Settle {
                        uid: source,
                        ranges: vec![0..1],
                    },
                ],
                AckLevel::Durable,
            )
            .unwrap();
        // The source moves on without the view: 1..3 are lost to it.
        settle(&store, source, vec![0..3]).unwrap();
    }
    let err = match Store::open(dir.path(), opts()) {
        Err(err) => err,
        Ok(_) => panic!("opened a view missing its records"),
    };
    let text = err.to_string();
    let tidewater_storage::OpenError::Missing(missing) = err else {
        panic!("{text}");
    };
    assert_eq!(
        (missing[0].log_uid, missing[0].offsets.clone()),
        (view, vec![1..3]),
        "{text}"
    );
    assert!(text.contains("#sub/orders/billing/0"), "{text}");
    {
        let (store, _) = Store::open(dir.path(), repair_opts()).unwrap();
        assert_eq!(store.repair_report()[0].offsets, [1..3]);
    }
    let (store, recovered) = Store::open(dir.path(), opts()).unwrap();
    assert!(store.repair_report().is_empty());
    assert_eq!(state_of(&recovered, view).ack_floor, 3);
}
