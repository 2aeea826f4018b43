//! Backlog forecasts (sans-IO): from periodic samples of a queue's, subscription's or
//! group's counters, the arrival and service rates, the time to drain, the time until the
//! oldest message crosses an age objective, and the consumers needed to drain within a
//! target time.
//!
//! The broker samples every subject at a fixed interval into a bounded ring (`History`);
//! the console draws the ring, and a forecast reads the rates over the last `rate_window_ms`
//! of it plus a sample taken at the moment it is asked.
//!
//! The model, all of it here so it can be checked by hand:
//! - arrival rate λ: messages that arrived per second over the window;
//! - service rate μ: messages that left the backlog per second, whatever took them (acks,
//!   dead-lettering, expiry), found by conservation: μ = λ − Δbacklog/Δt;
//! - drain time: backlog / (μ − λ) when μ > λ; "growing" when λ ≥ μ with a backlog;
//! - the oldest message's age A grows by one second a second and falls as the head is
//!   served: the backlog B arrived over about A seconds (B/A a second), so serving μ a
//!   second moves the head's arrival time on by μ·A/B seconds a second; the age then moves
//!   at 1 − μ·A/B a second, and crosses the objective O after (O − A)/(1 − μ·A/B) seconds
//!   when that is positive;
//! - consumers needed (Little's law, consumers as servers): a consumer serves r messages a
//!   second (the service rate over the consumers that were handed messages in the window), so keeping up with arrivals takes λ/r consumers and draining B within T
//!   seconds B/(T·r) more: ⌈(λ + B/T)/r⌉. r is the per-consumer rate measured the last time
//!   the consumers were busy (a backlog ready for them throughout the window, the same
//!   consumers throughout, and some served in every interval), which is their capacity;
//!   until such a window, the current per-consumer rate, a lower bound;
//! - limits: a queue whose dispatch rate (adaptive throttling's, when on) or max_in_flight
//!   caps its service hands more consumers nothing more. A window in which the service
//!   reached 90% of the dispatch rate, or the leases reached max_in_flight, measures the
//!   policy, not the consumers: it is not a busy window. The consumers needed are at most
//!   those the dispatch rate keeps busy (⌈rate/r⌉), and while every lease max_in_flight
//!   allows is held, or every ready message waits for a slot of its key (key_concurrency),
//!   at most the consumers there are; `limited_by` says which limit holds.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

/// What the broker reads of a subject at one moment. Counters are cumulative since the
/// process started (a restart starts them again, and the ring with them).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Sample {
    pub at_ms: i64,
    /// Every message not settled yet (ready, in flight, delayed), or a group's lag.
    pub backlog: u64,
    /// Deliverable now.
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub oldest_age_ms: u64,
    /// Messages that arrived (published, produced) since the start.
    pub arrived: u64,
    /// Consumers seen within the idle window (a group's members).
    pub consumers: u32,
    /// Of them, those that were handed messages within the rate window: the ones serving
    /// (a group: its members). The per-consumer rate divides by these, so a consumer that
    /// stopped does not count as capacity while it is still "seen".
    pub serving: u32,
    /// A queue's dispatch rate in force (messages/s), if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch_rate_per_s: Option<f64>,
    /// A queue's max_in_flight (leases held at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u64>,
    /// With key_concurrency: of the ready messages, those waiting for a slot of their key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_waiting: Option<u64>,
}

impl Sample {
    /// Messages wait while every lease max_in_flight allows is held.
    fn at_in_flight_cap(&self) -> bool {
        self.ready > 0 && self.max_in_flight.is_some_and(|max| self.in_flight >= max)
    }

    /// Every ready message waits for a slot of its key (key_concurrency).
    fn behind_keys(&self) -> bool {
        self.ready > 0
            && self
                .key_waiting
                .is_some_and(|waiting| waiting >= self.ready)
    }
}

