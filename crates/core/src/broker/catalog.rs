//! A catalog: named entries (API keys, grants, webhook hooks) durable as records of one of
//! the broker's own logs, as committed offsets are in `#offsets`. An entry is one record
//! (its id as the record's id, its JSON as the body); replacing it appends the new record
//! and settles the old one in the same write; removing it settles its record. So the log's
//! unsettled records are exactly the entries in force, recovery reads them back, and the
//! settled ones go with their segments. What the entries mean is the caller's.

use std::collections::HashMap;

use bytes::Bytes;
use tidewater_storage::{
    AckLevel, BatchBuilder, LogReader, NewRecord, Op, OpResult, RecoveredLog, Store,
};

use super::Broker;
use crate::error::{BrokerError, ErrorCode};

pub(crate) struct Catalog {
    /// The log's name (`#auth`, `#hooks`): one no queue or stream can have.
    name: &'static str,
    /// Made at the first entry.
    log: Option<(u64, LogReader)>,
    /// Entry id -> the offset of its record.
    records: HashMap<String, u64>,
    /// Records an entry's later record replaced without settling them (a crash between
    /// the two): settled with the next write.
    stale: Vec<u64>,
}

/// An entry read back at recovery.
pub(crate) struct Entry {
    pub id: String,
    pub body: Bytes,
}

impl Catalog {
    /// Reads the entries in force back from the log (oldest first; an id's later record
    /// replaces its earlier one).
    pub(crate) fn recover(
        name: &'static str,
        store: &Store,
        log: Option<RecoveredLog>,
    ) -> Result<(Catalog, Vec<Entry>), String> {
        let mut catalog = Catalog {
            name,
            log: None,
            records: HashMap::new(),
            stale: Vec::new(),
        };
        let mut entries: Vec<Entry> = Vec::new();
        let Some(log) = log else {
            return Ok((catalog, entries));
        };
        let reader = store.reader(log.uid).expect("a recovered log has a reader");
        let mut from = log.ack_floor;
        while from < log.next_offset {
            let batch = reader
                .read(from, 10_000, 16 << 20)
                .map_err(|e| format!("the {name} log: {e}"))?;
            let Some(last) = batch.last().map(|r| r.offset) else {
                break;
            };
            for record in batch {
                if log.settled.contains(record.offset) {
                    continue;
                }
                let id = String::from_utf8(record.id.to_vec()).map_err(|_| {
                    format!("the {name} log: the record at {} has no id", record.offset)
                })?;
                if let Some(earlier) = catalog.records.insert(id.clone(), record.offset) {
                    catalog.stale.push(earlier);
                    entries.retain(|e| e.id != id);
                }
                entries.push(Entry {
                    id,
                    body: record.body,
                });
            }
            from = last + 1;
        }
        catalog.log = Some((log.uid, reader));
        Ok((catalog, entries))
    }

    /// The entries read back at recovery whose ids are `<prefix><name>`, as `T`s by name;
    /// an entry of another id, or one that does not decode, is an error naming it.
    pub(crate) fn decode<T: serde::de::DeserializeOwned>(
        &self,
        entries: Vec<Entry>,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, String> {
        let log = self.name;
        entries
            .into_iter()
            .map(|entry| {
                let name = entry.id.strip_prefix(prefix).ok_or_else(|| {
                    format!("the {log} log: an entry has an unknown id '{}'", entry.id)
                })?;
                let value = serde_json::from_slice(&entry.body)
                    .map_err(|e| format!("the {log} log: entry {}: {e}", entry.id))?;
                Ok((name.to_string(), value))
            })
            .collect()
    }

    /// Whether the log exists (an entry was ever made, even if all were removed since).
    pub(crate) fn ever_used(&self) -> bool {
        self.log.is_some()
    }
}

impl Broker {
    /// Puts an entry, durably: appends its record and settles the one it replaces.
    pub(super) async fn catalog_put(
        &self,
        catalog: &mut Catalog,
        id: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let uid = self.catalog_log(catalog).await?;
        let mut builder = BatchBuilder::new(uid, self.now_ms());
        builder.push(&NewRecord {
            id: id.as_bytes(),
            body,
            ..NewRecord::default()
        });
        let mut ops = vec![Op::Append {
            uid,
            batch: builder.finish(),
        }];
        let replaced: Vec<u64> = catalog
            .records
            .get(id)
            .copied()
            .into_iter()
            .chain(catalog.stale.iter().copied())
            .collect();
        if !replaced.is_empty() {
            ops.push(Op::Settle {
                uid,
                ranges: replaced.iter().map(|&o| o..o + 1).collect(),
            });
        }
        let results = self.write(ops, AckLevel::Durable).await?;
        let Some(&OpResult::Appended { base_offset, .. }) = results.first() else {
            return Err(BrokerError::new(
                ErrorCode::Internal,
                format!(
                    "storage did not answer the offset of {id} in {}",
                    catalog.name
                ),
            ));
        };
        catalog.stale.clear();
        catalog.records.insert(id.to_string(), base_offset);
        Ok(())
    }

    /// Removes an entry, durably (settles its record). Removing one not there is an
    /// internal error: callers check first.
    pub(super) async fn catalog_remove(
        &self,
        catalog: &mut Catalog,
        id: &str,
    ) -> Result<(), BrokerError> {
        let (Some(&offset), Some((uid, _))) = (catalog.records.get(id), &catalog.log) else {
            return Err(BrokerError::new(
                ErrorCode::Internal,
                format!("the {} log has no record '{id}'", catalog.name),
            ));
        };
        let ranges = std::iter::once(offset)
            .chain(catalog.stale.iter().copied())
            .map(|o| o..o + 1)
            .collect();
        self.write(vec![Op::Settle { uid: *uid, ranges }], AckLevel::Durable)
            .await?;
        catalog.stale.clear();
        catalog.records.remove(id);
        Ok(())
    }

    async fn catalog_log(&self, catalog: &mut Catalog) -> Result<u64, BrokerError> {
        if let Some((uid, _)) = &catalog.log {
            return Ok(*uid);
        }
        let (uid, reader) = self.create_internal_log(catalog.name).await?;
        catalog.log = Some((uid, reader));
        Ok(uid)
    }
}
