//! ListOffsets, FindCoordinator, OffsetCommit and OffsetFetch. Committed offsets are
//! tidewater's own (`tidewater group describe` shows what a Kafka client committed, and a
//! Kafka client fetches what tidewater's consumers committed): one durable log of commits.

use kafka_protocol::ResponseError;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tidewater_auth::Operation;
use tidewater_core::broker::{EARLIEST, LATEST};

use crate::Kafka;
use crate::versions::text;

/// ListOffsets' special times (beside -1 latest and -2 earliest).
const MAX_TIMESTAMP: i64 = -3;
const EARLIEST_LOCAL: i64 = -4;

/// Kafka's FindCoordinator key types.
const GROUP_KEY: i8 = 0;

pub(crate) fn list_offsets(kafka: &Kafka, req: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut response = ListOffsetsResponse::default();
    for topic in req.topics {
        let stream = topic.name.0.to_string();
        let mut out = ListOffsetsTopicResponse::default();
        out.name = topic.name;
        let allowed = crate::access::topic(Operation::Describe, &stream);
        for part in topic.partitions {
            let mut answer = ListOffsetsPartitionResponse::default();
            answer.partition_index = part.partition_index;
            answer.timestamp = -1;
            answer.offset = -1;
            answer.leader_epoch = -1;
            if !allowed {
                answer.error_code = ResponseError::TopicAuthorizationFailed.code();
                out.partitions.push(answer);
                continue;
            }
            let Ok(partition) = u32::try_from(part.partition_index) else {
                answer.error_code = ResponseError::UnknownTopicOrPartition.code();
                out.partitions.push(answer);
                continue;
            };
            let found = match part.timestamp {
                LATEST | EARLIEST => kafka
                    .broker
                    .list_offset(&stream, partition, part.timestamp)
                    .map(|o| o.map(|o| (o, -1))),
                time if time >= 0 => kafka.broker.record_for_time(&stream, partition, time),
                MAX_TIMESTAMP => kafka.broker.max_timestamp_record(&stream, partition),
                // No tiered storage: the earliest local offset is the earliest.
                EARLIEST_LOCAL => kafka
                    .broker
                    .list_offset(&stream, partition, EARLIEST)
                    .map(|o| o.map(|o| (o, -1))),
                other => {
                    answer.error_code = ResponseError::UnsupportedVersion.code();
                    tracing::debug!(
                        timestamp = other,
                        "ListOffsets: a special timestamp not served"
                    );
                    out.partitions.push(answer);
                    continue;
                }
            };
            match found {
                Ok(Some((offset, timestamp))) => {
                    answer.offset = offset as i64;
                    answer.timestamp = timestamp;
                }
                Ok(None) => {}
                Err(err) => answer.error_code = crate::errors::code(&err),
            }
            out.partitions.push(answer);
        }
        response.topics.push(out);
    }
    response
}

/// This node coordinates every group. Transaction coordinators are refused: tidewater has
/// no transactions.
pub(crate) fn find_coordinator(
    kafka: &Kafka,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let node = BrokerId(kafka.config.node_id);
    let host = StrBytes::from_string(kafka.config.advertised_host.clone());
    let port = i32::from(kafka.config.advertised_port);
    let denied = |key: &str| !crate::access::group(Operation::Describe, key);
    let (error_code, message) = if req.key_type == GROUP_KEY {
        (0, None)
    } else {
        (
            ResponseError::TransactionalIdAuthorizationFailed.code(),
            text("tidewater coordinates consumer groups only: transactions are not supported"),
        )
    };
    let mut response = FindCoordinatorResponse::default();
    if version >= 4 {
        response.coordinators = req
            .coordinator_keys
            .into_iter()
            .map(|key| {
                let mut c = Coordinator::default();
                let (error_code, message) = if error_code == 0 && denied(&key) {
                    (
                        ResponseError::GroupAuthorizationFailed.code(),
                        text(format!("no grant of describe on group '{key}'")),
                    )
                } else {
                    (error_code, message.clone())
                };
                c.key = key;
                c.error_code = error_code;
                c.error_message = message;
                if error_code == 0 {
                    c.node_id = node;
                    c.host = host.clone();
                    c.port = port;
                } else {
                    c.node_id = BrokerId(-1);
                    c.port = -1;
                }
                c
            })
            .collect();
    } else {
        let (error_code, message) = if error_code == 0 && denied(&req.key) {
            (
                ResponseError::GroupAuthorizationFailed.code(),
                text(format!("no grant of describe on group '{}'", req.key)),
            )
        } else {
            (error_code, message)
        };
        response.error_code = error_code;
        if version >= 1 {
            response.error_message = message;
        }
        if error_code == 0 {
            response.node_id = node;
            response.host = host;
            response.port = port;
        } else {
            response.node_id = BrokerId(-1);
            response.port = -1;
        }
    }
    response
}

