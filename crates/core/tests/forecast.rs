//! Backlog forecasts through the broker, in simulated time: rates, consumers, drain time
//! and consumers needed for a queue, a subscription and a consumer group; and the errors.

use tidewater_core::forecast::{Limit, Objectives, RateSource, Trend};
use tidewater_core::harness::{Harness, HarnessOptions, messages};
use tidewater_core::stream::config::StreamPatch;
use tidewater_core::stream::records::NewStreamRecord;
use tidewater_core::stream::subscription::SubscriptionPatch;
use tidewater_core::{AckLevel, ErrorCode, ForecastOptions, Subject};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Samples every second, rates over 10 s.
fn harness() -> Harness {
    Harness::temporary(HarnessOptions {
        forecast: ForecastOptions {
            sample_interval_ms: 1_000,
            history_ms: 600_000,
            consumer_idle_ms: 5_000,
            objectives: Objectives {
                rate_window_ms: 10_000,
                age_objective_ms: 600_000,
                drain_target_ms: 60_000,
            },
        },
        ..HarnessOptions::default()
    })
    .unwrap()
}

/// `seconds` simulated seconds of work on `queue`: each second every consumer receives up
/// to `take` and acks them, then `arrive` more are published.
async fn serve(
    h: &Harness,
    queue: &str,
    consumers: &[&str],
    take: usize,
    arrive: usize,
    seconds: usize,
) {
    for _ in 0..seconds {
        for c in consumers {
            let got = h.receive_as(c, queue, take).await.unwrap();
            h.ack(queue, &got).await.unwrap();
        }
        if arrive > 0 {
            h.publish(queue, &messages(arrive)).await.unwrap();
        }
        h.advance(1_000).await;
    }
}

fn close(got: Option<f64>, want: f64) -> bool {
    got.is_some_and(|g| (g - want).abs() <= want * 0.01 + 1e-9)
}

