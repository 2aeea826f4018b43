//! A publish-and-read-heavy timing of the store on the real file system, for comparing
//! builds (the file-system seam's overhead): `cargo run --release -p tidewater-storage
//! --example store_bench [rounds]`. Prints the best of `rounds` runs of each phase.
//!
//! Phases: 100,000 single-record appends at level `written` (pipelined, fsync off: the
//! CPU path, where dispatch overhead would show), 2,000 durable appends (fsync on, one at a
//! time: the system-call path), and reading every record of the first phase back one at a
//! time (pread per read).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidewater_storage::{AckLevel, BatchBuilder, NewRecord, Op, OpResult, Store, StoreOptions};

fn batch(uid: u64, i: u64) -> Vec<u8> {
    let body = [b'x'; 100];
    let id = i.to_le_bytes();
    let mut builder = BatchBuilder::new(uid, 1_000);
    builder.push(&NewRecord {
        id: &id,
        body: &body,
        ..Default::default()
    });
    builder.finish()
}

fn create(store: &Store) -> u64 {
    let op = Op::CreateLog {
        name: "bench".into(),
        config: "{}".into(),
        id_window: None,
    };
    match store.submit_wait(vec![op], AckLevel::Durable).unwrap()[0] {
        OpResult::Created { uid } => uid,
        ref other => panic!("unexpected {other:?}"),
    }
}

fn run(fsync: bool) -> (Duration, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        fsync,
        checkpoint_interval: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    let (store, _) = Store::open(dir.path(), opts).unwrap();
    let uid = create(&store);
    const N: u64 = 100_000;
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut i = 0;
    while i < N {
        let sent = done.clone();
        store.submit(
            vec![Op::Append {
                uid,
                batch: batch(uid, i),
            }],
            AckLevel::Written,
            Box::new(move |r| {
                r.unwrap();
                sent.fetch_add(1, Ordering::Release);
            }),
        );
        i += 1;
        while i - done.load(Ordering::Acquire) > 1_000 {
            std::hint::spin_loop();
        }
    }
    while done.load(Ordering::Acquire) < N {
        std::thread::yield_now();
    }
    let written = start.elapsed();
    let start = Instant::now();
    for i in 0..2_000 {
        store
            .submit_wait(
                vec![Op::Append {
                    uid,
                    batch: batch(uid, N + i),
                }],
                AckLevel::Durable,
            )
            .unwrap();
    }
    let durable = start.elapsed();
    let reader = store.reader(uid).unwrap();
    let start = Instant::now();
    for offset in 0..N {
        let records = reader.read(offset, 1, usize::MAX).unwrap();
        assert_eq!(records[0].offset, offset);
    }
    let read = start.elapsed();
    (written, durable, read)
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let mut best = (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        let (w, _, r) = run(false);
        let (_, d, _) = run(true);
        best = (best.0.min(w), best.1.min(d), best.2.min(r));
        println!("run: written {:?}, durable {:?}, read {:?}", w, d, r);
    }
    println!(
        "best of {rounds}: 100k written appends {:.1} ms ({:.0}/s); 2k durable appends {:.1} ms ({:.0} us each); 100k single-record reads {:.1} ms ({:.0} ns each)",
        best.0.as_secs_f64() * 1e3,
        100_000.0 / best.0.as_secs_f64(),
        best.1.as_secs_f64() * 1e3,
        best.1.as_secs_f64() * 1e6 / 2_000.0,
        best.2.as_secs_f64() * 1e3,
        best.2.as_secs_f64() * 1e9 / 100_000.0,
    );
}