/// OffsetCommit: a classic group member's (for its current generation), or that of a
/// consumer that assigns itself partitions (generation -1, no member: taken while the
/// group has no members, as Kafka does). All the request's partitions are committed in
/// one durable write, or none.
pub(crate) async fn offset_commit(kafka: &Kafka, req: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = req.group_id.0.to_string();
    let mut commits = Vec::new();
    let mut error: Option<i16> = None;
    if !crate::access::group(Operation::Consume, &group) {
        error = Some(ResponseError::GroupAuthorizationFailed.code());
    }
    // Topics the principal may not consume: answered TOPIC_AUTHORIZATION_FAILED, not
    // committed (the others are, in one write).
    let denied: std::collections::HashSet<String> = req
        .topics
        .iter()
        .map(|t| t.name.0.to_string())
        .filter(|t| !crate::access::topic(Operation::Consume, t))
        .collect();
    for topic in req
        .topics
        .iter()
        .filter(|t| !denied.contains(t.name.0.as_str()))
    {
        for part in &topic.partitions {
            match (
                u32::try_from(part.partition_index),
                u64::try_from(part.committed_offset),
            ) {
                (Ok(partition), Ok(offset)) => commits.push((
                    topic.name.0.to_string(),
                    partition,
                    offset,
                    part.committed_metadata
                        .as_ref()
                        .map(|m| m.to_string())
                        .unwrap_or_default(),
                )),
                _ => error = Some(ResponseError::InvalidRequest.code()),
            }
        }
    }
    let member = req.member_id.to_string();
    if error.is_none() && !commits.is_empty() {
        // A member of a consumer-protocol group (KIP-848) commits what it owns.
        let outcome = if !member.is_empty() && kafka.broker.group_has_member(&group, &member) {
            kafka
                .broker
                .commit_as_member(&group, Some(&member), &commits)
                .await
                .map(Ok)
        } else {
            kafka
                .broker
                .classic_commit(&group, &member, req.generation_id_or_member_epoch, &commits)
                .await
        };
        error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(crate::groups::classic_code(e)),
            Err(err) => {
                tracing::debug!(group, error = %err, "Kafka OffsetCommit refused");
                Some(crate::errors::code(&err))
            }
        };
    }
    let mut response = OffsetCommitResponse::default();
    for topic in req.topics {
        let mut out = OffsetCommitResponseTopic::default();
        let code = if error.is_none() && denied.contains(topic.name.0.as_str()) {
            ResponseError::TopicAuthorizationFailed.code()
        } else {
            error.unwrap_or(0)
        };
        out.name = topic.name;
        out.partitions = topic
            .partitions
            .iter()
            .map(|p| {
                let mut r = OffsetCommitResponsePartition::default();
                r.partition_index = p.partition_index;
                r.error_code = code;
                r
            })
            .collect();
        response.topics.push(out);
    }
    response
}

/// A topic's committed offsets: (partition, offset or -1, metadata) each.
type TopicOffsets = (String, Vec<(i32, i64, String)>);

