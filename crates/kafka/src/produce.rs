//! Produce and InitProducerId.
//!
//! acks 0 and 1 are written at `written` (after write(2); acks 0 is not answered), acks
//! all (-1) at `durable` (after the fdatasync that covers it: tidewater's default). Each
//! partition's batches are checked (CRC), decompressed within a bound, checked against the
//! stream (keys on a compacted stream, sizes) and handed to storage on the connection's
//! reader, in order; the answer waits in a task. An idempotent producer's batch is first
//! checked against its sequence state (`producers.rs`): a batch sent again is answered with
//! its first append's offset, not written twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use tidewater_auth::Operation;
use tidewater_core::{AckLevel, BrokerError, ErrorCode};
use tokio::sync::watch;

use crate::codec::{BatchError, ready_batches};
use crate::producers::Sequenced;
use crate::versions::{Reply, encode, text};
use crate::{Kafka, Landed};

type Appending = Pin<Box<dyn Future<Output = Result<(u64, u32, Option<i64>), BrokerError>> + Send>>;

/// Who to tell how an idempotent producer's batch went: its duplicates' waiters, and the
/// producer state to drop if it failed.
type Tell = (
    watch::Sender<Option<Landed>>,
    crate::producers::PartitionKey,
    i64,
    i32,
);

/// One batch on its way.
enum Wait {
    /// Its append, and (for an idempotent producer's batch) who to tell how it went.
    Append {
        appending: Appending,
        tell: Option<Tell>,
        /// The Kafka error code of a refusal made here (else the broker error's).
        code: Option<i16>,
    },
    /// A batch sent again: the first one's answer.
    Duplicate(watch::Receiver<Option<Landed>>),
}

/// A partition's answer, or what it waits for (and the memory budget its decompressed
/// records hold until then).
enum Partition {
    Done(i16, String),
    Waiting(Vec<Wait>, Option<tokio::sync::OwnedSemaphorePermit>),
}

/// Starts a Produce on the connection's reader (its batches reach storage in order) and
/// returns the wait for its answer.
pub(crate) fn start(kafka: &Arc<Kafka>, header: RequestHeader, req: ProduceRequest) -> Reply {
    let version = header.request_api_version;
    let acks = req.acks;
    let level = match acks {
        0 | 1 => Some(AckLevel::Written),
        -1 => Some(AckLevel::Durable),
        _ => None,
    };
    // What the whole request may decompress (a few bytes of zstd can claim gigabytes).
    let mut allowance = kafka.config.max_uncompressed_produce_bytes;
    let mut topics = Vec::with_capacity(req.topic_data.len());
    for topic in req.topic_data {
        let name = topic.name.0.to_string();
        let mut parts = Vec::with_capacity(topic.partition_data.len());
        for part in topic.partition_data {
            let state = match (level, &req.transactional_id) {
                (None, _) => Partition::Done(
                    ResponseError::InvalidRequiredAcks.code(),
                    format!("acks must be 0, 1 or -1 (all), not {acks}"),
                ),
                (_, Some(_)) => Partition::Done(
                    ResponseError::TransactionalIdAuthorizationFailed.code(),
                    "transactions are not supported by tidewater: produce without a transactional.id (idempotence is supported)".into(),
                ),
                (Some(_), None) if !crate::access::topic(Operation::Produce, &name) => {
                    Partition::Done(
                        ResponseError::TopicAuthorizationFailed.code(),
                        format!("no grant of produce on stream '{name}'"),
                    )
                }
                (Some(level), None) => start_partition(
                    kafka,
                    &name,
                    part.index,
                    part.records.as_deref(),
                    level,
                    &mut allowance,
                ),
            };
            parts.push((part.index, state));
        }
        topics.push((topic.name, parts));
    }
    let kafka = kafka.clone();
    Box::pin(async move {
        let mut response = ProduceResponse::default();
        for (name, parts) in topics {
            let mut topic = TopicProduceResponse::default();
            topic.name = name.clone();
            for (index, state) in parts {
                let mut part = PartitionProduceResponse::default();
                part.index = index;
                part.log_append_time_ms = -1;
                let (code, message) = match state {
                    Partition::Done(code, message) => (code, message),
                    Partition::Waiting(waits, _memory) => match finish(&kafka, waits).await {
                        Ok((base, append_time)) => {
                            part.base_offset = base;
                            part.log_append_time_ms = append_time;
                            (0, String::new())
                        }
                        Err(err) => err,
                    },
                };
                part.error_code = code;
                if code != 0 {
                    part.base_offset = -1;
                    kafka
                        .stats
                        .request_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if version >= 8 {
                        part.error_message = text(message);
                    }
                } else if version >= 5 {
                    part.log_start_offset = kafka
                        .broker
                        .list_offset(
                            &name.0,
                            index.max(0) as u32,
                            tidewater_core::broker::EARLIEST,
                        )
                        .ok()
                        .flatten()
                        .map_or(-1, |o| o as i64);
                }
                topic.partition_responses.push(part);
            }
            response.responses.push(topic);
        }
        if acks == 0 {
            // No answer to carry an error: Kafka closes the connection so that the client
            // notices (and its metadata refresh and retries start).
            let refused = response
                .responses
                .iter()
                .flat_map(|t| &t.partition_responses)
                .find(|p| p.error_code != 0);
            if let Some(p) = refused {
                return Err(format!(
                    "an acks=0 produce was refused (error code {}); closing the connection",
                    p.error_code
                ));
            }
            return Ok(None);
        }
        encode(&header, version, &response)
    })
}