/// A service at this share of the dispatch rate is the rate's doing (a token bucket with a
/// burst lets a window run a little over or under it).
const AT_RATE: f64 = 0.9;

/// What caps a queue's service whatever its consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// Messages wait and the service runs at the queue's dispatch rate.
    DispatchRate,
    /// Messages wait and every lease the queue's max_in_flight allows is held.
    MaxInFlight,
    /// Every message ready waits for a slot of its key (key_concurrency): the keys, not
    /// the consumers, set the pace.
    KeyConcurrency,
}

/// How the forecast is asked: its objectives and the window its rates are read over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Objectives {
    /// Rates are read over this much of the history (and at least one sample interval).
    pub rate_window_ms: u64,
    /// The oldest message should not be older than this.
    pub age_objective_ms: u64,
    /// The backlog should drain within this (what `consumers_needed` is for).
    pub drain_target_ms: u64,
}

impl Default for Objectives {
    fn default() -> Self {
        Objectives {
            rate_window_ms: 60_000,
            age_objective_ms: 300_000,
            drain_target_ms: 300_000,
        }
    }
}

/// Where the backlog is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    /// Nothing waits.
    Empty,
    /// Served faster than it arrives: it drains in `drain_ms`.
    Draining,
    /// Arrivals outpace service: it does not drain at these rates.
    Growing,
    /// A backlog, and nothing arrives or is served: it waits for consumers.
    Stalled,
    /// Not enough history yet to measure rates (less than one sample interval).
    Unknown,
}

/// Where the per-consumer rate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateSource {
    /// Measured over a window in which a backlog was ready for the same consumers
    /// throughout: their capacity.
    Busy,
    /// Measured while consumers sometimes waited for messages: a lower bound on capacity.
    Idle,
}

/// A subject's forecast.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub at_ms: i64,
    /// The span the rates were measured over (0: none yet).
    pub window_ms: u64,
    pub backlog: u64,
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub oldest_age_ms: u64,
    /// Messages arriving per second (None: no window yet).
    pub arrival_per_s: Option<f64>,
    /// Messages leaving the backlog per second.
    pub service_per_s: Option<f64>,
    pub consumers: u32,
    /// Messages a second one consumer serves (see `per_consumer_source`).
    pub per_consumer_per_s: Option<f64>,
    pub per_consumer_source: Option<RateSource>,
    pub trend: Trend,
    /// Time to drain at the current rates: 0 when empty, None when growing, stalled or
    /// unknown.
    pub drain_ms: Option<u64>,
    pub age_objective_ms: u64,
    /// Time until the oldest message is older than the objective: 0 when it already is,
    /// None when its age is not heading there at the current rates.
    pub age_objective_breach_ms: Option<u64>,
    pub drain_target_ms: u64,
    /// Consumers that would drain the backlog within `drain_target_ms` while keeping up
    /// with arrivals, at most those a limit lets serve (see `limited_by`). Without a
    /// per-consumer rate to go by: the consumers there are, at least 1, while there is a
    /// backlog (scale from zero); 0 without one.
    pub consumers_needed: u32,
    /// The dispatch rate in force: no more is served a second, whatever the consumers.
    pub service_ceiling_per_s: Option<f64>,
    /// A limit of the queue's own that holds the service now: more consumers would be
    /// handed nothing more.
    pub limited_by: Option<Limit>,
}

/// The rates between two samples.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rates {
    window_ms: u64,
    arrival: f64,
    service: f64,
    /// Time-weighted mean of the consumers serving over the window.
    consumers: f64,
    /// A backlog was ready for the consumers at every sample of the window, the same
    /// consumers were there throughout, and each interval served some, and no limit of
    /// the queue's held: what they served is what they can.
    busy: bool,
    /// The service reached `AT_RATE` of the lowest dispatch rate in force in the window.
    at_rate: bool,
}

/// A subject's bounded ring of samples, and the per-consumer capacity last measured.
#[derive(Debug, Clone)]
pub struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
    interval_ms: u64,
    /// Per-consumer rate over the last busy window, and when.
    busy_rate: Option<(f64, i64)>,
}

