//! Dispatch rates: GCRA for a fixed rate, AIMD for adaptive throttling.

/// The generic cell rate algorithm (dispatch rate limits). `burst` deliveries may go at
/// once; after that one every `1/per_s` seconds. In any window of `w` ms at most
/// `burst + w * per_s / 1000` deliveries conform.
#[derive(Debug, Clone, PartialEq)]
pub struct Gcra {
    interval_ms: f64,
    tolerance_ms: f64,
    /// Theoretical arrival time of the next delivery.
    tat_ms: f64,
}

impl Gcra {
    pub fn new(per_s: f64, burst: u64) -> Self {
        let interval_ms = 1_000.0 / per_s;
        Gcra {
            interval_ms,
            tolerance_ms: (burst.max(1) - 1) as f64 * interval_ms,
            tat_ms: f64::MIN,
        }
    }

    /// Changes the rate and burst, keeping what was already spent.
    pub fn reconfigure(&mut self, per_s: f64, burst: u64) {
        let tat = self.tat_ms;
        *self = Gcra::new(per_s, burst);
        self.tat_ms = tat;
    }

    /// Deliveries that conform now, at most `max` (takes none).
    pub fn available(&self, now_ms: i64, max: usize) -> usize {
        let now = now_ms as f64;
        let tat = self.tat_ms.max(now);
        let slack = now + self.tolerance_ms - tat;
        if slack < 0.0 {
            return 0;
        }
        ((slack / self.interval_ms).floor() as usize)
            .saturating_add(1)
            .min(max)
    }

    /// Records `n` deliveries made now.
    pub fn take(&mut self, now_ms: i64, n: usize) {
        if n > 0 {
            self.tat_ms = self.tat_ms.max(now_ms as f64) + n as f64 * self.interval_ms;
        }
    }

    /// When the next delivery conforms.
    pub fn next_ms(&self) -> i64 {
        (self.tat_ms - self.tolerance_ms).ceil() as i64
    }
}

/// Additive increase, multiplicative decrease of a dispatch rate (adaptive throttling):
/// an overload signal halves the rate (at most once a second, so one burst of expired
/// leases counts once); every second with acknowledgements and no overload adds a
/// twentieth of the range.
#[derive(Debug, Clone, PartialEq)]
pub struct Aimd {
    min_per_s: f64,
    max_per_s: f64,
    current: f64,
    last_cut_ms: i64,
    last_raise_ms: i64,
}

/// Time between two cuts, and between two raises.
const AIMD_STEP_MS: i64 = 1_000;

impl Aimd {
    pub fn new(min_per_s: f64, max_per_s: f64) -> Self {
        Aimd {
            min_per_s,
            max_per_s,
            current: max_per_s,
            last_cut_ms: i64::MIN,
            last_raise_ms: i64::MIN,
        }
    }

    /// Keeps the current rate within new bounds.
    pub fn reconfigure(&mut self, min_per_s: f64, max_per_s: f64) {
        self.min_per_s = min_per_s;
        self.max_per_s = max_per_s;
        self.current = self.current.clamp(min_per_s, max_per_s);
    }

    pub fn rate(&self) -> f64 {
        self.current
    }

    /// A consumer said it is overloaded (or let a lease expire). True if the rate changed.
    pub fn overloaded(&mut self, now_ms: i64) -> bool {
        if now_ms.saturating_sub(self.last_cut_ms) < AIMD_STEP_MS {
            return false;
        }
        self.last_cut_ms = now_ms;
        self.last_raise_ms = now_ms;
        let next = (self.current / 2.0).max(self.min_per_s);
        let changed = next != self.current;
        self.current = next;
        changed
    }

    /// Messages were acknowledged. True if the rate changed.
    pub fn succeeded(&mut self, now_ms: i64) -> bool {
        if now_ms.saturating_sub(self.last_raise_ms) < AIMD_STEP_MS {
            return false;
        }
        self.last_raise_ms = now_ms;
        let step = ((self.max_per_s - self.min_per_s) / 20.0).max(1.0);
        let next = (self.current + step).min(self.max_per_s);
        let changed = next != self.current;
        self.current = next;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_never_exceeds_rate_plus_burst_in_any_window() {
        // 100/s, burst 10, greedy consumer asking every ms for 1 s.
        let mut gcra = Gcra::new(100.0, 10);
        let mut sent = Vec::new();
        for now in 0..5_000 {
            let n = gcra.available(now, 1_000);
            gcra.take(now, n);
            sent.extend(std::iter::repeat_n(now, n));
        }
        assert_eq!(sent.iter().filter(|&&t| t == 0).count(), 10, "the burst");
        for start in 0..4_000 {
            let in_window = sent
                .iter()
                .filter(|&&t| t >= start && t < start + 1_000)
                .count();
            assert!(in_window <= 110, "{in_window} in the second from {start}");
        }
        // Steady state: 100 per second.
        let last_second = sent.iter().filter(|&&t| t >= 4_000).count();
        assert_eq!(last_second, 100);
    }

    #[test]
    fn gcra_says_when_the_next_delivery_conforms() {
        let mut gcra = Gcra::new(2.0, 1);
        assert_eq!(gcra.available(1_000, 5), 1);
        gcra.take(1_000, 1);
        assert_eq!(gcra.available(1_000, 5), 0);
        assert_eq!(gcra.next_ms(), 1_500);
        assert_eq!(gcra.available(1_499, 5), 0);
        assert_eq!(gcra.available(1_500, 5), 1);
        // A slower rate keeps what was spent.
        gcra.reconfigure(1.0, 1);
        assert_eq!(gcra.next_ms(), 1_500);
    }

    #[test]
    fn aimd_halves_on_overload_and_climbs_back_within_bounds() {
        let mut aimd = Aimd::new(10.0, 210.0);
        assert_eq!(aimd.rate(), 210.0);
        assert!(aimd.overloaded(0));
        assert_eq!(aimd.rate(), 105.0);
        assert!(!aimd.overloaded(500), "one cut per second");
        assert!(aimd.overloaded(1_000));
        assert!(aimd.overloaded(2_000));
        assert!(aimd.overloaded(3_000));
        assert!(aimd.overloaded(4_000));
        assert_eq!(aimd.rate(), 10.0, "floored at min_per_s");
        assert!(!aimd.overloaded(5_000));
        assert!(!aimd.succeeded(5_500), "no raise within a second of a cut");
        assert!(aimd.succeeded(6_000));
        assert_eq!(aimd.rate(), 20.0);
        for t in 0..30 {
            aimd.succeeded(7_000 + t * 1_000);
        }
        assert_eq!(aimd.rate(), 210.0, "capped at max_per_s");
        aimd.reconfigure(10.0, 50.0);
        assert_eq!(aimd.rate(), 50.0);
    }
}
