//! Record batches as publishes need them: what a batch holds, and copies of part of it.

use std::borrow::Cow;
use std::collections::HashMap;

use tidewater_storage::format::RECORD_FLAG_GENERATED_ID;
use tidewater_storage::{BatchBuilder, FormatError, NewRecord};

use super::message::{
    Delay, NewMessage, check_message, check_tenant, check_ttl, hex, new_message_id,
};
use crate::config::Limits;
use crate::error::{BrokerError, ErrorCode};
use crate::queue::{ANONYMOUS_TENANT, HEADER_PRIORITY, HEADER_TENANT, HEADER_TTL_MS};
use tidewater_storage::format::MAX_BATCH_BODY;

/// What scanning a client-built batch found.
#[derive(Default)]
pub(crate) struct BatchScan {
    pub(crate) bytes: u64,
    pub(crate) delays: Vec<(u32, i64)>,
    pub(crate) demand: Demand,
    /// (index, id) of the records with a client-chosen id.
    pub(crate) client_ids: Vec<(usize, Vec<u8>)>,
    /// (index, key, bytes) of keyed records, on supersede queues.
    pub(crate) keyed: Vec<(u32, Vec<u8>, u64)>,
}

/// `n` flags, set at `indexes`.
pub(crate) fn marks(n: usize, indexes: &[usize]) -> Vec<bool> {
    let mut out = vec![false; n];
    for &idx in indexes {
        out[idx] = true;
    }
    out
}

/// The records of `batch` marked in `take`, as a batch for the delay log `uid`.
pub(crate) fn parked_part(
    header: &tidewater_storage::format::BatchHeader,
    batch: &[u8],
    take: &[bool],
    uid: u64,
    now: i64,
) -> ParkedPart {
    let mut part = ParkedPart {
        uid,
        batch: select(header, batch, take, uid, now),
        entries: Vec::new(),
        n: 0,
        bytes: 0,
    };
    let body = &batch[tidewater_storage::format::BATCH_HEADER_LEN..];
    let mut idx = 0;
    let _ = tidewater_storage::format::visit_records::<FormatError>(header, body, |record| {
        if take[idx] {
            let size = record.size();
            part.entries
                .push((part.n as u32, record.deliver_at_ms, size));
            part.n += 1;
            part.bytes += size;
        }
        idx += 1;
        Ok(())
    });
    part
}

/// A copy of `batch` without the records marked in `skip` (already checked).
pub(crate) fn without(
    header: &tidewater_storage::format::BatchHeader,
    batch: &[u8],
    skip: &[bool],
    now: i64,
) -> Vec<u8> {
    let keep: Vec<bool> = skip.iter().map(|s| !s).collect();
    select(header, batch, &keep, header.log_uid, now)
}

/// The records of `batch` marked in `keep` (already checked), as a batch for log `uid`.
pub(crate) fn select(
    header: &tidewater_storage::format::BatchHeader,
    batch: &[u8],
    keep: &[bool],
    uid: u64,
    now: i64,
) -> Vec<u8> {
    let mut builder = BatchBuilder::new(uid, now);
    let body = &batch[tidewater_storage::format::BATCH_HEADER_LEN..];
    let mut idx = 0;
    let _ = tidewater_storage::format::visit_records::<FormatError>(header, body, |record| {
        if keep[idx] {
            builder.push(&NewRecord {
                id: record.id,
                generated_id: record.flags & RECORD_FLAG_GENERATED_ID != 0,
                key: record.key,
                headers: record.headers().collect(),
                deliver_at_ms: record.deliver_at_ms,
                body: record.body,
            });
        }
        idx += 1;
        Ok(())
    });
    builder.finish()
}

/// The batch with `tenant` as the tenant of each record that names none (the principal's,
/// with authentication on), or None when every record names one already.
pub(crate) fn with_tenant(
    header: &tidewater_storage::format::BatchHeader,
    batch: &[u8],
    tenant: &str,
    now: i64,
) -> Option<Vec<u8>> {
    let body = &batch[tidewater_storage::format::BATCH_HEADER_LEN..];
    let mut missing = false;
    let _ = tidewater_storage::format::visit_records::<FormatError>(header, body, |record| {
        missing |= !record.headers().any(|(k, _)| k == HEADER_TENANT.as_bytes());
        Ok(())
    });
    if !missing {
        return None;
    }
    let mut builder = BatchBuilder::new(header.log_uid, now);
    let _ = tidewater_storage::format::visit_records::<FormatError>(header, body, |record| {
        let mut headers: Vec<(&[u8], &[u8])> = record.headers().collect();
        if !headers.iter().any(|(k, _)| *k == HEADER_TENANT.as_bytes()) {
            headers.push((HEADER_TENANT.as_bytes(), tenant.as_bytes()));
        }
        builder.push(&NewRecord {
            id: record.id,
            generated_id: record.flags & RECORD_FLAG_GENERATED_ID != 0,
            key: record.key,
            headers,
            deliver_at_ms: record.deliver_at_ms,
            body: record.body,
        });
        Ok(())
    });
    Some(builder.finish())
}

