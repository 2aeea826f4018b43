//! Kafka's consumer group protocol (KIP-848: ConsumerGroupHeartbeat, ConsumerGroupDescribe)
//! on tidewater's own groups, whose assignment is already the broker's (balanced, sticky,
//! cooperative: `stream::group`). A heartbeat carries what the member owns; the answer is
//! what it may own now (partitions another member still holds are handed over once it
//! lets them go). The member epoch is the member's own: it moves each time the assignment
//! sent to it changes. Kafka consumers in this protocol and tidewater's own consumers can
//! share a group.

use std::collections::{BTreeSet, HashMap};

use kafka_protocol::ResponseError;
use kafka_protocol::messages::consumer_group_describe_response::{
    Assignment as DescribedAssignment, DescribedGroup, Member, TopicPartitions as DescribedTopic,
};
use kafka_protocol::messages::consumer_group_heartbeat_response::{Assignment, TopicPartitions};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tidewater_auth::Operation;
use tidewater_core::ErrorCode;

use crate::Kafka;
use crate::versions::text;

type Partitions = BTreeSet<(String, u32)>;

/// Topic names as a set (a client may list them in any order), sorted.
fn set_of(names: &[String]) -> Vec<String> {
    let set: BTreeSet<&String> = names.iter().collect();
    set.into_iter().cloned().collect()
}

/// What the listener remembers of a member between heartbeats (a heartbeat may leave out
/// what did not change).
#[derive(Debug, Clone, Default)]
pub(crate) struct MemberView {
    streams: Vec<String>,
    owned: Partitions,
    epoch: i32,
    sent: Option<Partitions>,
}

/// Members of consumer-protocol groups, by (group, member id).
pub(crate) type MemberViews = HashMap<(String, String), MemberView>;

/// Views kept at most (members that vanish without leaving are dropped past it).
const MAX_VIEWS: usize = 100_000;

fn error(response: &mut ConsumerGroupHeartbeatResponse, code: ResponseError, message: String) {
    tracing::debug!(?code, message, "ConsumerGroupHeartbeat refused");
    response.error_code = code.code();
    response.error_message = text(message);
}

pub(crate) fn heartbeat(
    kafka: &Kafka,
    req: ConsumerGroupHeartbeatRequest,
) -> ConsumerGroupHeartbeatResponse {
    let group = req.group_id.0.to_string();
    let mut response = ConsumerGroupHeartbeatResponse::default();
    response.heartbeat_interval_ms =
        i32::try_from(kafka.config.consumer_heartbeat_interval_ms).unwrap_or(i32::MAX);
    let member = req.member_id.to_string();
    let key = (group.clone(), member.clone());
    if !crate::access::group(Operation::Consume, &group) {
        error(
            &mut response,
            ResponseError::GroupAuthorizationFailed,
            format!("no grant of consume on group '{group}'"),
        );
        return response;
    }
    if req.member_epoch < 0 {
        // -1: leaving; -2: a static member leaving for a while (it is removed all the same
        // and takes its partitions back when it joins again under its instance id).
        let _ = kafka.broker.leave_group(&group, &member);
        kafka.members.lock().remove(&key);
        response.member_id = Some(req.member_id);
        response.member_epoch = req.member_epoch;
        return response;
    }
    if req
        .subscribed_topic_regex
        .as_ref()
        .is_some_and(|r| !r.is_empty())
    {
        error(
            &mut response,
            ResponseError::InvalidRequest,
            "regular expression subscriptions are not supported by tidewater: subscribe to topic names".into(),
        );
        return response;
    }
    let names: Option<Vec<String>> = req
        .subscribed_topic_names
        .map(|names| names.into_iter().map(|n| n.0.to_string()).collect());
    if let Some(denied) = names
        .iter()
        .flatten()
        .find(|t| !crate::access::topic(Operation::Consume, t))
    {
        error(
            &mut response,
            ResponseError::TopicAuthorizationFailed,
            format!("no grant of consume on stream '{denied}'"),
        );
        return response;
    }
    let owned: Option<Partitions> = req.topic_partitions.map(|topics| {
        topics
            .into_iter()
            .filter_map(|t| {
                kafka
                    .topic_name(&t.topic_id)
                    .map(|name| (name, t.partitions))
            })
            .flat_map(|(name, parts)| {
                parts
                    .into_iter()
                    .filter_map(move |p| u32::try_from(p).ok().map(|p| (name.clone(), p)))
            })
            .collect()
    });
    let mut views = kafka.members.lock();
    let known = views.get(&key).cloned();
    let rejoin = req.member_epoch == 0 || known.is_none();
    let mut view = known.unwrap_or_default();
    let mut member_id = member.clone();
    if rejoin {
        if req.member_epoch > 0 && names.is_none() {
            // A member this listener does not know (the server restarted): join again.
            error(
                &mut response,
                ResponseError::UnknownMemberId,
                format!("member '{member}' is not in group '{group}': join again"),
            );
            return response;
        }
        let Some(names) = names else {
            error(
                &mut response,
                ResponseError::InvalidRequest,
                "a member joining names the topics it subscribes to".into(),
            );
            return response;
        };
        if kafka.broker.classic_has_members(&group) {
            error(
                &mut response,
                ResponseError::InconsistentGroupProtocol,
                format!(
                    "group '{group}' has members of the classic protocol: use another group id"
                ),
            );
            return response;
        }
        // Topics that do not exist (yet) have no partitions until they do, as in Kafka.
        let streams = set_of(&names);
        // Version 1 clients make their own id; an empty one gets one made here.
        let id = (!member.is_empty()).then_some(member.as_str());
        let instance = req.instance_id.as_ref().map(|i| i.to_string());
        match kafka.broker.join_group_as(
            &group,
            id,
            instance.as_deref(),
            &streams,
            kafka.config.consumer_session_timeout_ms,
        ) {
            Ok(joined) => member_id = joined,
            Err(err) => {
                let code = match err.code {
                    ErrorCode::InvalidRequest | ErrorCode::InvalidStreamName => {
                        ResponseError::InvalidRequest
                    }
                    _ => crate::errors::kafka_error(err.code),
                };
                error(&mut response, code, err.message);
                return response;
            }
        }
        view.streams = set_of(&names);
        view.owned = Partitions::new();
        view.sent = None;
    } else {
        if let Some(owned) = owned {
            view.owned = owned;
        }
        // A new subscription: the member keeps what it owns while partitions move.
        if let Some(names) = names
            && set_of(&names) != view.streams
        {
            if let Err(err) = kafka
                .broker
                .resubscribe(&group, &member_id, &set_of(&names))
            {
                views.remove(&key);
                error(&mut response, ResponseError::UnknownMemberId, err.message);
                return response;
            }
            view.streams = set_of(&names);
        }
    }
    let assignment = match kafka.broker.heartbeat(&group, &member_id, &view.owned) {
        Ok(a) => a,
        Err(err) => {
            views.remove(&key);
            let code =
                if err.code == ErrorCode::UnknownMember || err.code == ErrorCode::GroupNotFound {
                    ResponseError::UnknownMemberId
                } else {
                    crate::errors::kafka_error(err.code)
                };
            error(&mut response, code, err.message);
            return response;
        }
    };
    let assigned: Partitions = assignment.assigned.iter().cloned().collect();
    if view.sent.as_ref() != Some(&assigned) {
        view.epoch = view.epoch.saturating_add(1);
        let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
        for (stream, p) in &assigned {
            by_topic.entry(stream).or_default().push(*p as i32);
        }
        let mut out = Assignment::default();
        out.topic_partitions = by_topic
            .into_iter()
            .map(|(stream, partitions)| {
                let mut t = TopicPartitions::default();
                t.topic_id = kafka.topic_id(stream);
                t.partitions = partitions;
                t
            })
            .collect();
        response.assignment = Some(out);
        view.sent = Some(assigned);
    }
    response.member_id = Some(StrBytes::from_string(member_id.clone()));
    response.member_epoch = view.epoch;
    let (group_key, _) = key;
    if views.len() >= MAX_VIEWS {
        views.retain(|(g, m), _| kafka.broker.group_has_member(g, m));
    }
    views.insert((group_key, member_id), view);
    response
}

