//! The APIs and versions served, and the dispatch of a request to its handler.
//!
//! A request is decoded and *started* on the connection's reader, in the order received
//! (a produce hands its batches to storage there, so a connection's appends keep their
//! order), and finished in a task; the writer answers in the same order. An API or version
//! not listed here is absent from ApiVersions; a request for one closes its connection, as
//! Kafka's broker does (ApiVersions excepted: an unsupported version of it is answered with
//! the versions supported, KIP-511).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use crate::Kafka;
use crate::access::Access;
use crate::sasl::Session;

/// (API, lowest version, highest version) served. Highest versions stop where a later one
/// needs what tidewater does not have yet (ListOffsets 9: tiered storage's latest tiered
/// offset; Produce 13: topic ids in produce requests).
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 12),
    (ApiKey::Fetch, 4, 17),
    (ApiKey::ListOffsets, 1, 8),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::FindCoordinator, 0, 5),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::InitProducerId, 0, 5),
    (ApiKey::DescribeCluster, 0, 1),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::ConsumerGroupHeartbeat, 0, 1),
    (ApiKey::ConsumerGroupDescribe, 0, 1),
    (ApiKey::ShareGroupHeartbeat, 1, 1),
    (ApiKey::ShareGroupDescribe, 1, 1),
    (ApiKey::ShareFetch, 1, 1),
    (ApiKey::ShareAcknowledge, 1, 1),
    (ApiKey::DescribeShareGroupOffsets, 0, 0),
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// The versions of `api` served, if any.
pub fn supported_versions(api: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == api)
        .map(|&(_, min, max)| (min, max))
}

/// A request's answer: the response frame (length prefix included), none (a produce with
/// acks 0), or a reason to close the connection.
pub(crate) type Answer = Result<Option<Frame>, String>;

/// A response frame, and the share of the listener's memory budget it holds until written
/// (a fetch's: its batches are read into memory).
pub(crate) struct Frame {
    pub bytes: Bytes,
    pub held: Option<tokio::sync::OwnedSemaphorePermit>,
}
pub(crate) type Reply = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// A request decoded: its header and body, at a version served.
#[derive(Debug)]
pub enum Decoded {
    Request(RequestHeader, Box<RequestKind>),
    /// ApiVersions at a version not served: answered with the versions that are (KIP-511).
    UnsupportedApiVersions(RequestHeader),
}

