//! Redrive of chosen messages, by id (the console's "redrive selected").

use tidewater_core::harness::Harness;
use tidewater_core::{ErrorCode, NewMessage, RedriveRequest};

#[test]
fn a_redrive_by_ids_moves_only_those_messages() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(async {
            let h = Harness::temporary(Default::default()).unwrap();
            h.queue("jobs", serde_json::json!({"max_deliveries": 1}))
                .await
                .unwrap();
            let messages: Vec<NewMessage> = ["a", "b", "c"]
                .iter()
                .map(|id| NewMessage {
                    id: Some(id.to_string()),
                    body: id.as_bytes().to_vec(),
                    ..NewMessage::default()
                })
                .collect();
            h.publish("jobs", &messages).await.unwrap();
            let got = h.receive("jobs", 3).await.unwrap();
            let receipts: Vec<String> = got.iter().map(|d| d.receipt.clone()).collect();
            h.broker()
                .nack("jobs", &receipts, None, Some("boom"), Default::default())
                .await
                .unwrap();
            assert_eq!(h.stats("jobs-dlq").unwrap().total, 3);

            let b = h.broker();
            let bad = b
                .start_redrive(
                    "jobs-dlq",
                    RedriveRequest {
                        rate_per_s: 100,
                        ids: Some(Vec::new()),
                        ..Default::default()
                    },
                )
                .unwrap_err();
            assert_eq!(bad.code, ErrorCode::InvalidRequest);
            let started = b
                .start_redrive(
                    "jobs-dlq",
                    RedriveRequest {
                        rate_per_s: 100,
                        ids: Some(vec!["b".into(), "not-there".into()]),
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(started.remaining, 2);
            let done = loop {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let p = b.redrive_progress(&started.id).unwrap();
                if p.state != "running" {
                    break p;
                }
            };
            assert_eq!((done.state, done.moved), ("done", 1), "{done:?}");
            assert_eq!(h.stats("jobs-dlq").unwrap().total, 2);
            let back = h.receive("jobs", 10).await.unwrap();
            assert_eq!(back.len(), 1);
            assert_eq!(back[0].record.body.as_ref(), b"b");
        });
}
