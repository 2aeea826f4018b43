//! Samples of every queue, subscription and consumer group, kept in bounded rings for the
//! forecasts and the console's charts (the model is sans-IO, in `crate::forecast`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::{Broker, QueueHandle};
use crate::error::{BrokerError, ErrorCode};
use crate::forecast::{Forecast, History, Objectives, Sample};

/// What a forecast is of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Subject {
    /// A queue, or a subscription as `stream/subscription`.
    Queue(String),
    /// A consumer group, over every partition it has committed.
    Group(String),
}

impl Subject {
    pub fn name(&self) -> &str {
        match self {
            Subject::Queue(name) | Subject::Group(name) => name,
        }
    }
}

/// How the broker samples, and the forecast's default objectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForecastOptions {
    /// A sample of every subject this often (at the maintenance tick that follows).
    pub sample_interval_ms: u64,
    /// Samples kept per subject: this much history.
    pub history_ms: u64,
    /// A queue's consumer counts while it was seen (a receive) within this.
    pub consumer_idle_ms: u64,
    /// The objectives a forecast uses unless the request names others.
    pub objectives: Objectives,
}

impl Default for ForecastOptions {
    fn default() -> Self {
        ForecastOptions {
            sample_interval_ms: 15_000,
            history_ms: 3_600_000,
            consumer_idle_ms: 60_000,
            objectives: Objectives::default(),
        }
    }
}

impl ForecastOptions {
    /// Samples per subject (the ring's capacity).
    pub fn capacity(&self) -> usize {
        (self.history_ms / self.sample_interval_ms.max(1)).max(2) as usize
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(100..=3_600_000).contains(&self.sample_interval_ms) {
            return Err("sample_interval_ms must be 100..=3600000".into());
        }
        if self.history_ms < self.sample_interval_ms * 2 || self.capacity() > 100_000 {
            return Err(
                "history_ms must hold 2 to 100000 samples (history_ms / sample_interval_ms)".into(),
            );
        }
        if self.consumer_idle_ms == 0 {
            return Err("consumer_idle_ms must be positive".into());
        }
        check_objectives(&self.objectives).map_err(|e| e.message)
    }
}

/// Objectives as a request gives them: positive, and a window of at most a day.
pub fn check_objectives(o: &Objectives) -> Result<(), BrokerError> {
    let bad = |what: &str| {
        BrokerError::new(
            ErrorCode::InvalidRequest,
            format!("{what} must be 1..=604800000 (ms)"),
        )
    };
    for (name, value) in [
        ("rate_window_ms", o.rate_window_ms),
        ("age_objective_ms", o.age_objective_ms),
        ("drain_target_ms", o.drain_target_ms),
    ] {
        if !(1..=604_800_000).contains(&value) {
            return Err(bad(name));
        }
    }
    Ok(())
}

/// The rings, and when they were last filled.
#[derive(Debug, Default)]
pub(super) struct Forecasts {
    histories: HashMap<Subject, History>,
    last_sample_ms: Option<i64>,
}

impl Broker {
    pub fn forecast_options(&self) -> &ForecastOptions {
        &self.inner.forecast
    }

    /// Samples every subject when an interval has passed since the last sweep (the
    /// maintenance tick calls this); forgets the subjects that are gone.
    pub(super) fn sample_forecasts(&self) {
        let now = self.now_ms();
        let options = self.inner.forecast;
        {
            let f = self.inner.forecasts.lock();
            if f.last_sample_ms
                .is_some_and(|last| now >= last && now - last < options.sample_interval_ms as i64)
            {
                return;
            }
        }
        let samples = self.sample_all(now);
        let mut f = self.inner.forecasts.lock();
        f.last_sample_ms = Some(now);
        f.histories
            .retain(|subject, _| samples.contains_key(subject));
        for (subject, sample) in samples {
            f.histories
                .entry(subject)
                .or_insert_with(|| History::new(options.capacity(), options.sample_interval_ms))
                .record(sample, options.objectives.rate_window_ms);
        }
    }

    fn sample_all(&self, now: i64) -> HashMap<Subject, Sample> {
        let mut handles: Vec<_> = self.inner.queues.read().values().cloned().collect();
        handles.extend(self.subscription_handles());
        let mut out: HashMap<Subject, Sample> = handles
            .iter()
            .map(|h| (Subject::Queue(h.name.clone()), self.queue_sample(h, now)))
            .collect();
        out.extend(
            self.group_samples(now)
                .into_iter()
                .map(|(group, sample)| (Subject::Group(group), sample)),
        );
        out
    }