/// Decodes a request frame (without its length prefix): the header, then the body at the
/// header's version, for an API and version served. No I/O: the fuzz target `kafka_request`
/// drives it. An error is a reason to close the connection.
pub fn decode_request(mut frame: Bytes) -> Result<Decoded, String> {
    if frame.len() < 4 {
        return Err(format!(
            "a request of {} bytes is shorter than a request header",
            frame.len()
        ));
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let api = ApiKey::try_from(key).map_err(|_| format!("unknown API key {key}"))?;
    let header = RequestHeader::decode(&mut frame, api.request_header_version(version))
        .map_err(|e| format!("malformed request header ({api:?} v{version}): {e}"))?;
    let Some((min, max)) = supported_versions(api) else {
        return Err(format!("{api:?} (API key {key}) is not supported"));
    };
    if !(min..=max).contains(&version) {
        if api == ApiKey::ApiVersions {
            return Ok(Decoded::UnsupportedApiVersions(header));
        }
        return Err(format!(
            "{api:?} version {version} is not supported (versions {min}..={max})"
        ));
    }
    let request = RequestKind::decode(api, &mut frame, version)
        .map_err(|e| format!("malformed {api:?} v{version} request: {e}"))?;
    Ok(Decoded::Request(header, Box::new(request)))
}

/// How a request was started.
pub(crate) enum Started {
    /// Its work was done or handed off on the reader (a produce's batches to storage): the
    /// next request may start now; the reply only waits.
    Handed(Reply),
    /// Its work is in the reply: the next request starts once it is done.
    Later(Reply),
}

/// Decodes a request frame (without its length) and starts it, within what the
/// connection's principal may do (`access`).
pub(crate) fn start(
    kafka: &Arc<Kafka>,
    frame: Bytes,
    session: &mut Session,
) -> Result<Started, String> {
    let (header, request) = match decode_request(frame)? {
        Decoded::Request(header, request) => (header, *request),
        Decoded::UnsupportedApiVersions(header) => {
            let response = api_versions_response(ResponseError::UnsupportedVersion.code());
            return Ok(Started::Handed(ready(encode(&header, 0, &response))));
        }
    };
    let version = header.request_api_version;
    let access = match request {
        RequestKind::ApiVersions(_) => {
            return Ok(Started::Handed(ready(encode(
                &header,
                version,
                &api_versions_response(0),
            ))));
        }
        RequestKind::SaslHandshake(req) => {
            let response = crate::sasl::handshake(kafka, session, req);
            return Ok(Started::Handed(ready(encode(&header, version, &response))));
        }
        RequestKind::SaslAuthenticate(req) => {
            let response = crate::sasl::authenticate(kafka, session, req);
            return Ok(Started::Handed(ready(encode(&header, version, &response))));
        }
        _ => gate(kafka, session, &header)?,
    };
    Ok(
        match start_request(kafka, header, request, session.peer, access.clone())? {
            Started::Handed(reply) => {
                Started::Handed(Box::pin(crate::access::scope(access, reply)))
            }
            Started::Later(reply) => Started::Later(Box::pin(crate::access::scope(access, reply))),
        },
    )
}

/// What a request (other than ApiVersions and SASL's) may do: everything with
/// authentication off; with it on, what the SASL-authenticated principal's grants allow
/// now. A connection that has not authenticated, failed to, or whose key went (revoked or
/// expired) is closed, as Kafka's broker closes it.
fn gate(kafka: &Kafka, session: &mut Session, header: &RequestHeader) -> Result<Access, String> {
    if matches!(session.sasl, crate::sasl::Sasl::Failed) {
        return Err("SASL authentication failed on this connection".into());
    }
    let Some(access) = &session.access else {
        return Err(format!(
            "SASL authentication is required before API key {} (the listener has authentication on: security.protocol SASL_PLAINTEXT or SASL_SSL)",
            header.request_api_key
        ));
    };
    if let Access::Known { state, identity } = access {
        let now = kafka.broker.auth();
        if now.epoch() != state.epoch() || identity.expires_at_ms.is_some() {
            if !now.still_valid(identity, kafka.broker.now_ms()) {
                return Err(format!(
                    "the key of principal '{}' was revoked or expired: closing",
                    identity.principal
                ));
            }
            session.access = Some(Access::Known {
                state: now,
                identity: identity.clone(),
            });
        }
    }
    Ok(session.access.clone().unwrap_or(Access::Open))
}

fn start_request(
    kafka: &Arc<Kafka>,
    header: RequestHeader,
    request: RequestKind,
    peer: std::net::SocketAddr,
    access: Access,
) -> Result<Started, String> {
    let version = header.request_api_version;
    let k = kafka.clone();
    if let RequestKind::Produce(req) = request {
        return Ok(Started::Handed(crate::access::sync_scope(access, || {
            crate::produce::start(kafka, header, req)
        })));
    }
    Ok(Started::Later(match request {
        RequestKind::Metadata(req) => respond(header, async move {
            crate::metadata::metadata(&k, req, version)
        }),
        RequestKind::DescribeCluster(req) => {
            respond(
                header,
                async move { crate::metadata::describe_cluster(&k, req) },
            )
        }
        RequestKind::Fetch(req) => respond_holding(header, async move {
            crate::fetch::fetch(&k, req, version).await
        }),
        RequestKind::ListOffsets(req) => {
            respond(header, async move { crate::offsets::list_offsets(&k, req) })
        }
        RequestKind::InitProducerId(req) => {
            respond(
                header,
                async move { crate::produce::init_producer_id(&k, req) },
            )
        }
        RequestKind::FindCoordinator(req) => respond(header, async move {
            crate::offsets::find_coordinator(&k, req, version)
        }),
        RequestKind::OffsetCommit(req) => respond(header, async move {
            crate::offsets::offset_commit(&k, req).await
        }),
        RequestKind::OffsetFetch(req) => respond(header, async move {
            crate::offsets::offset_fetch(&k, req, version).await
        }),
        RequestKind::CreateTopics(req) => {
            respond(
                header,
                async move { crate::admin::create_topics(&k, req).await },
            )
        }
        RequestKind::DeleteTopics(req) => respond(header, async move {
            crate::admin::delete_topics(&k, req, version).await
        }),
        RequestKind::JoinGroup(req) => {
            let client_id = header
                .client_id
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            let host = format!("/{}", peer.ip());
            respond(header, async move {
                crate::groups::join_group(&k, req, version, client_id, host).await
            })
        }
        RequestKind::SyncGroup(req) => respond(header, async move {
            crate::groups::sync_group(&k, req, version).await
        }),
        RequestKind::Heartbeat(req) => {
            respond(header, async move { crate::groups::heartbeat(&k, req) })
        }
        RequestKind::LeaveGroup(req) => respond(header, async move {
            crate::groups::leave_group(&k, req, version)
        }),
        RequestKind::ListGroups(req) => {
            respond(
                header,
                async move { crate::groups::list_groups(&k, req).await },
            )
        }
        RequestKind::DescribeGroups(req) => respond(header, async move {
            crate::groups::describe_groups(&k, req, version).await
        }),
        RequestKind::DeleteGroups(req) => respond(header, async move {
            crate::groups::delete_groups(&k, req).await
        }),
        RequestKind::OffsetDelete(req) => respond(header, async move {
            crate::groups::offset_delete(&k, req).await
        }),
        RequestKind::DescribeConfigs(req) => respond(header, async move {
            crate::admin::describe_configs(&k, req, version)
        }),
        RequestKind::IncrementalAlterConfigs(req) => respond(header, async move {
            crate::admin::incremental_alter_configs(&k, req).await
        }),
        RequestKind::CreatePartitions(req) => respond(header, async move {
            crate::admin::create_partitions(&k, req).await
        }),
        RequestKind::ConsumerGroupHeartbeat(req) => {
            respond(header, async move { crate::consumer::heartbeat(&k, req) })
        }
        RequestKind::ConsumerGroupDescribe(req) => {
            respond(
                header,
                async move { crate::consumer::describe(&k, req).await },
            )
        }
        RequestKind::ShareGroupHeartbeat(req) => {
            respond(
                header,
                async move { crate::share::heartbeat(&k, req).await },
            )
        }
        RequestKind::ShareGroupDescribe(req) => {
            respond(header, async move { crate::share::describe(&k, req) })
        }
        RequestKind::ShareFetch(req) => {
            respond_holding(header, async move { crate::share::fetch(&k, req).await })
        }
        RequestKind::ShareAcknowledge(req) => respond(header, async move {
            crate::share::acknowledge_request(&k, req).await
        }),
        RequestKind::DescribeShareGroupOffsets(req) => {
            respond(
                header,
                async move { crate::share::describe_offsets(&k, req) },
            )
        }
        _ => {
            return Err(format!(
                "API key {} is not supported",
                header.request_api_key
            ));
        }
    }))
}

fn ready(answer: Answer) -> Reply {
    Box::pin(std::future::ready(answer))
}

/// A handler's response, encoded at the request's version once it is ready.
pub(crate) fn respond<R, F>(header: RequestHeader, response: F) -> Reply
where
    R: Encodable + Send,
    F: Future<Output = R> + Send + 'static,
{
    Box::pin(async move {
        let response = response.await;
        encode(&header, header.request_api_version, &response)
    })
}

/// The response frame: length, response header, body at `version`.
pub(crate) fn encode<R: Encodable>(header: &RequestHeader, version: i16, response: &R) -> Answer {
    let api = ApiKey::try_from(header.request_api_key)
        .map_err(|_| "a response for an unknown API".to_string())?;
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    let mut response_header = ResponseHeader::default();
    response_header.correlation_id = header.correlation_id;
    let failed = |e: anyhow::Error| {
        tracing::error!(api = ?api, version, error = %e, "a Kafka response failed to encode");
        format!("{api:?} v{version}: the response failed to encode: {e}")
    };
    response_header
        .encode(&mut buf, api.response_header_version(version))
        .map_err(failed)?;
    response.encode(&mut buf, version).map_err(failed)?;
    let len = i32::try_from(buf.len() - 4).map_err(|_| "a response over 2 GiB".to_string())?;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(Some(Frame {
        bytes: buf.freeze(),
        held: None,
    }))
}

/// As `respond`, for a handler that holds part of the memory budget for its response.
pub(crate) fn respond_holding<R, F>(header: RequestHeader, response: F) -> Reply
where
    R: Encodable + Send,
    F: Future<Output = (R, Option<tokio::sync::OwnedSemaphorePermit>)> + Send + 'static,
{
    Box::pin(async move {
        let (response, held) = response.await;
        let mut frame = encode(&header, header.request_api_version, &response)?;
        if let Some(frame) = &mut frame {
            frame.held = held;
        }
        Ok(frame)
    })
}

fn api_versions_response(error_code: i16) -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default();
    response.error_code = error_code;
    response.api_keys = SUPPORTED
        .iter()
        .map(|&(api, min, max)| {
            let mut v = ApiVersion::default();
            v.api_key = api as i16;
            v.min_version = min;
            v.max_version = max;
            v
        })
        .collect();
    response
}

/// An optional text for a response's error message field.
pub(crate) fn text(message: impl Into<String>) -> Option<StrBytes> {
    Some(StrBytes::from_string(message.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/kafka.md's table of APIs is the list served, version ranges included.
    #[test]
    fn docs_list_every_api_served() {
        let doc = include_str!("../../../docs/kafka.md");
        let mut listed = Vec::new();
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() == 5
                && let Ok(key) = cells[2].parse::<i16>()
            {
                let (min, max) = match cells[3].split_once('-') {
                    Some((a, b)) => (a.parse::<i16>().unwrap(), b.parse::<i16>().unwrap()),
                    None => {
                        let v = cells[3].parse::<i16>().unwrap();
                        (v, v)
                    }
                };
                listed.push((cells[1].to_string(), key, min, max));
            }
        }
        let mut served: Vec<(String, i16, i16, i16)> = SUPPORTED
            .iter()
            .map(|&(api, min, max)| (format!("{api:?}"), api as i16, min, max))
            .collect();
        served.sort_by_key(|s| s.1);
        listed.sort_by_key(|s| s.1);
        assert_eq!(listed, served, "docs/kafka.md's table of APIs served");
    }
}
