//! A broker on a directory of its own with simulated time: the one harness of the model,
//! policy and cancellation tests and of `tidewater scenario`. Time moves only when told
//! (`advance`), jitter is fixed unless asked otherwise, and fsync is off (these measure
//! behaviour, not the disk; the power-loss tests drive the store on a simulated disk).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tidewater_storage::{AckLevel, StoreOptions};

use crate::broker::{Broker, BrokerOptions, ForecastOptions, NewMessage, Published};
use crate::clock::{FixedJitter, Jitter, ManualClock};
use crate::config::{ConfigPatch, Limits};
use crate::error::BrokerError;
use crate::queue::{Delivery, QueueStats};

/// 2023-11-14T22:13:20Z: where simulated time starts unless told otherwise.
pub const START_MS: i64 = 1_700_000_000_000;

/// How a harness opens its broker.
#[derive(Clone)]
pub struct HarnessOptions {
    pub start_ms: i64,
    pub jitter: Arc<dyn Jitter>,
    /// The store's options (fsync off by default; tests arm faults here).
    pub store: StoreOptions,
    /// The broker's limits (the defaults unless a test needs others).
    pub limits: Limits,
    /// Forecast sampling (every 15 s of simulated time by default).
    pub forecast: ForecastOptions,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        HarnessOptions {
            start_ms: START_MS,
            jitter: Arc::new(FixedJitter(1.0)),
            store: StoreOptions {
                fsync: false,
                ..StoreOptions::default()
            },
            limits: Limits::default(),
            forecast: ForecastOptions::default(),
        }
    }
}

/// A broker with simulated time on a directory (removed on drop when the harness made
/// it). `restart` stops the broker and recovers it from the same directory.
pub struct Harness {
    dir: PathBuf,
    owns_dir: bool,
    pub clock: ManualClock,
    options: HarnessOptions,
    broker: Option<Broker>,
}

impl Harness {
    /// On a new directory under the system's temporary directory, removed on drop.
    pub fn temporary(options: HarnessOptions) -> Result<Harness, tidewater_storage::OpenError> {
        let dir = std::env::temp_dir().join(format!(
            "tidewater-harness-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let mut harness = Harness::open(&dir, options)?;
        harness.owns_dir = true;
        Ok(harness)
    }

    /// On `dir` (kept on drop).
    pub fn open(
        dir: &Path,
        options: HarnessOptions,
    ) -> Result<Harness, tidewater_storage::OpenError> {
        let clock = ManualClock::new(options.start_ms);
        let broker = Broker::open(dir, broker_options(&options, &clock))?;
        Ok(Harness {
            dir: dir.to_path_buf(),
            owns_dir: false,
            clock,
            options,
            broker: Some(broker),
        })
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("the broker is open")
    }

    /// Stops the broker (syncing and checkpointing) and recovers it from its directory, at
    /// the same simulated time.
    pub fn restart(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown();
        }
        let options = broker_options(&self.options, &self.clock);
        self.broker = Some(Broker::open(&self.dir, options).expect("the broker reopens"));
    }

    /// Creates or configures a queue from its JSON configuration.
    pub async fn queue(&self, name: &str, config: serde_json::Value) -> Result<(), BrokerError> {
        let patch: ConfigPatch = serde_json::from_value(config)
            .map_err(|e| BrokerError::invalid(format!("queue configuration: {e}")))?;
        self.broker().put_queue(name, &patch).await.map(|_| ())
    }

    /// Publishes durably, 5,000 messages at a time: a message is deliverable once durable,
    /// and simulated time must not run ahead of the (real-time) storage threads.
    pub async fn publish(
        &self,
        queue: &str,
        messages: &[NewMessage],
    ) -> Result<Published, BrokerError> {
        let mut all = Published::default();
        for chunk in messages.chunks(5_000) {
            let offset = all.ids.len();
            let published = self
                .broker()
                .publish(queue, chunk, AckLevel::Durable)
                .await?;
            all.ids.extend(published.ids);
            all.duplicates
                .extend(published.duplicates.into_iter().map(|i| i + offset));
        }
        Ok(all)
    }

    /// Receives without waiting, with the queue's lease.
    pub async fn receive(&self, queue: &str, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        self.broker().receive(queue, max, 0, None).await
    }

    /// `receive` as the consumer named `consumer` (counted in the queue's forecast).
    pub async fn receive_as(
        &self,
        consumer: &str,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let id = crate::forecast::consumer_id(consumer.as_bytes());
        self.broker().receive_as(id, queue, max, 0, None).await
    }

    pub async fn ack(&self, queue: &str, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        if !deliveries.is_empty() {
            let receipts: Vec<String> = deliveries.iter().map(|d| d.receipt.clone()).collect();
            self.broker().ack(queue, &receipts).await?;
        }
        Ok(())
    }

    /// Moves simulated time on by `ms` and runs maintenance (lease expiry, timers).
    pub async fn advance(&self, ms: i64) {
        self.clock.advance(ms);
        self.broker().run_maintenance().await;
    }

    pub fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        Ok(self.broker().get_queue(queue)?.stats)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown();
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn broker_options(options: &HarnessOptions, clock: &ManualClock) -> BrokerOptions {
    BrokerOptions {
        store: options.store.clone(),
        clock: Arc::new(clock.clone()),
        jitter: options.jitter.clone(),
        limits: options.limits.clone(),
        forecast: options.forecast,
        ..BrokerOptions::default()
    }
}

/// `n` messages with bodies `m0`, `m1`, ...
pub fn messages(n: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|i| NewMessage {
            body: format!("m{i}").into_bytes(),
            ..NewMessage::default()
        })
        .collect()
}
