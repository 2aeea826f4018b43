//! Metadata and DescribeCluster: one node (this one, at its advertised address), the leader
//! of every partition of every stream. Streams are topics; no topic is made by asking for
//! it (Kafka's `auto.create.topics.enable` is off here: create them with CreateTopics, the
//! CLI or the HTTP API). A queue asked for by name is a one-partition topic, for share
//! consumers (it is not listed among all topics: Kafka consumers of other kinds cannot read
//! it).

use kafka_protocol::ResponseError;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tidewater_auth::{Operation, ResourceKind};

use crate::Kafka;

/// The cluster id clients see.
pub(crate) const CLUSTER_ID: &str = "tidewater";

pub(crate) fn metadata(kafka: &Kafka, req: MetadataRequest, version: i16) -> MetadataResponse {
    let node = BrokerId(kafka.config.node_id);
    let mut response = MetadataResponse::default();
    let mut broker = MetadataResponseBroker::default();
    broker.node_id = node;
    broker.host = StrBytes::from_string(kafka.config.advertised_host.clone());
    broker.port = i32::from(kafka.config.advertised_port);
    response.brokers = vec![broker];
    response.cluster_id = Some(StrBytes::from_static_str(CLUSTER_ID));
    response.controller_id = node;
    // Version 0 asks for every topic with an empty list; later ones with null.
    let wanted: Option<Vec<(Option<String>, uuid::Uuid)>> = match req.topics {
        Some(topics) if !(version == 0 && topics.is_empty()) => Some(
            topics
                .into_iter()
                .map(|t| (t.name.map(|n| n.0.to_string()), t.topic_id))
                .collect(),
        ),
        _ => None,
    };
    let streams: Vec<(Option<String>, uuid::Uuid)> = match wanted {
        Some(wanted) => wanted,
        // Every topic: those the principal may describe.
        None => kafka
            .broker
            .list_streams()
            .into_iter()
            .filter(|s| crate::access::visible(Operation::Describe, ResourceKind::Stream, &s.name))
            .map(|s| (Some(s.name), uuid::Uuid::nil()))
            .collect(),
    };
    for (name, id) in streams {
        let mut topic = MetadataResponseTopic::default();
        let name = name.or_else(|| kafka.topic_name(&id));
        topic.topic_id = id;
        let Some(name) = name else {
            topic.error_code = ResponseError::UnknownTopicId.code();
            topic.name = None;
            response.topics.push(topic);
            continue;
        };
        topic.name = Some(TopicName(StrBytes::from_string(name.clone())));
        if !(crate::access::topic(Operation::Describe, &name)
            || crate::access::may(Operation::Describe, ResourceKind::Queue, &name))
        {
            topic.error_code = ResponseError::TopicAuthorizationFailed.code();
            response.topics.push(topic);
            continue;
        }
        match kafka.broker.get_stream(&name) {
            Ok(info) => {
                topic.topic_id = kafka.topic_id(&name);
                topic.partitions = info
                    .partitions
                    .iter()
                    .map(|p| {
                        let mut part = MetadataResponsePartition::default();
                        part.partition_index = p.partition as i32;
                        part.leader_id = node;
                        part.leader_epoch = 0;
                        part.replica_nodes = vec![node];
                        part.isr_nodes = vec![node];
                        part
                    })
                    .collect();
            }
            // A queue asked for by name: a one-partition topic that share consumers read.
            Err(_) if kafka.broker.get_queue(&name).is_ok() => {
                topic.topic_id = kafka.topic_id(&name);
                let mut part = MetadataResponsePartition::default();
                part.leader_id = node;
                part.replica_nodes = vec![node];
                part.isr_nodes = vec![node];
                topic.partitions = vec![part];
            }
            Err(err) => topic.error_code = crate::errors::code(&err),
        }
        response.topics.push(topic);
    }
    response
}

pub(crate) fn describe_cluster(
    kafka: &Kafka,
    _req: DescribeClusterRequest,
) -> DescribeClusterResponse {
    let node = BrokerId(kafka.config.node_id);
    let mut response = DescribeClusterResponse::default();
    if !crate::access::may(Operation::Describe, ResourceKind::Cluster, "") {
        response.error_code = ResponseError::ClusterAuthorizationFailed.code();
        response.error_message = crate::versions::text("no grant of describe on the cluster");
        return response;
    }
    response.cluster_id = StrBytes::from_static_str(CLUSTER_ID);
    response.controller_id = node;
    let mut broker = DescribeClusterBroker::default();
    broker.broker_id = node;
    broker.host = StrBytes::from_string(kafka.config.advertised_host.clone());
    broker.port = i32::from(kafka.config.advertised_port);
    response.brokers = vec![broker];
    response
}