/// Checks a partition's records and starts each batch's append (or finds it already
/// taken). `allowance` is what the request may still decompress (bytes, shared by its
/// partitions).
fn start_partition(
    kafka: &Kafka,
    stream: &str,
    index: i32,
    records: Option<&[u8]>,
    level: AckLevel,
    allowance: &mut usize,
) -> Partition {
    let Ok(partition) = u32::try_from(index) else {
        return Partition::Done(
            ResponseError::UnknownTopicOrPartition.code(),
            format!("no partition {index}"),
        );
    };
    let batches = match ready_batches(records.unwrap_or_default(), *allowance) {
        Ok(batches) => batches,
        Err(err) => {
            let code = match err {
                BatchError::Corrupt(_) | BatchError::Decompress { .. } => {
                    ResponseError::CorruptMessage
                }
                BatchError::UnknownCodec(_) => ResponseError::UnsupportedCompressionType,
                BatchError::TooLarge { .. } => ResponseError::RecordListTooLarge,
                BatchError::Transactional => ResponseError::InvalidRecord,
            };
            return Partition::Done(code.code(), err.to_string());
        }
    };
    // A record naming a tenant other than the principal's needs set_tenant on the stream
    // (work-queue subscriptions count it against that tenant).
    if let Some(own) = crate::access::tenant() {
        let foreign = batches.iter().find_map(|b| {
            tidewater_storage::format::kafka::header_other_than(
                &b.bytes,
                tidewater_core::queue::HEADER_TENANT.as_bytes(),
                own.as_bytes(),
            )
            .ok()
            .flatten()
        });
        if let Some(tenant) = foreign
            && !crate::access::may(
                Operation::SetTenant,
                tidewater_auth::ResourceKind::Stream,
                stream,
            )
        {
            return Partition::Done(
                ResponseError::TopicAuthorizationFailed.code(),
                format!(
                    "a record names tenant '{}'; the principal's is '{own}' (naming another needs set_tenant on stream '{stream}')",
                    String::from_utf8_lossy(tenant)
                ),
            );
        }
    }
    let decompressed: usize = batches
        .iter()
        .filter(|b| b.compressed)
        .map(|b| b.bytes.len())
        .sum();
    *allowance = allowance.saturating_sub(decompressed);
    // Decompressed records count against the listener's memory budget until their append is
    // answered; when the budget is in use the partition is refused, retriably.
    let memory = if decompressed > 0 {
        let (granted, permit) = kafka.hold(decompressed);
        if permit.is_none() || granted < decompressed {
            return Partition::Done(
                ResponseError::RequestTimedOut.code(),
                "the Kafka listener's memory budget (max_request_bytes_in_flight) is in use: send again".into(),
            );
        }
        permit
    } else {
        None
    };
    let stream_uid = match kafka.broker.stream_uid(stream) {
        Ok(uid) => uid,
        Err(err) => return Partition::Done(crate::errors::code(&err), err.message),
    };
    let at = (stream_uid, partition);
    if batches.iter().any(|b| b.header.producer_id >= 0) {
        restore_partition(kafka, at, stream, partition);
    }
    let mut waits = Vec::with_capacity(batches.len());
    // A refusal after earlier batches of the partition were started: they are answered
    // (their duplicates wait on them), the refusal is the partition's answer.
    let refuse = |waits: &mut Vec<Wait>, code: ResponseError, message: String| {
        waits.push(Wait::Append {
            appending: Box::pin(std::future::ready(Err(BrokerError::new(
                ErrorCode::InvalidMessage,
                message,
            )))),
            tell: None,
            code: Some(code.code()),
        });
    };
    for batch in batches {
        let header = batch.header;
        let mut producers = kafka.producers.lock();
        let mut sender = None;
        let sequenced = producers.begin(at, &header, || {
            let (tx, rx) = watch::channel(None);
            sender = Some(tx);
            rx
        });
        let tell = match sequenced {
            Sequenced::Plain => None,
            Sequenced::Fresh => sender.map(|tx| (tx, at, header.producer_id, header.base_sequence)),
            Sequenced::Duplicate(rx) => {
                kafka
                    .stats
                    .duplicates
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                waits.push(Wait::Duplicate(rx));
                continue;
            }
            Sequenced::OutOfOrder { expected, got } => {
                kafka
                    .stats
                    .out_of_order
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                refuse(
                    &mut waits,
                    ResponseError::OutOfOrderSequenceNumber,
                    format!(
                        "producer {}: sequence {got} where {expected} was expected",
                        header.producer_id
                    ),
                );
                break;
            }
            Sequenced::StaleEpoch { current, got } => {
                refuse(
                    &mut waits,
                    ResponseError::InvalidProducerEpoch,
                    format!(
                        "producer {}: epoch {got} is older than its current epoch {current}",
                        header.producer_id
                    ),
                );
                break;
            }
        };
        match kafka
            .broker
            .start_produce_batch(stream, partition, batch.bytes, level)
        {
            Ok(appending) => waits.push(Wait::Append {
                appending: Box::pin(appending),
                tell,
                code: None,
            }),
            Err(err) => {
                if let Some((tx, at, pid, first)) = tell {
                    // Nothing was written: the producer's next sequence is this batch's
                    // first again (its retry is taken; the batches after it are out of
                    // order until it is, as in Kafka).
                    producers.rollback(at, pid, first);
                    let _ = tx.send(Some(Err((crate::errors::code(&err), err.message.clone()))));
                }
                waits.push(Wait::Append {
                    appending: Box::pin(std::future::ready(Err(err))),
                    tell: None,
                    code: None,
                });
                break;
            }
        }
    }
    Partition::Waiting(waits, memory)
}