/// A group's committed offsets: the partitions asked, or all it has committed.
async fn committed(
    kafka: &Kafka,
    group: &str,
    asked: Option<Vec<(String, Vec<i32>)>>,
) -> Vec<TopicOffsets> {
    let mut found = committed_all(kafka, group, asked).await;
    // Only the topics the principal may describe.
    found.retain(|(topic, _)| {
        crate::access::visible(
            Operation::Describe,
            tidewater_auth::ResourceKind::Stream,
            topic,
        )
    });
    found
}

async fn committed_all(
    kafka: &Kafka,
    group: &str,
    asked: Option<Vec<(String, Vec<i32>)>>,
) -> Vec<TopicOffsets> {
    match asked {
        Some(topics) => {
            let mut out = Vec::with_capacity(topics.len());
            for (topic, partitions) in topics {
                let mut parts = Vec::with_capacity(partitions.len());
                for p in partitions {
                    let found = match u32::try_from(p) {
                        Ok(partition) => kafka.broker.committed(group, &topic, partition).await,
                        Err(_) => None,
                    };
                    parts.push(match found {
                        Some(c) => (p, c.offset as i64, c.metadata),
                        None => (p, -1, String::new()),
                    });
                }
                out.push((topic, parts));
            }
            out
        }
        None => {
            let Ok(info) = kafka.broker.describe_group(group).await else {
                return Vec::new();
            };
            let mut out: Vec<TopicOffsets> = Vec::new();
            for lag in info.offsets {
                let entry = (lag.partition as i32, lag.committed as i64, lag.metadata);
                match out.last_mut() {
                    Some((topic, parts)) if *topic == lag.stream => parts.push(entry),
                    _ => out.push((lag.stream, vec![entry])),
                }
            }
            out
        }
    }
}

pub(crate) async fn offset_fetch(
    kafka: &Kafka,
    req: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    let mut response = OffsetFetchResponse::default();
    if version >= 8 {
        for group in req.groups {
            let name = group.group_id.0.to_string();
            let asked = group.topics.map(|topics| {
                topics
                    .into_iter()
                    .map(|t| (t.name.0.to_string(), t.partition_indexes))
                    .collect()
            });
            let mut out = OffsetFetchResponseGroup::default();
            out.group_id = group.group_id;
            if !crate::access::group(Operation::Describe, &name) {
                out.error_code = ResponseError::GroupAuthorizationFailed.code();
                response.groups.push(out);
                continue;
            }
            for (topic, parts) in committed(kafka, &name, asked).await {
                let mut t = OffsetFetchResponseTopics::default();
                t.name = TopicName(StrBytes::from_string(topic));
                t.partitions = parts
                    .into_iter()
                    .map(|(index, offset, metadata)| {
                        let mut p = OffsetFetchResponsePartitions::default();
                        p.partition_index = index;
                        p.committed_offset = offset;
                        p.committed_leader_epoch = -1;
                        p.metadata = Some(StrBytes::from_string(metadata));
                        p
                    })
                    .collect();
                out.topics.push(t);
            }
            response.groups.push(out);
        }
        return response;
    }
    let name = req.group_id.0.to_string();
    if !crate::access::group(Operation::Describe, &name) {
        response.error_code = ResponseError::GroupAuthorizationFailed.code();
        return response;
    }
    let asked = req.topics.map(|topics| {
        topics
            .into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect()
    });
    for (topic, parts) in committed(kafka, &name, asked).await {
        let mut t = OffsetFetchResponseTopic::default();
        t.name = TopicName(StrBytes::from_string(topic));
        t.partitions = parts
            .into_iter()
            .map(|(index, offset, metadata)| {
                let mut p = OffsetFetchResponsePartition::default();
                p.partition_index = index;
                p.committed_offset = offset;
                if version >= 5 {
                    p.committed_leader_epoch = -1;
                }
                p.metadata = Some(StrBytes::from_string(metadata));
                p
            })
            .collect();
        response.topics.push(t);
    }
    response
}