pub(crate) async fn describe(
    kafka: &Kafka,
    req: ConsumerGroupDescribeRequest,
) -> ConsumerGroupDescribeResponse {
    let mut response = ConsumerGroupDescribeResponse::default();
    for group in req.group_ids {
        let name = group.0.to_string();
        let mut out = DescribedGroup::default();
        out.group_id = group;
        if !crate::access::group(Operation::Describe, &name) {
            out.error_code = ResponseError::GroupAuthorizationFailed.code();
            response.groups.push(out);
            continue;
        }
        // A classic group (members of the classic protocol now or last), or one of offsets
        // alone: Kafka answers "not a consumer group", and admin clients ask DescribeGroups.
        if kafka.broker.group_kind(&name) != Some(tidewater_core::broker::GroupKind::Consumer) {
            out.error_code = ResponseError::GroupIdNotFound.code();
            out.error_message = text(format!(
                "group '{name}' is not a consumer group (it is a classic group)"
            ));
            response.groups.push(out);
            continue;
        }
        match kafka.broker.describe_group(&name).await {
            Ok(info) => {
                out.group_state = StrBytes::from_static_str(if info.members.is_empty() {
                    "Empty"
                } else {
                    "Stable"
                });
                let epoch = i32::try_from(info.generation).unwrap_or(i32::MAX);
                out.group_epoch = epoch;
                out.assignment_epoch = epoch;
                out.assignor_name = StrBytes::from_static_str("uniform");
                let views = kafka.members.lock();
                out.members = info
                    .members
                    .into_iter()
                    .map(|m| {
                        let view = views.get(&(name.clone(), m.member.clone()));
                        let mut by_topic: std::collections::BTreeMap<String, Vec<i32>> =
                            Default::default();
                        for a in &m.assigned {
                            by_topic
                                .entry(a.stream.clone())
                                .or_default()
                                .push(a.partition as i32);
                        }
                        let mut assignment = DescribedAssignment::default();
                        assignment.topic_partitions = by_topic
                            .into_iter()
                            .map(|(stream, partitions)| {
                                let mut t = DescribedTopic::default();
                                t.topic_id = kafka.topic_id(&stream);
                                t.topic_name = TopicName(StrBytes::from_string(stream));
                                t.partitions = partitions;
                                t
                            })
                            .collect();
                        let mut member = Member::default();
                        member.member_id = StrBytes::from_string(m.member);
                        member.member_epoch = view.map_or(epoch, |v| v.epoch);
                        member.subscribed_topic_names = view
                            .map(|v| {
                                v.streams
                                    .iter()
                                    .map(|s| TopicName(StrBytes::from_string(s.clone())))
                                    .collect()
                            })
                            .unwrap_or_default();
                        member.target_assignment = assignment.clone();
                        member.assignment = assignment;
                        member
                    })
                    .collect();
            }
            Err(_) => {
                out.error_code = ResponseError::GroupIdNotFound.code();
                out.error_message = text(format!("group '{name}' does not exist"));
            }
        }
        response.groups.push(out);
    }
    response
}
