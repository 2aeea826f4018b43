//! Fetch: stored batches handed out as they are (the first may start before the offset
//! asked; clients skip what they did not ask for), with Kafka's long poll (`max_wait_ms`,
//! `min_bytes`) and per-partition and per-request byte limits. No fetch sessions (KIP-227):
//! every response is a full one (session id 0), which clients accept. There are no
//! transactions, so the last stable offset is the high watermark and read_committed reads
//! everything.

use bytes::{Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::*;
use tidewater_auth::Operation;
use tidewater_core::broker::FetchWant;

use crate::Kafka;

/// A topic of a fetch: its name and id as asked, the stream it is (if known), and its
/// partitions asked (index, offset, max bytes).
type Asked = (TopicName, uuid::Uuid, Option<String>, Vec<(i32, i64, i32)>);

/// A fetch, and the share of the listener's memory budget its response holds until
/// written (the bytes of the batches read).
pub(crate) async fn fetch(
    kafka: &Kafka,
    req: FetchRequest,
    version: i16,
) -> (FetchResponse, Option<tokio::sync::OwnedSemaphorePermit>) {
    // What is free of the budget bounds what this fetch reads; it is taken once the batches
    // are read (not during the long poll, when nothing is held).
    let budget = usize::try_from(req.max_bytes)
        .unwrap_or(0)
        .clamp(1, kafka.broker.limits().max_fetch_bytes)
        .min(
            kafka
                .memory
                .available_permits()
                .saturating_mul(1024)
                .max(1024),
        );
    let response = fetch_within(kafka, req, version, budget).await;
    let bytes: usize = response
        .responses
        .iter()
        .flat_map(|t| &t.partitions)
        .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
        .sum();
    let (_, held) = kafka.hold(bytes);
    (response, held)
}

async fn fetch_within(
    kafka: &Kafka,
    req: FetchRequest,
    version: i16,
    max_bytes: usize,
) -> FetchResponse {
    let mut response = FetchResponse::default();
    if req.replica_id.0 >= 0 || req.replica_state.replica_id.0 >= 0 {
        response.error_code = ResponseError::UnknownServerError.code();
        return response;
    }
    let mut asked: Vec<Asked> = Vec::with_capacity(req.topics.len());
    for topic in req.topics {
        let stream = if version >= 13 {
            kafka.topic_name(&topic.topic_id)
        } else {
            Some(topic.topic.0.to_string())
        };
        asked.push((
            topic.topic,
            topic.topic_id,
            stream,
            topic
                .partitions
                .iter()
                .map(|p| (p.partition, p.fetch_offset, p.partition_max_bytes))
                .collect(),
        ));
    }
    // Topics the principal may not consume: answered TOPIC_AUTHORIZATION_FAILED, not read.
    let allowed: Vec<bool> = asked
        .iter()
        .map(|(_, _, stream, _)| {
            stream
                .as_deref()
                .is_none_or(|s| crate::access::topic(Operation::Consume, s))
        })
        .collect();
    let mut wants = Vec::new();
    for ((_, _, stream, parts), allowed) in asked.iter().zip(&allowed) {
        if let Some(stream) = stream.as_ref().filter(|_| *allowed) {
            for &(partition, offset, max_bytes) in parts {
                if let (Ok(partition), Ok(offset)) =
                    (u32::try_from(partition), u64::try_from(offset))
                {
                    wants.push(FetchWant {
                        stream: stream.clone(),
                        partition,
                        offset,
                        max_bytes: usize::try_from(max_bytes).unwrap_or(0).max(1),
                    });
                }
            }
        }
    }
    let limits = kafka.broker.limits();
    let wait_ms = u64::try_from(req.max_wait_ms)
        .unwrap_or(0)
        .min(limits.max_wait_ms);
    let min_bytes = usize::try_from(req.min_bytes).unwrap_or(1);
    let fetched = if wants.is_empty() {
        Vec::new()
    } else {
        match kafka
            .broker
            .fetch_many(&wants, max_bytes, min_bytes, wait_ms)
            .await
        {
            Ok(fetched) => fetched,
            Err(err) => {
                response.error_code = crate::errors::code(&err);
                return response;
            }
        }
    };
    let mut fetched = fetched.into_iter();
    for ((name, topic_id, stream, parts), allowed) in asked.into_iter().zip(allowed) {
        let mut topic = FetchableTopicResponse::default();
        topic.topic = name;
        topic.topic_id = topic_id;
        for (index, offset, _) in parts {
            let mut part = PartitionData::default();
            part.partition_index = index;
            part.high_watermark = -1;
            part.last_stable_offset = -1;
            part.log_start_offset = -1;
            part.aborted_transactions = Some(Vec::new());
            if !allowed {
                part.error_code = ResponseError::TopicAuthorizationFailed.code();
            } else if stream.is_none() {
                part.error_code = if version >= 13 {
                    ResponseError::UnknownTopicId.code()
                } else {
                    ResponseError::UnknownTopicOrPartition.code()
                };
            } else if index < 0 || offset < 0 {
                part.error_code = if index < 0 {
                    ResponseError::UnknownTopicOrPartition.code()
                } else {
                    ResponseError::OffsetOutOfRange.code()
                };
            } else {
                match fetched.next() {
                    Some(Ok(found)) => {
                        part.high_watermark = found.end_offset as i64;
                        part.last_stable_offset = found.end_offset as i64;
                        part.log_start_offset = found.start_offset as i64;
                        part.records = Some(records(found.batches));
                    }
                    Some(Err(err)) => {
                        part.error_code = crate::errors::code(&err);
                        if let Ok(Some(end)) = kafka.broker.list_offset(
                            stream.as_deref().unwrap_or_default(),
                            index as u32,
                            tidewater_core::broker::LATEST,
                        ) {
                            part.high_watermark = end as i64;
                            part.last_stable_offset = end as i64;
                        }
                    }
                    None => part.error_code = ResponseError::UnknownServerError.code(),
                }
            }
            topic.partitions.push(part);
        }
        response.responses.push(topic);
    }
    response
}

/// A partition's batches as one record set: the stored bytes themselves when there is one
/// batch, else one copy of them back to back.
fn records(batches: Vec<tidewater_storage::StoredBatch>) -> Bytes {
    match batches.len() {
        0 => Bytes::new(),
        1 => batches
            .into_iter()
            .next()
            .map(|b| b.kafka)
            .unwrap_or_default(),
        _ => {
            let mut out = BytesMut::with_capacity(batches.iter().map(|b| b.kafka.len()).sum());
            for batch in batches {
                out.extend_from_slice(&batch.kafka);
            }
            out.freeze()
        }
    }
}