/// Offsets back from a partition's end that the producer state is rebuilt from after a
/// restart, and the bytes read for it at most.
const RESTORE_OFFSETS: u64 = 100_000;
const RESTORE_BYTES: usize = 32 << 20;

/// The first idempotent batch for a partition since the listener started: rebuild its
/// producers' state from the partition's last batches (at most `RESTORE_OFFSETS` back and
/// `RESTORE_BYTES`: the window ends at the partition's end), read without the producers'
/// lock. Only producers with no state yet take what is found: state made by batches taken
/// since the start is newer.
fn restore_partition(
    kafka: &Kafka,
    at: crate::producers::PartitionKey,
    stream: &str,
    partition: u32,
) {
    if !kafka.restored.lock().insert(at) {
        return;
    }
    let end = kafka
        .broker
        .list_offset(stream, partition, tidewater_core::broker::LATEST)
        .ok()
        .flatten()
        .unwrap_or(0);
    let read = |from: u64| -> Option<Vec<tidewater_storage::StoredBatch>> {
        let mut out = Vec::new();
        let mut from = from;
        let mut bytes = 0usize;
        while from < end {
            let batches = kafka
                .broker
                .read_partition_batches(stream, partition, from, 1 << 20)
                .ok()?;
            let last = batches.last()?;
            from = last.base_offset + u64::from(last.span);
            bytes += batches.iter().map(|b| b.kafka.len()).sum::<usize>();
            if bytes > RESTORE_BYTES {
                return None;
            }
            out.extend(batches);
        }
        Some(out)
    };
    let mut from = end.saturating_sub(RESTORE_OFFSETS);
    let mut found = read(from);
    if found.is_none() {
        // Too many bytes in the window: estimate bytes per offset from its end's size and
        // take the offsets that fit.
        let segments = kafka
            .broker
            .read_partition_batches(stream, partition, end.saturating_sub(1_000), 1 << 20)
            .unwrap_or_default();
        let (bytes, span) = segments.iter().fold((0u64, 0u64), |(b, s), batch| {
            (b + batch.kafka.len() as u64, s + u64::from(batch.span))
        });
        if bytes > 0 && span > 0 {
            let fit = (RESTORE_BYTES as u64 / 2) * span / bytes;
            from = end.saturating_sub(fit.min(RESTORE_OFFSETS));
            found = read(from);
        }
    }
    let Some(batches) = found else {
        tracing::debug!(
            stream,
            partition,
            "idempotent producers' state not rebuilt: the partition's tail is too large"
        );
        return;
    };
    let mut producers = kafka.producers.lock();
    let fresh = |producers: &crate::producers::Producers<_>, pid| !producers.knows(at, pid);
    let mut restorable: std::collections::HashMap<i64, bool> = std::collections::HashMap::new();
    for batch in batches {
        let Ok(header) = tidewater_storage::format::kafka::check_kafka_batch(&batch.kafka) else {
            continue;
        };
        if header.producer_id < 0
            || !*restorable
                .entry(header.producer_id)
                .or_insert_with(|| fresh(&producers, header.producer_id))
        {
            continue;
        }
        let append_time = if header.is_log_append_time() {
            header.max_timestamp
        } else {
            -1
        };
        let (_, rx) = watch::channel(Some(Ok((batch.base_offset as i64, append_time))));
        producers.restore(at, &header, rx);
    }
}