impl History {
    /// A ring of `capacity` samples taken every `interval_ms`.
    pub fn new(capacity: usize, interval_ms: u64) -> History {
        History {
            samples: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(2),
            interval_ms: interval_ms.max(1),
            busy_rate: None,
        }
    }

    pub fn samples(&self) -> impl ExactSizeIterator<Item = &Sample> {
        self.samples.iter()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Keeps `sample` as the newest, dropping the oldest when full. A sample earlier than
    /// half an interval after the newest is ignored (two sweeps close together), and one
    /// earlier than the newest clears the ring (the clock went back). A counter lower than
    /// before (the subject was deleted and made again) starts the ring again too.
    pub fn record(&mut self, sample: Sample, rate_window_ms: u64) {
        if let Some(last) = self.samples.back() {
            if sample.at_ms < last.at_ms || sample.arrived < last.arrived {
                self.samples.clear();
                self.busy_rate = None;
            } else if ((sample.at_ms - last.at_ms) as u64) < self.interval_ms / 2 {
                return;
            }
        }
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        if let Some(rates) = self.rates(&sample, rate_window_ms)
            && rates.busy
            && rates.consumers > 0.0
            && rates.service > 0.0
            && rates.window_ms >= self.interval_ms
        {
            self.busy_rate = Some((rates.service / rates.consumers, sample.at_ms));
        }
    }

    /// Rates from the oldest sample within `window_ms` of `now` (at least one interval
    /// back, so a window shorter than the interval still has two points) to `now`.
    fn rates(&self, now: &Sample, window_ms: u64) -> Option<Rates> {
        let window = window_ms.max(self.interval_ms) as i64;
        let from = self
            .samples
            .iter()
            .find(|s| s.at_ms >= now.at_ms - window && s.at_ms < now.at_ms)?;
        // Less than an interval apart (the first sweep after a start): too short to tell.
        if now.at_ms - from.at_ms < self.interval_ms as i64 || now.arrived < from.arrived {
            return None;
        }
        let span = (now.at_ms - from.at_ms) as f64 / 1000.0;
        let arrived = (now.arrived - from.arrived) as f64;
        let arrival = arrived / span;
        // Conservation: what arrived and is not in the backlog any more was served.
        let served = (arrived + from.backlog as f64 - now.backlog as f64).max(0.0);
        let service = served / span;
        // Time-weighted mean consumers: each sample's count holds until the next.
        let mut weighted = 0.0;
        let mut previous: Option<&Sample> = None;
        let mut busy = true;
        let mut served_each = true;
        let mut ceiling: Option<f64> = None;
        for s in self
            .samples
            .iter()
            .filter(|s| s.at_ms >= from.at_ms && s.at_ms < now.at_ms)
            .chain(std::iter::once(now))
        {
            if let Some(p) = previous {
                weighted += p.serving as f64 * (s.at_ms - p.at_ms) as f64 / 1000.0;
                busy &= p.serving == s.serving;
                served_each &= s.arrived + p.backlog > p.arrived + s.backlog;
            }
            busy &= s.ready > 0 && !s.at_in_flight_cap() && !s.behind_keys();
            if let Some(rate) = s.dispatch_rate_per_s {
                ceiling = Some(ceiling.map_or(rate, |c: f64| c.min(rate)));
            }
            previous = Some(s);
        }
        let at_rate = ceiling.is_some_and(|c| service >= AT_RATE * c);
        Some(Rates {
            window_ms: (now.at_ms - from.at_ms) as u64,
            arrival,
            service,
            consumers: weighted / span,
            busy: busy && served_each && !at_rate,
            at_rate,
        })
    }

    /// The forecast at `now` (a sample taken as it is asked).
    pub fn forecast(&self, now: &Sample, objectives: &Objectives) -> Forecast {
        let rates = self.rates(now, objectives.rate_window_ms);
        let backlog = now.backlog as f64;
        let per_consumer = match (self.busy_rate, rates) {
            (_, Some(r)) if r.busy && r.consumers > 0.0 && r.service > 0.0 => {
                Some((r.service / r.consumers, RateSource::Busy))
            }
            (Some((rate, _)), _) => Some((rate, RateSource::Busy)),
            (None, Some(r)) if r.consumers > 0.0 && r.service > 0.0 => {
                Some((r.service / r.consumers, RateSource::Idle))
            }
            _ => None,
        };
        let (trend, drain_ms) = match rates {
            _ if now.backlog == 0 => (Trend::Empty, Some(0)),
            None => (Trend::Unknown, None),
            Some(r) if r.service > r.arrival => (
                Trend::Draining,
                Some(seconds_to_ms(backlog / (r.service - r.arrival))),
            ),
            Some(r) if r.service == 0.0 && r.arrival == 0.0 => (Trend::Stalled, None),
            Some(_) => (Trend::Growing, None),
        };
        let age = now.oldest_age_ms as f64 / 1000.0;
        let objective = objectives.age_objective_ms as f64 / 1000.0;
        let age_objective_breach_ms = if now.backlog == 0 {
            None
        } else if age >= objective {
            Some(0)
        } else {
            // Without rates, assume no service: the age grows a second a second.
            let service = rates.map_or(0.0, |r| r.service);
            let ageing = if age > 0.0 {
                1.0 - service * age / backlog
            } else {
                1.0
            };
            (ageing > 0.0)
                .then(|| seconds_to_ms((objective - age) / ageing))
                // Drained before then: the objective holds.
                .filter(|breach| drain_ms.is_none_or(|drain| drain > *breach))
        };
        let target = (objectives.drain_target_ms as f64 / 1000.0).max(0.001);
        let limited_by = if now.at_in_flight_cap() {
            Some(Limit::MaxInFlight)
        } else if now.behind_keys() {
            Some(Limit::KeyConcurrency)
        } else if now.ready > 0 && rates.is_some_and(|r| r.at_rate) {
            Some(Limit::DispatchRate)
        } else {
            None
        };
        let mut consumers_needed = match (rates, per_consumer) {
            (Some(r), Some((rate, _))) => ceil_u32((r.arrival + backlog / target) / rate),
            _ if now.backlog > 0 => now.consumers.max(1),
            _ => 0,
        };
        // No more than the dispatch rate keeps busy; while the leases are all held, no more
        // than there are.
        if let (Some(ceiling), Some((rate, _))) = (now.dispatch_rate_per_s, per_consumer) {
            consumers_needed = consumers_needed.min(ceil_u32(ceiling / rate).max(1));
        }
        if matches!(limited_by, Some(Limit::MaxInFlight | Limit::KeyConcurrency)) {
            consumers_needed = consumers_needed.min(now.consumers.max(1));
        }
        Forecast {
            at_ms: now.at_ms,
            window_ms: rates.map_or(0, |r| r.window_ms),
            backlog: now.backlog,
            ready: now.ready,
            in_flight: now.in_flight,
            delayed: now.delayed,
            oldest_age_ms: now.oldest_age_ms,
            arrival_per_s: rates.map(|r| r.arrival),
            service_per_s: rates.map(|r| r.service),
            consumers: now.consumers,
            per_consumer_per_s: per_consumer.map(|(rate, _)| rate),
            per_consumer_source: per_consumer.map(|(_, source)| source),
            trend,
            drain_ms,
            age_objective_ms: objectives.age_objective_ms,
            age_objective_breach_ms,
            drain_target_ms: objectives.drain_target_ms,
            consumers_needed,
            service_ceiling_per_s: now.dispatch_rate_per_s,
            limited_by,
        }
    }
}

fn ceil_u32(x: f64) -> u32 {
    x.ceil().clamp(0.0, u32::MAX as f64) as u32
}

fn seconds_to_ms(seconds: f64) -> u64 {
    (seconds * 1000.0).round().clamp(0.0, u64::MAX as f64) as u64
}

/// Consumers of a queue seen recently, by an identity the caller gives (a name the client
/// sends, or its connection): when each last asked for messages, and when it was last
/// handed some. Bounded: past `MAX_SEEN_CONSUMERS` identities the one seen longest ago goes.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Identity -> (last asked, last handed messages; `i64::MIN` for never).
    last: HashMap<u64, (i64, i64)>,
}