#[test]
fn a_queue_forecasts_from_its_rates_and_counts_its_consumers() {
    runtime().block_on(async {
        let h = harness();
        h.queue("orders", serde_json::json!({})).await.unwrap();
        h.publish("orders", &messages(6_000)).await.unwrap();
        // Before any history: a backlog, no rates, one consumer to start with.
        let f = h
            .broker()
            .forecast(&Subject::Queue("orders".into()), None)
            .unwrap();
        assert_eq!(f.trend, Trend::Unknown);
        assert_eq!(f.backlog, 6_000);
        assert_eq!(f.consumers_needed, 1);

        // Three consumers take 20 a second each; 15 a second arrive.
        for _ in 0..20 {
            for c in ["a", "b", "c"] {
                let got = h.receive_as(c, "orders", 20).await.unwrap();
                assert_eq!(got.len(), 20);
                h.ack("orders", &got).await.unwrap();
            }
            h.publish("orders", &messages(15)).await.unwrap();
            h.advance(1_000).await;
        }
        let f = h
            .broker()
            .forecast(&Subject::Queue("orders".into()), None)
            .unwrap();
        assert_eq!(f.consumers, 3);
        assert_eq!(f.window_ms, 10_000);
        assert!(close(f.arrival_per_s, 15.0), "{f:?}");
        assert!(close(f.service_per_s, 60.0), "{f:?}");
        assert!(close(f.per_consumer_per_s, 20.0), "{f:?}");
        assert_eq!(f.per_consumer_source, Some(RateSource::Busy));
        assert_eq!(f.trend, Trend::Draining);
        // 6,000 − 20·45 = 5,100 left at 45 a second net.
        assert_eq!(f.backlog, 5_100);
        let drain = f.drain_ms.unwrap() as f64;
        assert!((drain - 5_100.0 / 45.0 * 1000.0).abs() < 2_000.0, "{f:?}");
        // Within 60 s: (15 + 5,100/60) / 20 = 5 consumers.
        assert_eq!(f.consumers_needed, 5);
        // Other objectives on request.
        let f = h
            .broker()
            .forecast(
                &Subject::Queue("orders".into()),
                Some(Objectives {
                    rate_window_ms: 10_000,
                    age_objective_ms: 1_000,
                    drain_target_ms: 600_000,
                }),
            )
            .unwrap();
        assert_eq!(f.consumers_needed, 2);
        assert_eq!(f.age_objective_breach_ms, Some(0));

        // The consumers stop: after the idle window they are not counted, and the backlog
        // grows.
        for _ in 0..12 {
            h.publish("orders", &messages(15)).await.unwrap();
            h.advance(1_000).await;
        }
        let f = h
            .broker()
            .forecast(&Subject::Queue("orders".into()), None)
            .unwrap();
        assert_eq!(f.consumers, 0);
        assert_eq!(f.trend, Trend::Growing);
        assert_eq!(f.drain_ms, None);
        // Capacity was measured busy: 20 a second each.
        assert!(close(f.per_consumer_per_s, 20.0), "{f:?}");

        // The history the console draws: one sample a second.
        let samples = h
            .broker()
            .history(&Subject::Queue("orders".into()))
            .unwrap();
        assert!(samples.len() >= 30, "{}", samples.len());
        assert!(samples.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
    });
}

/// A queue whose dispatch rate caps its service: more consumers would be handed nothing
/// more, so the forecast says what limits it and asks for no more consumers than the rate
/// can keep busy (not a runaway: the rate each consumer is measured at falls as consumers
/// are added, and the consumers "needed" would grow without end).
#[test]
fn a_dispatch_rate_limits_the_consumers_needed() {
    runtime().block_on(async {
        let h = harness();
        h.queue(
            "mail",
            serde_json::json!({"dispatch_rate": {"per_s": 40, "burst": 40}}),
        )
        .await
        .unwrap();
        h.publish("mail", &messages(6_000)).await.unwrap();
        // Four consumers could take 20 a second each; the rate hands out 40 a second.
        serve(&h, "mail", &["a", "b", "c", "d"], 20, 60, 20).await;
        let f = h
            .broker()
            .forecast(&Subject::Queue("mail".into()), None)
            .unwrap();
        assert_eq!(f.limited_by, Some(Limit::DispatchRate), "{f:?}");
        assert_eq!(f.service_ceiling_per_s, Some(40.0), "{f:?}");
        assert!(close(f.service_per_s, 40.0), "{f:?}");
        assert_eq!(f.trend, Trend::Growing);
        assert!(
            (1..=4).contains(&f.consumers_needed),
            "no more consumers than the rate keeps busy: {f:?}"
        );
        // Without the rate, the same consumers are measured at what they can do.
        h.queue("mail", serde_json::json!({"dispatch_rate": null}))
            .await
            .unwrap();
        serve(&h, "mail", &["a", "b", "c", "d"], 20, 60, 12).await;
        let f = h
            .broker()
            .forecast(&Subject::Queue("mail".into()), None)
            .unwrap();
        assert_eq!(f.limited_by, None, "{f:?}");
        assert_eq!(f.service_ceiling_per_s, None);
        assert!(close(f.per_consumer_per_s, 20.0), "{f:?}");
        assert_eq!(f.trend, Trend::Draining);
    });
}

/// A queue at its max_in_flight: consumers beyond those holding the leases get nothing.
#[test]
fn max_in_flight_limits_the_consumers_needed() {
    runtime().block_on(async {
        let h = harness();
        h.queue("jobs", serde_json::json!({"max_in_flight": 8}))
            .await
            .unwrap();
        h.publish("jobs", &messages(6_000)).await.unwrap();
        // Each consumer acks what it held a second, then asks for 5 more: 8 are handed out
        // a second, whatever the consumers.
        let mut held: Vec<Vec<_>> = (0..4).map(|_| Vec::new()).collect();
        for _ in 0..20 {
            for (i, c) in ["a", "b", "c", "d"].into_iter().enumerate() {
                h.ack("jobs", &held[i]).await.unwrap();
                held[i] = h.receive_as(c, "jobs", 5).await.unwrap();
            }
            h.publish("jobs", &messages(20)).await.unwrap();
            h.advance(1_000).await;
        }
        let f = h
            .broker()
            .forecast(&Subject::Queue("jobs".into()), None)
            .unwrap();
        assert_eq!(f.in_flight, 8);
        assert_eq!(f.limited_by, Some(Limit::MaxInFlight), "{f:?}");
        assert_eq!(f.trend, Trend::Growing);
        assert!(
            (1..=4).contains(&f.consumers_needed),
            "no more consumers than there are: {f:?}"
        );
    });
}

/// A queue whose backlog is one hot key under key_concurrency 1: one message at a time,
/// whatever the consumers.
#[test]
fn key_concurrency_limits_the_consumers_needed() {
    runtime().block_on(async {
        let h = harness();
        h.queue("orders", serde_json::json!({"key_concurrency": 1}))
            .await
            .unwrap();
        let mut hot = messages(600);
        for m in &mut hot {
            m.key = Some("customer-7".into());
        }
        h.publish("orders", &hot).await.unwrap();
        serve(&h, "orders", &["a", "b", "c", "d"], 10, 0, 20).await;
        // One is leased at the sample: take it, so every ready message waits behind it.
        let held = h.receive_as("a", "orders", 10).await.unwrap();
        assert_eq!(held.len(), 1);
        let f = h
            .broker()
            .forecast(&Subject::Queue("orders".into()), None)
            .unwrap();
        assert_eq!(f.limited_by, Some(Limit::KeyConcurrency), "{f:?}");
        assert!(
            (1..=4).contains(&f.consumers_needed),
            "no more consumers than there are: {f:?}"
        );
    });
}

#[test]
fn a_subscription_and_a_group_have_forecasts_too() {
    runtime().block_on(async {
        let h = harness();
        let b = h.broker();
        b.put_stream(
            "events",
            &StreamPatch {
                partitions: Some(2),
                ..StreamPatch::default()
            },
        )
        .await
        .unwrap();
        b.put_subscription(
            "events",
            "billing",
            &SubscriptionPatch::from_json(b"{}").unwrap(),
        )
        .await
        .unwrap();
        let _member = b
            .join_group("readers", None, &["events".to_string()], 30_000)
            .unwrap();
        let mut committed = [0u64; 2];
        for _ in 0..15 {
            let records: Vec<NewStreamRecord> = (0..100)
                .map(|i| NewStreamRecord {
                    key: Some(format!("k{i}").into_bytes()),
                    value: Some(b"v".to_vec()),
                    ..NewStreamRecord::default()
                })
                .collect();
            b.produce("events", &records, AckLevel::Durable)
                .await
                .unwrap();
            // The subscription's one consumer takes 40 a second.
            let got = h.receive_as("w1", "events/billing", 40).await.unwrap();
            h.ack("events/billing", &got).await.unwrap();
            // The group commits 30 a second in each partition (its member joined at the start).
            for (p, c) in committed.iter_mut().enumerate() {
                *c += 30;
                b.commit("readers", "events", p as u32, *c, "")
                    .await
                    .unwrap();
            }
            h.advance(1_000).await;
        }
        let sub = b
            .forecast(&Subject::Queue("events/billing".into()), None)
            .unwrap();
        assert_eq!(sub.consumers, 1);
        assert!(close(sub.arrival_per_s, 100.0), "{sub:?}");
        assert!(close(sub.service_per_s, 40.0), "{sub:?}");
        assert_eq!(sub.trend, Trend::Growing);
        // (100 + 900/60) / 40 = 2.9 -> 3.
        assert_eq!(sub.backlog, 900);
        assert_eq!(sub.consumers_needed, 3);

        let group = b.forecast(&Subject::Group("readers".into()), None).unwrap();
        assert_eq!(group.consumers, 1);
        assert_eq!(group.backlog, 1_500 - 900);
        assert!(close(group.arrival_per_s, 100.0), "{group:?}");
        assert!(close(group.service_per_s, 60.0), "{group:?}");
        assert_eq!(group.trend, Trend::Growing);
        // (100 + 600/60) / 60 = 1.83 -> 2.
        assert_eq!(group.consumers_needed, 2);

        // Every subject is in the list the metrics read.
        let all = b.forecasts();
        let subjects: Vec<&Subject> = all.iter().map(|(s, _)| s).collect();
        assert!(subjects.contains(&&Subject::Queue("events/billing".into())));
        assert!(subjects.contains(&&Subject::Group("readers".into())));
    });
}

#[test]
fn unknown_subjects_and_bad_objectives_are_refused() {
    runtime().block_on(async {
        let h = harness();
        let b = h.broker();
        let err = b
            .forecast(&Subject::Queue("nope".into()), None)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::QueueNotFound);
        let err = b
            .forecast(&Subject::Group("nope".into()), None)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::GroupNotFound);
        h.queue("q", serde_json::json!({})).await.unwrap();
        let err = b
            .forecast(
                &Subject::Queue("q".into()),
                Some(Objectives {
                    rate_window_ms: 0,
                    ..Objectives::default()
                }),
            )
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        // A deleted queue's history goes at the next sample.
        b.delete_queue("q").await.unwrap();
        h.advance(20_000).await;
        assert_eq!(
            b.history(&Subject::Queue("q".into())).unwrap_err().code,
            ErrorCode::QueueNotFound
        );
    });
}
