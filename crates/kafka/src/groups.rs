//! Kafka's classic consumer group protocol (JoinGroup, SyncGroup, Heartbeat, LeaveGroup)
//! and the group admin calls (ListGroups, DescribeGroups, DeleteGroups, OffsetDelete).
//! The coordinator is core's (`stream::classic`); a tidewater group (server-assigned)
//! shows in DescribeGroups as a `consumer` group whose members' assignments are encoded
//! as Kafka's consumer protocol does, so `kafka-consumer-groups --describe` reads it.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tidewater_auth::Operation;
use tidewater_core::broker::ClassicRefusal;
use tidewater_core::stream::classic::{ClassicError, JoinRequest};

use crate::Kafka;

/// Kafka's error code for a classic group refusal.
pub(crate) fn classic_code(e: ClassicError) -> i16 {
    match e {
        ClassicError::UnknownMemberId => ResponseError::UnknownMemberId,
        ClassicError::IllegalGeneration => ResponseError::IllegalGeneration,
        ClassicError::RebalanceInProgress => ResponseError::RebalanceInProgress,
        ClassicError::InconsistentGroupProtocol => ResponseError::InconsistentGroupProtocol,
        ClassicError::MemberIdRequired => ResponseError::MemberIdRequired,
        ClassicError::FencedInstanceId => ResponseError::FencedInstanceId,
        ClassicError::GroupMaxSizeReached => ResponseError::GroupMaxSizeReached,
        ClassicError::InvalidSessionTimeout => ResponseError::InvalidSessionTimeout,
    }
    .code()
}

fn refusal_code(r: &ClassicRefusal) -> i16 {
    match r {
        ClassicRefusal::Group(e) => classic_code(*e),
        ClassicRefusal::InvalidGroupId(_) => ResponseError::InvalidGroupId.code(),
        ClassicRefusal::InUse(_) => ResponseError::InconsistentGroupProtocol.code(),
    }
}

fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

pub(crate) async fn join_group(
    kafka: &Kafka,
    req: JoinGroupRequest,
    version: i16,
    client_id: String,
    client_host: String,
) -> JoinGroupResponse {
    let group = req.group_id.0.to_string();
    let mut response = JoinGroupResponse::default();
    response.generation_id = -1;
    if !crate::access::group(Operation::Consume, &group) {
        response.error_code = ResponseError::GroupAuthorizationFailed.code();
        return response;
    }
    let join = JoinRequest {
        member_id: req.member_id.to_string(),
        instance: req.group_instance_id.map(|i| i.to_string()),
        client_id,
        client_host,
        session_timeout_ms: u64::try_from(req.session_timeout_ms).unwrap_or(0),
        // Version 0 has no rebalance timeout: it is the session timeout.
        rebalance_timeout_ms: u64::try_from(if version == 0 {
            req.session_timeout_ms
        } else {
            req.rebalance_timeout_ms
        })
        .unwrap_or(0),
        protocol_type: req.protocol_type.to_string(),
        protocols: req
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata.to_vec()))
            .collect(),
        require_known_member_id: version >= 4,
    };
    match kafka.broker.classic_join(&group, join).await {
        Err(refusal) => {
            tracing::debug!(group, ?refusal, "Kafka JoinGroup refused");
            response.error_code = refusal_code(&refusal);
        }
        Ok(Err((e, member_id))) => {
            response.error_code = classic_code(e);
            if let Some(id) = member_id {
                response.member_id = str_bytes(id);
            }
        }
        Ok(Ok(joined)) => {
            response.generation_id = joined.generation;
            if version >= 7 {
                response.protocol_type = Some(str_bytes(joined.protocol_type));
            }
            response.protocol_name = Some(str_bytes(joined.protocol));
            response.leader = str_bytes(joined.leader);
            response.member_id = str_bytes(joined.member_id);
            response.members = joined
                .members
                .into_iter()
                .map(|(id, instance, metadata)| {
                    let mut m = JoinGroupResponseMember::default();
                    m.member_id = str_bytes(id);
                    if version >= 5 {
                        m.group_instance_id = instance.map(str_bytes);
                    }
                    m.metadata = Bytes::from(metadata);
                    m
                })
                .collect();
        }
    }
    response
}