    fn queue_sample(&self, handle: &QueueHandle, now: i64) -> Sample {
        let (stats, max_in_flight, key_waiting) = {
            let mut state = handle.state.lock();
            state.refresh_oldest(&handle.reader);
            (
                state.stats(now),
                state.config.max_in_flight,
                state.key_waiting(),
            )
        };
        let max_in_flight = Some(max_in_flight);
        let (consumers, serving) = handle.consumers.lock().active(
            now,
            self.inner.forecast.consumer_idle_ms,
            self.inner.forecast.objectives.rate_window_ms,
        );
        Sample {
            at_ms: now,
            backlog: stats.total,
            ready: stats.depth,
            in_flight: stats.in_flight,
            delayed: stats.delayed,
            oldest_age_ms: stats.oldest_age_ms,
            arrived: stats.published,
            consumers,
            serving,
            dispatch_rate_per_s: stats.dispatch_rate_per_s,
            max_in_flight,
            key_waiting,
        }
    }

    /// Per group: its lag over the partitions it has committed, their arrivals (the sum
    /// of their ends), the oldest record not consumed, and its members.
    fn group_samples(&self, now: i64) -> BTreeMap<String, Sample> {
        let mut out: BTreeMap<String, Sample> = BTreeMap::new();
        for lag in self.group_lags() {
            let members = lag.members.min(u32::MAX as u64) as u32;
            let sample = out.entry(lag.group.clone()).or_insert(Sample {
                at_ms: now,
                consumers: members,
                serving: members,
                ..Sample::default()
            });
            sample.backlog += lag.lag;
            sample.ready += lag.lag;
            sample.oldest_age_ms = sample.oldest_age_ms.max(lag.lag_ms);
            sample.arrived += lag.ends;
        }
        out
    }

    fn live_sample(&self, subject: &Subject) -> Result<Sample, BrokerError> {
        let now = self.now_ms();
        match subject {
            Subject::Queue(name) => Ok(self.queue_sample(self.resolve(name)?.as_ref(), now)),
            Subject::Group(group) => {
                if !self.group_names().iter().any(|g| g == group) {
                    return Err(BrokerError::new(
                        ErrorCode::GroupNotFound,
                        format!("group '{group}' does not exist"),
                    ));
                }
                Ok(self.group_samples(now).remove(group).unwrap_or(Sample {
                    at_ms: now,
                    ..Sample::default()
                }))
            }
        }
    }

    /// The forecast of a queue, subscription (`stream/subscription`) or group now.
    pub fn forecast(
        &self,
        subject: &Subject,
        objectives: Option<Objectives>,
    ) -> Result<Forecast, BrokerError> {
        let objectives = objectives.unwrap_or(self.inner.forecast.objectives);
        check_objectives(&objectives)?;
        let now = self.live_sample(subject)?;
        let f = self.inner.forecasts.lock();
        Ok(match f.histories.get(subject) {
            Some(history) => history.forecast(&now, &objectives),
            None => {
                History::new(2, self.inner.forecast.sample_interval_ms).forecast(&now, &objectives)
            }
        })
    }

    /// A queue's or subscription's forecast with the default objectives (its stats).
    pub(super) fn forecast_of(&self, handle: &QueueHandle) -> Forecast {
        let now = self.queue_sample(handle, self.now_ms());
        let subject = Subject::Queue(handle.name.clone());
        let objectives = self.inner.forecast.objectives;
        let f = self.inner.forecasts.lock();
        match f.histories.get(&subject) {
            Some(history) => history.forecast(&now, &objectives),
            None => History::new(2, 1).forecast(&now, &objectives),
        }
    }

    /// Every subject's forecast with the default objectives (metrics), by subject.
    pub fn forecasts(&self) -> Vec<(Subject, Forecast)> {
        let now = self.now_ms();
        let samples = self.sample_all(now);
        let objectives = self.inner.forecast.objectives;
        let f = self.inner.forecasts.lock();
        let mut out: Vec<(Subject, Forecast)> = samples
            .into_iter()
            .map(|(subject, sample)| {
                let forecast = match f.histories.get(&subject) {
                    Some(history) => history.forecast(&sample, &objectives),
                    None => History::new(2, 1).forecast(&sample, &objectives),
                };
                (subject, forecast)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The samples kept of a subject, oldest first (the console's charts).
    pub fn history(&self, subject: &Subject) -> Result<Vec<Sample>, BrokerError> {
        self.live_sample(subject)?;
        Ok(self
            .inner
            .forecasts
            .lock()
            .histories
            .get(subject)
            .map(|h| h.samples().copied().collect())
            .unwrap_or_default())
    }

    /// Notes that `consumer` was handed messages from a queue or subscription.
    pub(super) fn served_consumer(&self, handle: &Arc<QueueHandle>, consumer: u64) {
        handle.consumers.lock().served(consumer, self.now_ms());
    }

    /// Notes a receive by `consumer` (an identity: `forecast::consumer_id`) on a queue or
    /// subscription, for its consumer count.
    pub(super) fn seen_consumer(&self, handle: &Arc<QueueHandle>, consumer: u64) {
        handle.consumers.lock().see(consumer, self.now_ms());
    }
}