/// Waits for a partition's batches: the first one's offset (and append time), or the first
/// error.
async fn finish(kafka: &Kafka, waits: Vec<Wait>) -> Result<(i64, i64), (i16, String)> {
    let mut first: Option<(i64, i64)> = None;
    let mut failed: Option<(i16, String)> = None;
    for wait in waits {
        let landed: Landed = match wait {
            Wait::Append {
                appending,
                tell,
                code,
            } => {
                let landed = appending
                    .await
                    .map(|(base, _, append_time)| (base as i64, append_time.unwrap_or(-1)))
                    .map_err(|err| {
                        (
                            code.unwrap_or_else(|| crate::errors::code(&err)),
                            err.message,
                        )
                    });
                if let Some((tx, at, pid, first)) = tell {
                    if landed.is_err() {
                        // A write that failed in storage (the store refuses every write
                        // after it): its retry is taken as new.
                        kafka.producers.lock().rollback(at, pid, first);
                    }
                    let _ = tx.send(Some(landed.clone()));
                }
                landed
            }
            Wait::Duplicate(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(landed) => landed.clone().expect("waited for Some"),
                Err(_) => Err((
                    ResponseError::RequestTimedOut.code(),
                    "the first copy of this batch was not answered; send it again".into(),
                )),
            },
        };
        match landed {
            Ok(at) => {
                first.get_or_insert(at);
            }
            Err(err) => {
                failed.get_or_insert(err);
            }
        }
    }
    match (failed, first) {
        (Some(err), _) => Err(err),
        (None, Some(at)) => Ok(at),
        (None, None) => Err((
            ResponseError::CorruptMessage.code(),
            "no record batch".into(),
        )),
    }
}

/// InitProducerId for idempotent producers: a new producer id, or the same one with its
/// epoch bumped when the producer names its id and epoch (KIP-360, after an error).
/// Transactional ids are refused: tidewater has no transactions.
pub(crate) fn init_producer_id(
    kafka: &Kafka,
    req: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let mut response = InitProducerIdResponse::default();
    if req.transactional_id.is_some() {
        response.error_code = ResponseError::TransactionalIdAuthorizationFailed.code();
        response.producer_id = ProducerId(-1);
        response.producer_epoch = -1;
        return response;
    }
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        response.producer_id = req.producer_id;
        response.producer_epoch = req.producer_epoch + 1;
    } else {
        response.producer_id = ProducerId(kafka.new_producer_id());
        response.producer_epoch = 0;
    }
    response
}