/// Identities a queue remembers for its consumer count.
pub const MAX_SEEN_CONSUMERS: usize = 1024;

impl Seen {
    /// `consumer` asks for messages.
    pub fn see(&mut self, consumer: u64, now_ms: i64) {
        if self.last.len() >= MAX_SEEN_CONSUMERS
            && !self.last.contains_key(&consumer)
            && let Some((&stalest, _)) = self.last.iter().min_by_key(|(_, (at, _))| *at)
        {
            self.last.remove(&stalest);
        }
        self.last
            .entry(consumer)
            .and_modify(|(seen, _)| *seen = now_ms)
            .or_insert((now_ms, i64::MIN));
    }

    /// `consumer` was handed messages.
    pub fn served(&mut self, consumer: u64, now_ms: i64) {
        self.see(consumer, now_ms);
        if let Some((_, served)) = self.last.get_mut(&consumer) {
            *served = now_ms;
        }
    }

    /// Consumers seen within `idle_ms` of `now_ms` (forgetting the others), and of them
    /// those handed messages within `window_ms`.
    pub fn active(&mut self, now_ms: i64, idle_ms: u64, window_ms: u64) -> (u32, u32) {
        self.last
            .retain(|_, (seen, _)| now_ms.saturating_sub(*seen) <= idle_ms as i64);
        let serving = self
            .last
            .values()
            .filter(|(_, served)| {
                *served != i64::MIN && now_ms.saturating_sub(*served) <= window_ms as i64
            })
            .count();
        (self.last.len() as u32, serving as u32)
    }
}