/// The part of a publish that goes to the queue's delay log.
pub(crate) struct ParkedPart {
    pub(crate) uid: u64,
    pub(crate) batch: Vec<u8>,
    /// (index in that batch, due time, bytes)
    pub(crate) entries: Vec<(u32, i64, u64)>,
    pub(crate) n: u64,
    pub(crate) bytes: u64,
}

/// Messages and bytes per tenant of one publish, for quotas (empty when the queue has none).
#[derive(Default)]
pub(crate) struct Demand(HashMap<String, (u64, u64)>);

impl Demand {
    pub(crate) fn add(&mut self, tenant: Option<&[u8]>, bytes: u64) {
        let tenant = tenant.map_or(Cow::Borrowed(ANONYMOUS_TENANT), String::from_utf8_lossy);
        let entry = match self.0.get_mut(tenant.as_ref()) {
            Some(entry) => entry,
            None => self.0.entry(tenant.into_owned()).or_default(),
        };
        entry.0 += 1;
        entry.1 += bytes;
    }

    pub(crate) fn as_slice(&self) -> Vec<(&str, u64, u64)> {
        self.0
            .iter()
            .map(|(t, &(m, b))| (t.as_str(), m, b))
            .collect()
    }
}

/// Checks every record of a client-built batch against the limits, and gathers what
/// admission needs (sizes, delays, quota demand, client-chosen ids when deduplicating).
pub(crate) fn scan_batch(
    limits: &Limits,
    header: &tidewater_storage::format::BatchHeader,
    batch: &[u8],
    with_quota: bool,
    with_supersede: bool,
    now: i64,
) -> Result<BatchScan, BrokerError> {
    let mut scan = BatchScan::default();
    let BatchScan {
        bytes,
        delays,
        demand,
        client_ids,
        keyed,
    } = &mut scan;
    let body = &batch[tidewater_storage::format::BATCH_HEADER_LEN..];
    let mut idx = 0;
    tidewater_storage::format::visit_records(header, body, |record| {
        let delay = if record.deliver_at_ms > 0 {
            Delay::AtMs(record.deliver_at_ms)
        } else {
            Delay::None
        };
        let mut headers = Vec::new();
        let mut tenant = None;
        for (name, value) in record.headers() {
            if name == HEADER_TTL_MS.as_bytes() {
                check_ttl(idx, value)?;
            } else if name == HEADER_TENANT.as_bytes() {
                check_tenant(idx, value)?;
                tenant = Some(value);
            } else if name == HEADER_PRIORITY.as_bytes()
                && std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u8>().ok())
                    .is_none()
            {
                return Err(BrokerError::new(
                    ErrorCode::InvalidMessage,
                    format!("message {idx}: {HEADER_PRIORITY} must be a number 0..=255"),
                ));
            }
            headers.push((name.len(), value.len()));
        }
        if with_quota {
            demand.add(tenant, record.size());
        }
        let at = check_message(
            limits,
            idx,
            record.body.len(),
            Some(record.id.len()),
            record.key.map(<[u8]>::len),
            headers.into_iter(),
            delay,
            now,
        )?;
        if let Some(at) = at {
            delays.push((idx as u32, at));
        }
        if record.flags & RECORD_FLAG_GENERATED_ID == 0 {
            client_ids.push((idx, record.id.to_vec()));
        }
        if with_supersede && let Some(key) = record.key {
            keyed.push((idx as u32, key.to_vec(), record.size()));
        }
        *bytes += record.size();
        idx += 1;
        Ok::<(), BrokerError>(())
    })?;
    Ok(scan)
}

/// What shapes the batches of a JSON publish.
pub(crate) struct PublishShape<'a> {
    /// The queue's log, and its delay log when it has one.
    pub uid: u64,
    pub delay_uid: Option<u64>,
    /// Messages due at or after this wait in the delay log.
    pub park_from: i64,
    /// Per message: a duplicate (acknowledged, not enqueued), and its due time if delayed.
    pub duplicates: &'a [bool],
    pub deliver_ats: &'a [Option<i64>],
    pub with_quota: bool,
    pub with_supersede: bool,
}

