//! CreateTopics and DeleteTopics, and the topic configurations that have tidewater
//! stream settings (`TOPIC_CONFIGS`). A configuration tidewater has no setting for is
//! refused by name rather than taken and ignored.

use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tidewater_auth::{Operation, ResourceKind};
use tidewater_core::BrokerError;
use tidewater_core::stream::config::{Cleanup, StreamConfig, StreamPatch, TimestampType};

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
    ("segment.bytes", "segment_bytes"),
    ("segment.ms", "segment_ms"),
    ("max.message.bytes", "max_message_bytes"),
];

/// Kafka topic configurations tidewater has no setting for because it always behaves one
/// way: taken with that value (tools set them), refused with any other.
pub const FIXED_TOPIC_CONFIGS: &[(&str, &str)] = &[
    // Compaction has no lag: a record may be compacted once its segment is sealed.
    ("min.compaction.lag.ms", "0"),
    // Batches are stored uncompressed (readers, compaction and subscriptions decode them).
    ("compression.type", "uncompressed"),
    // One node: its durability is fsync, not replicas.
    ("min.insync.replicas", "1"),
    ("unclean.leader.election.enable", "false"),
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
    let unsigned = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|_| format!("{name}: '{v}' is not a non-negative integer"))
    };
    match name {
        "segment.bytes" => patch.segment_bytes = Some(unsigned(value)?),
        "segment.ms" => patch.segment_ms = Some(unsigned(value)?),
        "max.message.bytes" => patch.max_message_bytes = Some(unsigned(value)?),
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
        other if FIXED_TOPIC_CONFIGS.iter().any(|(k, _)| *k == other) => {
            let (_, fixed) = FIXED_TOPIC_CONFIGS
                .iter()
                .find(|(k, _)| *k == other)
                .expect("found");
            if value.trim() != *fixed {
                return Err(format!(
                    "{other}: tidewater always works as {other}={fixed}; '{value}' cannot be honoured"
                ));
            }
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
        let outcome = if crate::access::topic(Operation::Admin, &name) {
            create_topic(kafka, &name, &topic, req.validate_only).await
        } else {
            Err((
                ResponseError::TopicAuthorizationFailed.code(),
                format!("no grant of admin on stream '{name}'"),
            ))
        };
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
        if !req.validate_only {
            crate::access::audit("CreateTopics", &name, result.error_code);
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
            Some(name) if !crate::access::topic(Operation::Admin, &name) => {
                result.name = Some(TopicName(name.clone().into()));
                result.error_code = ResponseError::TopicAuthorizationFailed.code();
            }
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
        crate::access::audit(
            "DeleteTopics",
            result.name.as_ref().map_or("?", |n| n.0.as_str()),
            result.error_code,
        );
        response.responses.push(result);
    }
    response
}

/// The authorization error for `op` on a config resource the principal may not touch:
/// a topic is a stream, a group a group, the broker the cluster.
fn config_denied(resource_type: i8, name: &str, op: Operation) -> Option<i16> {
    let (kind, code) = match resource_type {
        TOPIC_RESOURCE => (
            ResourceKind::Stream,
            ResponseError::TopicAuthorizationFailed,
        ),
        GROUP_RESOURCE => (ResourceKind::Group, ResponseError::GroupAuthorizationFailed),
        BROKER_RESOURCE => (
            ResourceKind::Cluster,
            ResponseError::ClusterAuthorizationFailed,
        ),
        _ => return None,
    };
    let name = if kind == ResourceKind::Cluster {
        ""
    } else {
        name
    };
    (!crate::access::may(op, kind, name)).then(|| code.code())
}

/// Kafka's config resource types.
const TOPIC_RESOURCE: i8 = 2;
const BROKER_RESOURCE: i8 = 4;
const GROUP_RESOURCE: i8 = 32;
/// Kafka's config sources.
const DYNAMIC_TOPIC_CONFIG: i8 = 1;
const DEFAULT_CONFIG: i8 = 5;
/// Kafka's config types.
const TYPE_STRING: i8 = 2;
const TYPE_LONG: i8 = 5;
const TYPE_DOUBLE: i8 = 6;
const TYPE_LIST: i8 = 7;
const TYPE_INT: i8 = 3;

/// A stream's configuration as Kafka topic configs: (name, value, is the default, type).
fn topic_configs(kafka: &Kafka, config: &StreamConfig) -> Vec<(&'static str, String, bool, i8)> {
    let default = StreamConfig::new(&StreamPatch::default(), kafka.broker.limits())
        .expect("the defaults are valid");
    let store = kafka.broker.store().options();
    let cleanup = |c: Cleanup| match c {
        Cleanup::Delete => "delete",
        Cleanup::Compact => "compact",
        Cleanup::CompactDelete => "compact,delete",
    };
    let timestamp = |t: TimestampType| match t {
        TimestampType::CreateTime => "CreateTime",
        TimestampType::LogAppendTime => "LogAppendTime",
    };
    let or = |own: u64, server: u64| if own == 0 { server } else { own };
    let max_message = |own: u64| or(own, tidewater_core::stream::records::MAX_STREAM_BATCH_BYTES);
    vec![
        (
            "cleanup.policy",
            cleanup(config.cleanup).into(),
            config.cleanup == default.cleanup,
            TYPE_LIST,
        ),
        (
            "retention.ms",
            config.retention_ms.to_string(),
            config.retention_ms == default.retention_ms,
            TYPE_LONG,
        ),
        (
            "retention.bytes",
            config.retention_bytes.to_string(),
            config.retention_bytes == default.retention_bytes,
            TYPE_LONG,
        ),
        (
            "message.timestamp.type",
            timestamp(config.timestamp_type).into(),
            config.timestamp_type == default.timestamp_type,
            TYPE_STRING,
        ),
        (
            "delete.retention.ms",
            config.delete_retention_ms.to_string(),
            config.delete_retention_ms == default.delete_retention_ms,
            TYPE_LONG,
        ),
        (
            "min.cleanable.dirty.ratio",
            config.min_dirty_ratio.to_string(),
            config.min_dirty_ratio == default.min_dirty_ratio,
            TYPE_DOUBLE,
        ),
        (
            "segment.bytes",
            or(config.segment_bytes, store.segment_roll_bytes).to_string(),
            config.segment_bytes == 0,
            TYPE_INT,
        ),
        (
            "segment.ms",
            or(config.segment_ms, store.segment_roll_ms).to_string(),
            config.segment_ms == 0,
            TYPE_LONG,
        ),
        (
            "max.message.bytes",
            max_message(config.max_message_bytes).to_string(),
            config.max_message_bytes == 0,
            TYPE_INT,
        ),
    ]
}

pub(crate) fn describe_configs(
    kafka: &Kafka,
    req: DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResponse {
    let mut response = DescribeConfigsResponse::default();
    for resource in req.resources {
        let mut out = DescribeConfigsResult::default();
        out.resource_type = resource.resource_type;
        out.resource_name = resource.resource_name.clone();
        if let Some(code) = config_denied(
            resource.resource_type,
            &resource.resource_name,
            Operation::Describe,
        ) {
            out.error_code = code;
            out.error_message = text("no grant of describe on this resource");
            response.results.push(out);
            continue;
        }
        match resource.resource_type {
            TOPIC_RESOURCE => match kafka.broker.get_stream(&resource.resource_name) {
                Ok(info) => {
                    let wanted = resource.configuration_keys.as_ref();
                    for (name, value, default, kind) in topic_configs(kafka, &info.config) {
                        if wanted.is_some_and(|keys| !keys.iter().any(|k| &**k == name)) {
                            continue;
                        }
                        let mut c = DescribeConfigsResourceResult::default();
                        c.name = StrBytes::from_static_str(name);
                        c.value = Some(StrBytes::from_string(value));
                        c.config_source = if default {
                            DEFAULT_CONFIG
                        } else {
                            DYNAMIC_TOPIC_CONFIG
                        };
                        if version >= 3 {
                            c.config_type = kind;
                        }
                        out.configs.push(c);
                    }
                    for (name, value) in FIXED_TOPIC_CONFIGS {
                        if wanted.is_some_and(|keys| !keys.iter().any(|k| &**k == *name)) {
                            continue;
                        }
                        let mut c = DescribeConfigsResourceResult::default();
                        c.name = StrBytes::from_static_str(name);
                        c.value = Some(StrBytes::from_static_str(value));
                        c.read_only = true;
                        c.config_source = DEFAULT_CONFIG;
                        if version >= 3 {
                            c.config_type = TYPE_STRING;
                        }
                        out.configs.push(c);
                    }
                }
                Err(err) => {
                    out.error_code = crate::errors::code(&err);
                    out.error_message = text(err.message);
                }
            },
            // The broker's own settings are tidewater's configuration file, not Kafka's.
            BROKER_RESOURCE | GROUP_RESOURCE => {}
            other => {
                out.error_code = ResponseError::InvalidRequest.code();
                out.error_message = text(format!(
                    "config resource type {other}: tidewater describes topics (2) and brokers (4)"
                ));
            }
        }
        response.results.push(out);
    }
    response
}

/// IncrementalAlterConfigs' operations.
const SET: i8 = 0;
const DELETE: i8 = 1;
const APPEND: i8 = 2;
const SUBTRACT: i8 = 3;

/// The patch an IncrementalAlterConfigs asks of a stream.
fn incremental_patch(
    current: &StreamConfig,
    configs: &[incremental_alter_configs_request::AlterableConfig],
) -> Result<StreamPatch, String> {
    let mut patch = StreamPatch::default();
    for c in configs {
        let name: &str = &c.name;
        match c.config_operation {
            SET => apply_config(&mut patch, name, c.value.as_deref())?,
            DELETE => {
                let default = match name {
                    "retention.ms" => "604800000",
                    "retention.bytes" => "-1",
                    "cleanup.policy" => "delete",
                    "message.timestamp.type" => "CreateTime",
                    "delete.retention.ms" => "86400000",
                    "min.cleanable.dirty.ratio" => "0.5",
                    "segment.bytes" | "segment.ms" | "max.message.bytes" => "0",
                    fixed if FIXED_TOPIC_CONFIGS.iter().any(|(k, _)| *k == fixed) => continue,
                    other => {
                        return Err(format!(
                            "topic config '{other}' has no tidewater stream setting"
                        ));
                    }
                };
                apply_config(&mut patch, name, Some(default))?;
            }
            APPEND | SUBTRACT if name == "cleanup.policy" => {
                let mut policies: Vec<&str> = match patch.cleanup.unwrap_or(current.cleanup) {
                    Cleanup::Delete => vec!["delete"],
                    Cleanup::Compact => vec!["compact"],
                    Cleanup::CompactDelete => vec!["compact", "delete"],
                };
                let value = c.value.as_deref().unwrap_or_default();
                for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                    if c.config_operation == APPEND {
                        policies.push(v);
                    } else {
                        policies.retain(|p| p != &v);
                    }
                }
                if policies.is_empty() {
                    return Err(
                        "cleanup.policy: at least one of delete and compact must stay".into(),
                    );
                }
                apply_config(&mut patch, name, Some(&policies.join(",")))?;
            }
            APPEND | SUBTRACT => {
                return Err(format!(
                    "{name} is not a list: APPEND and SUBTRACT do not apply"
                ));
            }
            other => return Err(format!("unknown config operation {other}")),
        }
    }
    Ok(patch)
}

pub(crate) async fn incremental_alter_configs(
    kafka: &Kafka,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut response = IncrementalAlterConfigsResponse::default();
    for resource in req.resources {
        let mut out = AlterConfigsResourceResponse::default();
        out.resource_type = resource.resource_type;
        out.resource_name = resource.resource_name.clone();
        let result: Result<(), (i16, String)> = async {
            if let Some(code) = config_denied(resource.resource_type, &resource.resource_name, Operation::Admin) {
                return Err((code, "no grant of admin on this resource".to_string()));
            }
            if resource.resource_type == GROUP_RESOURCE {
                return alter_group_configs(kafka, &resource, req.validate_only);
            }
            if resource.resource_type != TOPIC_RESOURCE {
                return Err((
                    ResponseError::InvalidRequest.code(),
                    "tidewater alters topic configs only (the broker's are in its configuration file)".to_string(),
                ));
            }
            let name = resource.resource_name.to_string();
            let info = kafka.broker.get_stream(&name).map_err(|e| broker_error(&e))?;
            let patch = incremental_patch(&info.config, &resource.configs)
                .map_err(|m| (ResponseError::InvalidConfig.code(), m))?;
            let next = info.config.apply(&patch).map_err(|e| broker_error(&e))?;
            next.validate(kafka.broker.limits()).map_err(|e| broker_error(&e))?;
            if !req.validate_only {
                kafka.broker.put_stream(&name, &patch).await.map_err(|e| broker_error(&e))?;
            }
            Ok(())
        }
        .await;
        if let Err((code, message)) = result {
            out.error_code = code;
            out.error_message = text(message);
        }
        if !req.validate_only {
            crate::access::audit(
                "IncrementalAlterConfigs",
                &out.resource_name,
                out.error_code,
            );
        }
        response.responses.push(out);
    }
    response
}

/// A group's configs: `share.auto.offset.reset` (where a share group's subscriptions start
/// when they are made) is the one tidewater takes.
fn alter_group_configs(
    kafka: &Kafka,
    resource: &incremental_alter_configs_request::AlterConfigsResource,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let invalid = |m: String| (ResponseError::InvalidConfig.code(), m);
    for c in &resource.configs {
        if &*c.name != "share.auto.offset.reset" {
            return Err(invalid(format!(
                "group config '{}': tidewater takes share.auto.offset.reset only (the other settings of a share group are its subscription's: lease_ms, max_deliveries, ...)",
                c.name
            )));
        }
        let value = match c.config_operation {
            SET => c.value.as_deref(),
            DELETE => None,
            _ => return Err(invalid("share.auto.offset.reset is not a list".into())),
        };
        if !validate_only {
            crate::share::set_share_start(kafka, &resource.resource_name, value)
                .map_err(invalid)?;
        }
    }
    Ok(())
}

pub(crate) async fn create_partitions(
    kafka: &Kafka,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut response = CreatePartitionsResponse::default();
    for topic in req.topics {
        let mut out = CreatePartitionsTopicResult::default();
        out.name = topic.name.clone();
        let name = topic.name.0.to_string();
        let result: Result<(), (i16, String)> = async {
            if !crate::access::topic(Operation::Admin, &name) {
                return Err((
                    ResponseError::TopicAuthorizationFailed.code(),
                    format!("no grant of admin on stream '{name}'"),
                ));
            }
            if topic.assignments.as_ref().is_some_and(|a| !a.is_empty()) {
                return Err((
                    ResponseError::InvalidReplicaAssignment.code(),
                    "manual replica assignments are not supported: tidewater is one node"
                        .to_string(),
                ));
            }
            let info = kafka
                .broker
                .get_stream(&name)
                .map_err(|e| broker_error(&e))?;
            let count = u32::try_from(topic.count).unwrap_or(0);
            if count <= info.config.partitions {
                return Err((
                    ResponseError::InvalidPartitions.code(),
                    format!(
                        "topic '{name}' has {} partitions: the count can only grow",
                        info.config.partitions
                    ),
                ));
            }
            let patch = StreamPatch {
                partitions: Some(count),
                ..StreamPatch::default()
            };
            info.config
                .apply(&patch)
                .and_then(|c| c.validate(kafka.broker.limits()))
                .map_err(|e| (ResponseError::InvalidPartitions.code(), e.message))?;
            if !req.validate_only {
                kafka
                    .broker
                    .put_stream(&name, &patch)
                    .await
                    .map_err(|e| broker_error(&e))?;
            }
            Ok(())
        }
        .await;
        if let Err((code, message)) = result {
            out.error_code = code;
            out.error_message = text(message);
        }
        if !req.validate_only {
            crate::access::audit("CreatePartitions", &name, out.error_code);
        }
        response.results.push(out);
    }
    response
}