pub(crate) async fn sync_group(
    kafka: &Kafka,
    req: SyncGroupRequest,
    version: i16,
) -> SyncGroupResponse {
    let group = req.group_id.0.to_string();
    let mut response = SyncGroupResponse::default();
    if !crate::access::group(Operation::Consume, &group) {
        response.error_code = ResponseError::GroupAuthorizationFailed.code();
        return response;
    }
    let assignments = req
        .assignments
        .into_iter()
        .map(|a| (a.member_id.to_string(), a.assignment.to_vec()))
        .collect();
    match kafka
        .broker
        .classic_sync(&group, &req.member_id, req.generation_id, assignments)
        .await
    {
        Err(refusal) => response.error_code = refusal_code(&refusal),
        Ok(Err(e)) => response.error_code = classic_code(e),
        Ok(Ok(assignment)) => {
            response.assignment = Bytes::from(assignment);
            if version >= 5
                && let Some(info) = kafka.broker.classic_describe(&group)
            {
                response.protocol_type = Some(str_bytes(info.protocol_type));
                response.protocol_name = Some(str_bytes(info.protocol));
            }
        }
    }
    response
}

pub(crate) fn heartbeat(kafka: &Kafka, req: HeartbeatRequest) -> HeartbeatResponse {
    let mut response = HeartbeatResponse::default();
    if !crate::access::group(Operation::Consume, &req.group_id.0) {
        response.error_code = ResponseError::GroupAuthorizationFailed.code();
        return response;
    }
    if let Err(e) = kafka.broker.classic_heartbeat(
        &req.group_id.0,
        &req.member_id,
        req.group_instance_id.as_deref(),
        req.generation_id,
    ) {
        response.error_code = classic_code(e);
    }
    response
}

pub(crate) fn leave_group(
    kafka: &Kafka,
    req: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    let group = req.group_id.0.to_string();
    let mut response = LeaveGroupResponse::default();
    if !crate::access::group(Operation::Consume, &group) {
        response.error_code = ResponseError::GroupAuthorizationFailed.code();
        return response;
    }
    if version < 3 {
        if let Err(e) = kafka.broker.classic_leave(&group, &req.member_id, None) {
            response.error_code = classic_code(e);
        }
        return response;
    }
    for member in req.members {
        let mut out = MemberResponse::default();
        if let Err(e) = kafka.broker.classic_leave(
            &group,
            &member.member_id,
            member.group_instance_id.as_deref(),
        ) {
            out.error_code = classic_code(e);
        }
        out.member_id = member.member_id;
        out.group_instance_id = member.group_instance_id;
        response.members.push(out);
    }
    response
}

pub(crate) async fn list_groups(kafka: &Kafka, req: ListGroupsRequest) -> ListGroupsResponse {
    let mut response = ListGroupsResponse::default();
    for name in kafka.broker.list_groups().await {
        if !crate::access::visible(
            Operation::Describe,
            tidewater_auth::ResourceKind::Group,
            &name,
        ) {
            continue;
        }
        let (state, kind) = match kafka.broker.classic_describe(&name) {
            Some(info) => (info.state.to_string(), "classic"),
            None => {
                let members = kafka
                    .broker
                    .describe_group(&name)
                    .await
                    .map_or(0, |g| g.members.len());
                let state = if members == 0 { "Empty" } else { "Stable" };
                // A group with committed offsets only is shown as Kafka shows one: classic.
                let kind = match kafka.broker.group_kind(&name) {
                    Some(tidewater_core::broker::GroupKind::Consumer) => "consumer",
                    _ => "classic",
                };
                (state.to_string(), kind)
            }
        };
        if !req.states_filter.is_empty() && !req.states_filter.iter().any(|s| **s == *state) {
            continue;
        }
        if !req.types_filter.is_empty()
            && !req
                .types_filter
                .iter()
                .any(|t| t.eq_ignore_ascii_case(kind))
        {
            continue;
        }
        let mut g = ListedGroup::default();
        g.group_id = GroupId(str_bytes(name));
        g.protocol_type = str_bytes("consumer");
        g.group_state = str_bytes(state);
        g.group_type = str_bytes(kind);
        response.groups.push(g);
    }
    // Share groups with members (their subscriptions are tidewater's own to list).
    let shares = kafka.shares.lock().groups();
    for name in shares {
        if !crate::access::visible(
            Operation::Describe,
            tidewater_auth::ResourceKind::Group,
            &name,
        ) {
            continue;
        }
        let wanted_type = req.types_filter.is_empty()
            || req
                .types_filter
                .iter()
                .any(|t| t.eq_ignore_ascii_case("share"));
        let wanted_state =
            req.states_filter.is_empty() || req.states_filter.iter().any(|s| &**s == "Stable");
        if !wanted_type || !wanted_state {
            continue;
        }
        let mut g = ListedGroup::default();
        g.group_id = GroupId(str_bytes(name));
        g.protocol_type = str_bytes("share");
        g.group_state = str_bytes("Stable");
        g.group_type = str_bytes("share");
        response.groups.push(g);
    }
    response
}

