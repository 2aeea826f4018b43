//! Time and randomness are injected so that tests never depend on the wall clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start_ms)))
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    pub fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where lease nonces come from. A receipt is a capability (whoever holds it can ack, nack
/// or extend that lease), so its nonce must be unguessable: the default is a
/// cryptographically secure generator. A simulation may inject a seeded one.
pub trait NonceSource: Send + Sync {
    fn nonce(&self) -> u64;
}

/// ChaCha12 seeded from the operating system, one per thread and reseeded periodically
/// (rand's `ThreadRng`): a CSPRNG without a system call per nonce.
#[derive(Debug, Default)]
pub struct OsNonces;

impl NonceSource for OsNonces {
    fn nonce(&self) -> u64 {
        rand::Rng::next_u64(&mut rand::rng())
    }
}

/// ChaCha12 from a fixed seed: the same nonces on every run, for deterministic simulations
/// and tests only (anyone who knows the seed can forge receipts).
#[derive(Debug)]
pub struct SeededNonces(std::sync::Mutex<rand::rngs::StdRng>);

impl SeededNonces {
    pub fn new(seed: u64) -> Self {
        SeededNonces(std::sync::Mutex::new(rand::SeedableRng::seed_from_u64(
            seed,
        )))
    }
}

impl NonceSource for SeededNonces {
    fn nonce(&self) -> u64 {
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        rand::Rng::next_u64(&mut *rng)
    }
}

/// Source of the jitter in retry backoff.
pub trait Jitter: Send + Sync {
    /// A number in [0, 1].
    fn unit(&self) -> f64;
}

#[derive(Debug, Default)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn unit(&self) -> f64 {
        fastrand::f64()
    }
}

/// Always the same fraction (tests).
#[derive(Debug)]
pub struct FixedJitter(pub f64);

impl Jitter for FixedJitter {
    fn unit(&self) -> f64 {
        self.0
    }
}