/// A consumer's identity from what names it (hashed; the name is not kept).
pub fn consumer_id(name: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1000;

    /// A queue served by `consumers` at `per_consumer` a second each, with arrivals at
    /// `arrival` a second, sampled every 10 s from a backlog of `backlog`.
    fn steady(
        history: &mut History,
        start: Sample,
        seconds: i64,
        arrival: u64,
        served_per_s: u64,
        consumers: u32,
    ) -> Sample {
        let mut s = start;
        for _ in 0..seconds / 10 {
            s.at_ms += 10 * SEC;
            s.arrived += arrival * 10;
            s.backlog = (s.backlog + arrival * 10).saturating_sub(served_per_s * 10);
            s.ready = s.backlog;
            s.consumers = consumers;
            s.serving = consumers;
            history.record(s, 60_000);
        }
        s
    }

    fn objectives() -> Objectives {
        Objectives {
            rate_window_ms: 60_000,
            age_objective_ms: 600_000,
            drain_target_ms: 60_000,
        }
    }

    #[test]
    fn a_draining_backlog_forecasts_its_drain_and_the_consumers_to_drain_it_in_time() {
        let mut h = History::new(360, 10_000);
        let start = Sample {
            at_ms: 0,
            backlog: 120_000,
            ready: 120_000,
            consumers: 4,
            serving: 4,
            ..Sample::default()
        };
        h.record(start, 60_000);
        // 4 consumers at 250/s each against 200/s arriving: 800 - 200 = 600/s net.
        let now = steady(&mut h, start, 60, 200, 1000, 4);
        let f = h.forecast(&now, &objectives());
        assert_eq!(f.trend, Trend::Draining);
        assert_eq!(f.window_ms, 60_000);
        assert_eq!(f.arrival_per_s, Some(200.0));
        assert_eq!(f.service_per_s, Some(1000.0));
        assert_eq!(f.per_consumer_per_s, Some(250.0));
        assert_eq!(f.per_consumer_source, Some(RateSource::Busy));
        // 120,000 + 60·200 − 60·1000 = 72,000 left, at 800/s net: 90 s.
        assert_eq!(now.backlog, 72_000);
        assert_eq!(f.drain_ms, Some(90_000));
        // Within 60 s: (200 + 72,000/60) / 250 = 5.6 -> 6 consumers.
        assert_eq!(f.consumers_needed, 6);
        // The age objective (600 s) holds: the backlog is gone in 90 s.
        assert_eq!(f.age_objective_breach_ms, None);
    }

    /// Consumers served at a dispatch rate of 400/s: the rate, not the consumers, sets the
    /// service, so the window is not a measure of their capacity and the consumers needed
    /// stay at what the rate keeps busy, however many are added.
    #[test]
    fn a_dispatch_rate_caps_the_consumers_needed_at_what_it_keeps_busy() {
        let mut h = History::new(360, 10_000);
        let mut now = Sample {
            at_ms: 0,
            backlog: 100_000,
            ready: 100_000,
            consumers: 4,
            serving: 4,
            dispatch_rate_per_s: Some(400.0),
            ..Sample::default()
        };
        h.record(now, 60_000);
        for consumers in [4, 8, 16] {
            // Two windows: the last holds these consumers only.
            now = steady(&mut h, now, 120, 500, 400, consumers);
            let f = h.forecast(&now, &objectives());
            assert_eq!(f.limited_by, Some(Limit::DispatchRate));
            assert_eq!(f.service_ceiling_per_s, Some(400.0));
            assert_eq!(f.trend, Trend::Growing);
            assert_eq!(f.per_consumer_source, Some(RateSource::Idle));
            // 400/s over `consumers`: ⌈400 / (400/consumers)⌉ = consumers, never more.
            assert_eq!(f.consumers_needed, consumers, "{f:?}");
        }
        // A rate the consumers do not reach holds nothing: they are measured busy.
        let mut h = History::new(360, 10_000);
        let mut now = Sample {
            dispatch_rate_per_s: Some(10_000.0),
            consumers: 4,
            serving: 4,
            ..now
        };
        h.record(now, 60_000);
        now = steady(&mut h, now, 60, 500, 400, 4);
        let f = h.forecast(&now, &objectives());
        assert_eq!(f.limited_by, None);
        assert_eq!(f.per_consumer_source, Some(RateSource::Busy));
        assert_eq!(f.per_consumer_per_s, Some(100.0));
        // (500 + backlog/60) / 100, at most ⌈10,000/100⌉ = 100.
        assert_eq!(
            f.consumers_needed,
            100.min(ceil_u32((500.0 + now.backlog as f64 / 60.0) / 100.0))
        );
    }

    /// Every lease max_in_flight allows held with messages waiting: no more consumers than
    /// there are, and the window measures the cap, not the consumers.
    #[test]
    fn max_in_flight_caps_the_consumers_needed_at_those_there_are() {
        let mut h = History::new(360, 10_000);
        let mut now = Sample {
            at_ms: 0,
            backlog: 100_000,
            ready: 99_900,
            in_flight: 100,
            consumers: 4,
            serving: 4,
            max_in_flight: Some(100),
            ..Sample::default()
        };
        h.record(now, 60_000);
        now = steady(&mut h, now, 60, 500, 400, 4);
        now.ready = now.backlog - 100;
        let f = h.forecast(&now, &objectives());
        assert_eq!(f.limited_by, Some(Limit::MaxInFlight));
        assert_eq!(f.per_consumer_source, Some(RateSource::Idle));
        assert_eq!(f.consumers_needed, 4);
        // Below the cap, nothing limits.
        now.in_flight = 99;
        assert_eq!(h.forecast(&now, &objectives()).limited_by, None);
    }

    #[test]
    fn arrivals_outpacing_service_are_growing_and_need_more_consumers() {
        let mut h = History::new(360, 10_000);
        let start = Sample {
            at_ms: 0,
            backlog: 1_000,
            ready: 1_000,
            oldest_age_ms: 10_000,
            consumers: 2,
            serving: 2,
            ..Sample::default()
        };
        h.record(start, 60_000);
        let mut now = steady(&mut h, start, 60, 500, 200, 2);
        now.oldest_age_ms = 70_000;
        let f = h.forecast(&now, &objectives());
        assert_eq!(f.trend, Trend::Growing);
        assert_eq!(f.drain_ms, None);
        assert_eq!(f.per_consumer_per_s, Some(100.0));
        // (500 + 19,000/60) / 100 = 8.17 -> 9.
        assert_eq!(f.consumers_needed, 9);
        // Age 70 s, backlog 19,000, service 200/s: the age moves at 1 − 200·70/19,000 =
        // 0.263 s/s, so 530 s to the 600 s objective take 2,014 s.
        let breach = f
            .age_objective_breach_ms
            .expect("heading for the objective");
        assert!((2_000_000..2_030_000).contains(&breach), "{breach}");
    }

    #[test]
    fn idle_consumers_give_a_lower_bound_and_busy_ones_are_remembered() {
        let mut h = History::new(360, 10_000);
        let start = Sample {
            at_ms: 0,
            backlog: 100_000,
            ready: 100_000,
            consumers: 5,
            serving: 5,
            ..Sample::default()
        };
        h.record(start, 60_000);
        // Busy: 5 consumers serve 1,000/s (200 each) with no arrivals.
        let mut now = steady(&mut h, start, 60, 0, 1000, 5);
        assert_eq!(
            h.forecast(&now, &objectives()).per_consumer_per_s,
            Some(200.0)
        );
        // Then the backlog is gone and they keep up with 100/s arriving: 20 each, idle.
        now.backlog = 0;
        now.ready = 0;
        h.record(now, 60_000);
        let now = steady(&mut h, now, 120, 100, 100, 5);
        let f = h.forecast(&now, &objectives());
        assert_eq!(f.trend, Trend::Empty);
        assert_eq!(f.drain_ms, Some(0));
        assert_eq!(f.age_objective_breach_ms, None);
        // Capacity 200/s each is what was measured busy: 100/s needs one consumer.
        assert_eq!(f.per_consumer_per_s, Some(200.0));
        assert_eq!(f.per_consumer_source, Some(RateSource::Busy));
        assert_eq!(f.consumers_needed, 1);

        // A fresh history that never saw its consumers busy says so.
        let mut fresh = History::new(360, 10_000);
        let start = Sample {
            consumers: 5,
            serving: 5,
            ..Sample::default()
        };
        fresh.record(start, 60_000);
        let now = steady(&mut fresh, start, 60, 100, 100, 5);
        let f = fresh.forecast(&now, &objectives());
        assert_eq!(f.per_consumer_per_s, Some(20.0));
        assert_eq!(f.per_consumer_source, Some(RateSource::Idle));
        assert_eq!(f.consumers_needed, 5);
    }

    #[test]
    fn without_history_or_consumers_the_forecast_says_so() {
        let h = History::new(360, 10_000);
        let now = Sample {
            at_ms: 5,
            backlog: 10,
            ready: 10,
            oldest_age_ms: 1_000,
            ..Sample::default()
        };
        let f = h.forecast(&now, &objectives());
        assert_eq!(f.trend, Trend::Unknown);
        assert_eq!(f.arrival_per_s, None);
        assert_eq!(f.drain_ms, None);
        // No service known: the age grows a second a second to the 600 s objective.
        assert_eq!(f.age_objective_breach_ms, Some(599_000));
        // A backlog and nobody to serve it: scale from zero to one.
        assert_eq!(f.consumers_needed, 1);
        let empty = Sample::default();
        assert_eq!(h.forecast(&empty, &objectives()).consumers_needed, 0);
        // Past the objective already: 0.
        let old = Sample {
            oldest_age_ms: 700_000,
            ..now
        };
        assert_eq!(
            h.forecast(&old, &objectives()).age_objective_breach_ms,
            Some(0)
        );
    }

    #[test]
    fn a_backlog_nobody_serves_or_adds_to_is_stalled() {
        let mut h = History::new(360, 10_000);
        let start = Sample {
            backlog: 50,
            ready: 50,
            ..Sample::default()
        };
        h.record(start, 60_000);
        let now = steady(&mut h, start, 30, 0, 0, 0);
        let f = h.forecast(&now, &objectives());
        assert_eq!((f.trend, f.drain_ms), (Trend::Stalled, None));
        assert_eq!(f.consumers_needed, 1);
        let now = steady(&mut h, now, 30, 1, 0, 0);
        assert_eq!(h.forecast(&now, &objectives()).trend, Trend::Growing);
    }

    #[test]
    fn the_ring_is_bounded_and_starts_again_when_time_or_counters_go_back() {
        let mut h = History::new(3, 10_000);
        for i in 0..10 {
            h.record(
                Sample {
                    at_ms: i * 10 * SEC,
                    arrived: i as u64,
                    ..Sample::default()
                },
                60_000,
            );
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.samples().next().unwrap().at_ms, 70 * SEC);
        // Too soon after the last: ignored.
        h.record(
            Sample {
                at_ms: 91 * SEC,
                arrived: 9,
                ..Sample::default()
            },
            60_000,
        );
        assert_eq!(h.len(), 3);
        // Counters lower (deleted and made again): the ring starts again.
        h.record(
            Sample {
                at_ms: 100 * SEC,
                arrived: 0,
                ..Sample::default()
            },
            60_000,
        );
        assert_eq!(h.len(), 1);
        // The clock went back: again.
        h.record(Sample::default(), 60_000);
        assert_eq!(h.len(), 1);
        assert_eq!(h.samples().next().unwrap().at_ms, 0);
    }

    #[test]
    fn consumers_are_counted_within_the_idle_window_and_bounded() {
        let mut seen = Seen::default();
        seen.served(consumer_id(b"a"), 0);
        seen.see(consumer_id(b"b"), 5_000);
        seen.see(consumer_id(b"a"), 10_000);
        // Both seen; only a was handed messages, 10 s ago.
        assert_eq!(seen.active(10_000, 60_000, 30_000), (2, 1));
        assert_eq!(seen.active(40_000, 60_000, 30_000), (2, 0));
        assert_eq!(seen.active(66_000, 60_000, 30_000), (1, 0));
        for i in 0..(MAX_SEEN_CONSUMERS as u64 + 10) {
            seen.served(i, 70_000 + i as i64);
        }
        assert_eq!(
            seen.active(80_000, 60_000, 30_000),
            (MAX_SEEN_CONSUMERS as u32, MAX_SEEN_CONSUMERS as u32)
        );
    }

    #[test]
    fn consumers_that_stopped_do_not_lower_the_per_consumer_rate() {
        // Six seen, one serving 68/s: the rate per consumer is 68, not 68/6.
        let mut h = History::new(360, 1_000);
        let mut s = Sample {
            backlog: 100_000,
            ready: 100_000,
            consumers: 6,
            serving: 1,
            ..Sample::default()
        };
        h.record(s, 10_000);
        for _ in 0..10 {
            s.at_ms += 1_000;
            s.backlog -= 68;
            s.ready = s.backlog;
            h.record(s, 10_000);
        }
        let f = h.forecast(
            &s,
            &Objectives {
                rate_window_ms: 10_000,
                ..objectives()
            },
        );
        assert_eq!(f.consumers, 6);
        assert_eq!(f.per_consumer_per_s, Some(68.0));
        assert_eq!(f.per_consumer_source, Some(RateSource::Busy));
    }
}
