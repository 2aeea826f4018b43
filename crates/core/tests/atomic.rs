//! Replies tell the truth about what was stored: an operation made of several writes is
//! one write, so a failure in its middle cannot leave half of it behind an error reply.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tidewater_core::ConfigPatch;
use tidewater_core::harness::{Harness, HarnessOptions};
use tidewater_storage::StoreOptions;
use tidewater_storage::faults::Faults;

fn open(dir: &std::path::Path, faults: Arc<Faults>) -> Harness {
    let options = HarnessOptions {
        store: StoreOptions {
            fsync: false,
            faults,
            ..StoreOptions::default()
        },
        ..HarnessOptions::default()
    };
    Harness::open(dir, options).unwrap()
}

/// A queue create answered with an error ("nothing was stored") existed after a restart:
/// the log was created durably, then the dedup window's write failed.
#[test]
fn a_queue_create_that_fails_leaves_no_queue_behind() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for fail_at in 1..=3u64 {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let harness = open(dir.path(), faults.clone());
        let broker = harness.broker();
        faults.fail_meta_write_at.store(fail_at, Ordering::SeqCst);
        let created = rt.block_on(broker.put_queue("q", &ConfigPatch::default()));
        let listed = broker.list_queues().len();
        drop(harness);
        let reopened = open(dir.path(), Arc::new(Faults::default()));
        let after_restart = reopened.broker().list_queues().len();
        match created {
            Ok(_) => assert_eq!((listed, after_restart), (1, 1), "fail at {fail_at}"),
            Err(err) => {
                assert_eq!(
                    (listed, after_restart),
                    (0, 0),
                    "fail at {fail_at}: the create answered {err:?}"
                );
                assert!(err.message.contains("nothing was stored"), "{err:?}");
            }
        }
    }
}
