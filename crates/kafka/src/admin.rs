//! CreateTopics and DeleteTopics, and the topic configurations that have tidewater
//! stream settings (`TOPIC_CONFIGS`). A configuration tidewater has no setting for is
//! refused by name rather than taken and ignored.

use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::*;
use tidewater_core::BrokerError;
use tidewater_core::stream::config::{Cleanup, StreamPatch, TimestampType};

use crate::Kafka;
use crate::versions::text;

/// Kafka topic configurations and the stream settings they set.
pub const TOPIC_CONFIGS: &[(&str, &str)] = &[
    ("retention.ms", "retention_ms"),
    ("retention.bytes", "retention_bytes"),
    ("cleanup.policy", "cleanup"),
    ("message.timestamp.type", "timestamp_type"),
    ("delete.retention.ms", "delete_retention_ms"),
    ("min.cleanable.dirty.ratio", "min_dirty_ratio"),
];

/// Applies one Kafka topic configuration to a stream patch.
pub(crate) fn apply_config(
    patch: &mut StreamPatch,
    name: &str,
    value: Option<&str>,
) -> Result<(), String> {
    let Some(value) = value else {
        return Err(format!("{name}: a value is required"));
    };
    let int = |v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|_| format!("{name}: '{v}' is not an integer"))
    };
    match name {
        "retention.ms" => patch.retention_ms = Some(int(value)?),
        "retention.bytes" => patch.retention_bytes = Some(int(value)?),
        "delete.retention.ms" => patch.delete_retention_ms = Some(int(value)?),
        "min.cleanable.dirty.ratio" => {
            patch.min_dirty_ratio = Some(
                value
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("{name}: '{value}' is not a number"))?,
            )
        }
        "cleanup.policy" => {
            let mut parts: Vec<&str> = value.split(',').map(str::trim).collect();
            parts.sort_unstable();
            parts.dedup();
            patch.cleanup = Some(match parts.as_slice() {
                ["delete"] => Cleanup::Delete,
                ["compact"] => Cleanup::Compact,
                ["compact", "delete"] => Cleanup::CompactDelete,
                _ => {
                    return Err(format!(
                        "{name}: '{value}' is not delete, compact or compact,delete"
                    ));
                }
            })
        }
        "message.timestamp.type" => {
            patch.timestamp_type = Some(match value.trim() {
                "CreateTime" => TimestampType::CreateTime,
                "LogAppendTime" => TimestampType::LogAppendTime,
                other => {
                    return Err(format!(
                        "{name}: '{other}' is not CreateTime or LogAppendTime"
                    ));
                }
            })
        }
        other => {
            let known: Vec<&str> = TOPIC_CONFIGS.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "topic config '{other}' has no tidewater stream setting (those that do: {})",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

pub(crate) async fn create_topics(kafka: &Kafka, req: CreateTopicsRequest) -> CreateTopicsResponse {
    let mut response = CreateTopicsResponse::default();
    for topic in req.topics {
        let name = topic.name.0.to_string();
        let mut result = CreatableTopicResult::default();
        result.name = topic.name.clone();
        let outcome = create_topic(kafka, &name, &topic, req.validate_only).await;
        match outcome {
            Ok(partitions) => {
                result.num_partitions = partitions as i32;
                result.replication_factor = 1;
                result.topic_id = kafka.topic_id(&name);
                result.configs = Some(Vec::new());
            }
            Err((code, message)) => {
                result.error_code = code;
                result.error_message = text(message);
                result.num_partitions = -1;
                result.replication_factor = -1;
                result.configs = None;
            }
        }
        response.topics.push(result);
    }
    response
}

async fn create_topic(
    kafka: &Kafka,
    name: &str,
    topic: &create_topics_request::CreatableTopic,
    validate_only: bool,
) -> Result<u32, (i16, String)> {
    let invalid = |code: ResponseError, message: String| (code.code(), message);
    if !matches!(topic.replication_factor, -1 | 1) {
        return Err(invalid(
            ResponseError::InvalidReplicationFactor,
            format!(
                "replication factor {}: tidewater is one node (its durability is fsync, not replicas); use 1 or -1",
                topic.replication_factor
            ),
        ));
    }
    if !topic.assignments.is_empty() {
        return Err(invalid(
            ResponseError::InvalidReplicaAssignment,
            "manual replica assignments are not supported: tidewater is one node".into(),
        ));
    }
    let mut patch = StreamPatch {
        partitions: Some(if topic.num_partitions == -1 {
            1
        } else {
            u32::try_from(topic.num_partitions).map_err(|_| {
                invalid(
                    ResponseError::InvalidPartitions,
                    format!("{} partitions: use 1 or more", topic.num_partitions),
                )
            })?
        }),
        ..StreamPatch::default()
    };
    for config in &topic.configs {
        apply_config(&mut patch, &config.name, config.value.as_deref())
            .map_err(|m| invalid(ResponseError::InvalidConfig, m))?;
    }
    if kafka.broker.get_stream(name).is_ok() {
        return Err(invalid(
            ResponseError::TopicAlreadyExists,
            format!("topic '{name}' already exists"),
        ));
    }
    let config = tidewater_core::stream::config::StreamConfig::new(&patch, kafka.broker.limits())
        .map_err(|e| broker_error(&e))?;
    tidewater_core::stream::config::validate_stream_name(name).map_err(|e| broker_error(&e))?;
    if validate_only {
        return Ok(config.partitions);
    }
    let (_, info) = kafka
        .broker
        .put_stream(name, &patch)
        .await
        .map_err(|e| broker_error(&e))?;
    Ok(info.config.partitions)
}

fn broker_error(err: &BrokerError) -> (i16, String) {
    (crate::errors::code(err), err.message.clone())
}

pub(crate) async fn delete_topics(
    kafka: &Kafka,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let asked: Vec<(Option<String>, uuid::Uuid)> = if version >= 6 {
        req.topics
            .into_iter()
            .map(|t| (t.name.map(|n| n.0.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .into_iter()
            .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
            .collect()
    };
    let mut response = DeleteTopicsResponse::default();
    for (name, id) in asked {
        let mut result = DeletableTopicResult::default();
        let name = name.or_else(|| kafka.topic_name(&id));
        if version >= 6 {
            result.topic_id = id;
        }
        match name {
            None => result.error_code = ResponseError::UnknownTopicId.code(),
            Some(name) => {
                result.name = Some(TopicName(name.clone().into()));
                if let Err(err) = kafka.broker.delete_stream(&name).await {
                    result.error_code = crate::errors::code(&err);
                    if version >= 5 {
                        result.error_message = text(err.message);
                    }
                }
            }
        }
        response.responses.push(result);
    }
    response
}