/// The batches of a JSON publish and what admission needs of them.
pub(crate) struct Batches {
    /// Every message's id (client-chosen, or generated), and the indexes of duplicates.
    pub ids: Vec<String>,
    pub duplicates: Vec<usize>,
    /// The main log's batch (`None` when every message is parked or a duplicate).
    pub main: Option<Vec<u8>>,
    pub n: u64,
    pub bytes: u64,
    /// (index in `main`, due time) of delayed messages.
    pub delays: Vec<(u32, i64)>,
    pub demand: Demand,
    /// (index in `main`, key, bytes) of keyed messages, on supersede or coalesce queues.
    pub keyed: Vec<(u32, Vec<u8>, u64)>,
    pub parked: Option<ParkedPart>,
}

/// Builds the records of a JSON publish (checked before): the main log's batch, the delay
/// log's part, ids, and the reserved headers (tenant, ttl, priority) set from the message's
/// fields, never from its own headers.
pub(crate) fn build_publish(
    messages: &[NewMessage],
    shape: &PublishShape<'_>,
    now: i64,
) -> Result<Batches, BrokerError> {
    let mut keyed = Vec::new();
    let mut demand = Demand::default();
    let mut builder = BatchBuilder::new(shape.uid, now);
    let mut parked = shape.delay_uid.map(|uid| ParkedPart {
        uid,
        batch: Vec::new(),
        entries: Vec::new(),
        n: 0,
        bytes: 0,
    });
    let mut parked_builder = shape.delay_uid.map(|uid| BatchBuilder::new(uid, now));
    let mut ids = Vec::with_capacity(messages.len());
    let mut duplicates = Vec::new();
    let mut delays = Vec::new();
    let mut bytes = 0u64;
    let mut n = 0u64;
    for (idx, msg) in messages.iter().enumerate() {
        if shape.duplicates[idx] {
            ids.push(msg.id.clone().expect("only client ids are duplicates"));
            duplicates.push(idx);
            continue;
        }
        let deliver_at = shape.deliver_ats[idx];
        // A long delay waits in the delay log, not in the main log.
        let park = parked.is_some() && deliver_at.is_some_and(|at| at >= shape.park_from);
        if !park {
            if let Some(at) = deliver_at {
                delays.push((n as u32, at));
            }
            n += 1;
        }
        let ttl = msg.ttl_ms.map(|ttl| ttl.to_string());
        let priority = msg.priority.map(|p| p.to_string());
        let headers: Vec<(&[u8], &[u8])> = msg
            .headers
            .iter()
            .filter(|(k, _)| k != HEADER_TENANT && k != HEADER_TTL_MS && k != HEADER_PRIORITY)
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .chain(
                ttl.as_ref()
                    .map(|v| (HEADER_TTL_MS.as_bytes(), v.as_bytes())),
            )
            .chain(
                msg.tenant
                    .as_ref()
                    .map(|t| (HEADER_TENANT.as_bytes(), t.as_bytes())),
            )
            .chain(
                priority
                    .as_ref()
                    .map(|p| (HEADER_PRIORITY.as_bytes(), p.as_bytes())),
            )
            .collect();
        let generated;
        let (id, is_generated): (&[u8], bool) = match &msg.id {
            Some(id) => {
                ids.push(id.clone());
                (id.as_bytes(), false)
            }
            None => {
                generated = new_message_id(now);
                ids.push(hex(&generated));
                (&generated, true)
            }
        };
        let record = NewRecord {
            id,
            generated_id: is_generated,
            key: msg.key.as_deref().map(str::as_bytes),
            headers,
            deliver_at_ms: deliver_at.unwrap_or(0),
            body: &msg.body,
        };
        let size = (msg.body.len()
            + msg.key.as_ref().map_or(0, |k| k.len())
            + record
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()) as u64;
        if shape.with_quota {
            demand.add(msg.tenant.as_deref().map(str::as_bytes), size);
        }
        if let (true, Some(part), Some(parked_builder)) =
            (park, parked.as_mut(), parked_builder.as_mut())
        {
            part.entries
                .push((part.n as u32, deliver_at.unwrap_or(now), size));
            part.n += 1;
            part.bytes += size;
            parked_builder.push(&record);
            continue;
        }
        bytes += size;
        if shape.with_supersede
            && let Some(key) = &msg.key
        {
            keyed.push((n as u32 - 1, key.as_bytes().to_vec(), size));
        }
        builder.push(&record);
        if builder.encoded_len() > MAX_BATCH_BODY {
            return Err(BrokerError::new(
                ErrorCode::RequestTooLarge,
                "the batch exceeds 256 MiB once encoded",
            ));
        }
    }
    let parked = match (parked, parked_builder) {
        (Some(mut part), Some(parked_builder)) if part.n > 0 => {
            part.batch = parked_builder.finish();
            Some(part)
        }
        _ => None,
    };
    Ok(Batches {
        ids,
        duplicates,
        main: (n > 0).then(|| builder.finish()),
        n,
        bytes,
        delays,
        demand,
        keyed,
        parked,
    })
}