/// Kafka's ConsumerProtocolAssignment (version 0): topics with their partitions.
fn consumer_assignment(parts: &[(String, u32)]) -> Bytes {
    let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
    for (topic, p) in parts {
        by_topic.entry(topic).or_default().push(*p as i32);
    }
    let mut out = BytesMut::new();
    out.put_i16(0);
    out.put_i32(by_topic.len() as i32);
    for (topic, partitions) in by_topic {
        out.put_i16(topic.len() as i16);
        out.put_slice(topic.as_bytes());
        out.put_i32(partitions.len() as i32);
        for p in partitions {
            out.put_i32(p);
        }
    }
    out.put_i32(-1); // no user data
    out.freeze()
}

pub(crate) async fn describe_groups(
    kafka: &Kafka,
    req: DescribeGroupsRequest,
    version: i16,
) -> DescribeGroupsResponse {
    let mut response = DescribeGroupsResponse::default();
    for group in req.groups {
        let name = group.0.to_string();
        let mut out = DescribedGroup::default();
        out.group_id = group;
        if !crate::access::group(Operation::Describe, &name) {
            out.error_code = ResponseError::GroupAuthorizationFailed.code();
            response.groups.push(out);
            continue;
        }
        if let Some(info) = kafka.broker.classic_describe(&name) {
            out.group_state = str_bytes(info.state);
            out.protocol_type = str_bytes(info.protocol_type);
            out.protocol_data = str_bytes(info.protocol);
            out.members = info
                .members
                .into_iter()
                .map(|m| {
                    let mut d = DescribedGroupMember::default();
                    d.member_id = str_bytes(m.member_id);
                    if version >= 4 {
                        d.group_instance_id = m.instance.map(str_bytes);
                    }
                    d.client_id = str_bytes(m.client_id);
                    d.client_host = str_bytes(m.client_host);
                    d.member_metadata = Bytes::from(m.metadata);
                    d.member_assignment = Bytes::from(m.assignment);
                    d
                })
                .collect();
        } else {
            match kafka.broker.describe_group(&name).await {
                Ok(info) => {
                    out.group_state = str_bytes(if info.members.is_empty() {
                        "Empty"
                    } else {
                        "Stable"
                    });
                    out.protocol_type = str_bytes("consumer");
                    out.protocol_data = str_bytes(if info.members.is_empty() {
                        ""
                    } else {
                        "tidewater"
                    });
                    out.members = info
                        .members
                        .into_iter()
                        .map(|m| {
                            let mut d = DescribedGroupMember::default();
                            let parts: Vec<(String, u32)> = m
                                .assigned
                                .into_iter()
                                .map(|a| (a.stream, a.partition))
                                .collect();
                            d.member_id = str_bytes(m.member);
                            d.client_id = str_bytes("tidewater");
                            d.member_assignment = consumer_assignment(&parts);
                            d
                        })
                        .collect();
                }
                Err(_) => {
                    // Kafka describes an unknown group as Dead with no members.
                    out.group_state = str_bytes("Dead");
                }
            }
        }
        response.groups.push(out);
    }
    response
}

pub(crate) async fn delete_groups(kafka: &Kafka, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let mut response = DeleteGroupsResponse::default();
    for group in req.groups_names {
        let mut out = DeletableGroupResult::default();
        if !crate::access::group(Operation::Admin, &group.0) {
            out.error_code = ResponseError::GroupAuthorizationFailed.code();
        } else if let Err(err) = kafka.broker.delete_group(&group.0).await {
            out.error_code = crate::errors::code(&err);
        }
        crate::access::audit("DeleteGroups", &group.0, out.error_code);
        out.group_id = group;
        response.results.push(out);
    }
    response
}

pub(crate) async fn offset_delete(kafka: &Kafka, req: OffsetDeleteRequest) -> OffsetDeleteResponse {
    let group = req.group_id.0.to_string();
    let mut parts = Vec::new();
    for topic in &req.topics {
        for p in &topic.partitions {
            if let Ok(partition) = u32::try_from(p.partition_index) {
                parts.push((topic.name.0.to_string(), partition));
            }
        }
    }
    let mut response = OffsetDeleteResponse::default();
    if !crate::access::group(Operation::Admin, &group) {
        response.error_code = ResponseError::GroupAuthorizationFailed.code();
        return response;
    }
    if let Err(err) = kafka.broker.delete_offsets(&group, &parts).await {
        response.error_code = crate::errors::code(&err);
        crate::access::audit("OffsetDelete", &group, response.error_code);
        return response;
    }
    crate::access::audit("OffsetDelete", &group, 0);
    for topic in req.topics {
        let mut out = OffsetDeleteResponseTopic::default();
        out.name = topic.name;
        out.partitions = topic
            .partitions
            .into_iter()
            .map(|p| {
                let mut r = OffsetDeleteResponsePartition::default();
                r.partition_index = p.partition_index;
                r
            })
            .collect();
        response.topics.push(out);
    }
    response
}
