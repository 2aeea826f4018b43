//! Receipts are capabilities: their nonces come from a CSPRNG, injectable for simulations.

use std::sync::Arc;

use tidewater_core::clock::{NonceSource, SeededNonces};
use tidewater_core::receipt::Receipt;
use tidewater_core::{AckLevel, Broker, BrokerOptions, ConfigPatch, NewMessage};
use tidewater_storage::StoreOptions;

fn open(dir: &tempfile::TempDir, nonces: Option<Arc<dyn NonceSource>>) -> Broker {
    let mut options = BrokerOptions {
        store: StoreOptions {
            fsync: false,
            ..StoreOptions::default()
        },
        ..BrokerOptions::default()
    };
    if let Some(nonces) = nonces {
        options.nonces = nonces;
    }
    Broker::open(dir.path(), options).unwrap()
}

/// The nonces of 5 leases, drawn right after seeding the thread's fastrand with 7.
async fn nonces(broker: &Broker) -> Vec<u64> {
    broker
        .put_queue("q", &ConfigPatch::default())
        .await
        .unwrap();
    let messages: Vec<NewMessage> = (0..5)
        .map(|i| NewMessage {
            body: format!("m{i}").into_bytes(),
            ..NewMessage::default()
        })
        .collect();
    broker
        .publish("q", &messages, AckLevel::Durable)
        .await
        .unwrap();
    fastrand::seed(7);
    let deliveries = broker.receive("q", 5, 1_000, None).await.unwrap();
    assert_eq!(deliveries.len(), 5);
    deliveries
        .iter()
        .map(|d| Receipt::decode(&d.receipt).unwrap().nonce)
        .collect()
}

/// A predictable generator (fastrand's wyrand, seeded the same) gave two brokers the same
/// nonces, so a receipt of one could be forged from another's; the default is a CSPRNG.
#[tokio::test(flavor = "current_thread")]
async fn two_brokers_draw_different_nonces_whatever_fastrand_is_seeded_with() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = nonces(&open(&a_dir, None)).await;
    let b = nonces(&open(&b_dir, None)).await;
    assert_ne!(a, b);
    for nonce in a.iter().chain(&b) {
        assert!(
            !b.contains(nonce) || !a.contains(nonce),
            "shared nonce {nonce}"
        );
    }
}

/// A simulation injects a seeded source and gets the same nonces on every run.
#[tokio::test(flavor = "current_thread")]
async fn a_seeded_nonce_source_is_deterministic() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = nonces(&open(&a_dir, Some(Arc::new(SeededNonces::new(42))))).await;
    let b = nonces(&open(&b_dir, Some(Arc::new(SeededNonces::new(42))))).await;
    assert_eq!(a, b);
    let c_dir = tempfile::tempdir().unwrap();
    let c = nonces(&open(&c_dir, Some(Arc::new(SeededNonces::new(43))))).await;
    assert_ne!(a, c);
}
