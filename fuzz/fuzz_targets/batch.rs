//! Record batches and records (crates/format/src/lib.rs) as a segment file holds them:
//! batches back to back, walked as the open-time scan does (header, both CRCs, every
//! record), decoded as reads do (`decode_records`, `view_record`, `decode_record`).
//! Whatever decodes must re-encode (`Record::encode`, `BatchBuilder`) to bytes that decode
//! to the same records. First byte odd: the CRCs are repaired first (see src/lib.rs).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tidewater_format::{
    BATCH_HEADER_LEN, BatchBuilder, BatchHeader, FormatError, NewRecord, RECORD_FLAG_GENERATED_ID,
    Record, check_batch, decode_record, decode_records, has_client_ids, restamp_batch, stamp_batch,
    view_record, visit_records,
};
use tidewater_fuzz::{mode, repair_batches};
use tidewater_storage::state::RecentIds;

/// A record as it survives re-encoding: only the generated-id flag bit is kept.
fn normalized(record: &Record) -> Record {
    Record {
        flags: record.flags & RECORD_FLAG_GENERATED_ID,
        ..record.clone()
    }
}

fn check_records(header: &BatchHeader, body: &[u8]) {
    let mut records = Vec::new();
    let decoded = decode_records(header, body, &mut records);
    let mut views = Vec::new();
    let visited = visit_records::<FormatError>(header, body, |v| {
        views.push(v);
        Ok(())
    });
    assert_eq!(
        decoded.is_ok(),
        visited.is_ok(),
        "decode_records and visit_records disagree"
    );
    if decoded.is_err() {
        return;
    }
    assert_eq!(records.len(), header.count as usize);
    let mut at = 0;
    for (record, view) in records.iter().zip(&views) {
        assert_eq!(
            (
                record.offset,
                record.flags,
                record.deliver_at_ms,
                &record.id[..],
                &record.body[..]
            ),
            (
                view.offset,
                view.flags,
                view.deliver_at_ms,
                view.id,
                view.body
            )
        );
        assert_eq!(record.size(), view.size());
        assert_eq!(record.key.as_deref(), view.key);
        // Each record on its own, as a read and a delivery decode it.
        let len = record.encoded_len();
        let raw = &body[at..at + len];
        at += len;
        let one = view_record(raw, record.offset).expect("a record of a valid batch views");
        assert_eq!(one.body, view.body);
        let owned = decode_record(raw, record.offset, record.published_at_ms).expect("decodes");
        assert_eq!(&owned, record);
        let mut wire = Vec::new();
        record.encode(&mut wire);
        assert_eq!(wire.len(), len);
        assert_eq!(
            decode_record(&wire, record.offset, record.published_at_ms).as_ref(),
            Ok(&normalized(record)),
            "Record::encode does not round-trip"
        );
    }
    assert_eq!(at, body.len());

    // The whole batch rebuilt with the batch builder decodes to the same records.
    let mut builder = BatchBuilder::new(header.log_uid, header.published_at_ms);
    for r in &records {
        builder.push(&NewRecord {
            id: &r.id,
            generated_id: r.flags & RECORD_FLAG_GENERATED_ID != 0,
            key: r.key.as_deref(),
            headers: r.headers.iter().map(|(k, v)| (&k[..], &v[..])).collect(),
            deliver_at_ms: r.deliver_at_ms,
            body: &r.body,
        });
    }
    let mut rebuilt = builder.finish();
    stamp_batch(&mut rebuilt, header.base_offset);
    let again = check_batch(&rebuilt).expect("a rebuilt batch checks");
    assert_eq!(
        (
            again.log_uid,
            again.base_offset,
            again.count,
            again.body_len,
            again.published_at_ms
        ),
        (
            header.log_uid,
            header.base_offset,
            header.count,
            header.body_len,
            header.published_at_ms
        )
    );
    let mut records_again = Vec::new();
    decode_records(&again, &rebuilt[BATCH_HEADER_LEN..], &mut records_again).expect("decodes");
    let expected: Vec<Record> = records.iter().map(normalized).collect();
    assert_eq!(records_again, expected, "BatchBuilder does not round-trip");

    // Deduplication memory (journal replay and appends): the client-chosen ids, in order.
    let mut ids = RecentIds::default();
    ids.set_window(u64::MAX / 2, u32::MAX);
    ids.remember_batch(&rebuilt);
    let client: Vec<Bytes> = records
        .iter()
        .filter(|r| r.flags & RECORD_FLAG_GENERATED_ID == 0)
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(has_client_ids(&rebuilt), !client.is_empty());
    let remembered: Vec<Bytes> = ids
        .ids
        .iter()
        .map(|(_, id)| Bytes::copy_from_slice(id))
        .collect();
    assert_eq!(remembered, client);
}

fuzz_target!(|data: &[u8]| {
    let Some((repair, rest)) = mode(data) else {
        return;
    };
    let mut buf = rest.to_vec();
    if repair {
        repair_batches(&mut buf);
    }
    // A segment: batches back to back, walked as the open-time scan does.
    let mut at = 0;
    while at < buf.len() {
        let Ok(header) = BatchHeader::decode(&buf[at..]) else {
            break;
        };
        let Ok(checked) = check_batch(&buf[at..]) else {
            break;
        };
        assert_eq!(header, checked);
        let end = at + header.total_len();
        let body = &buf[at + BATCH_HEADER_LEN..end];
        check_records(&header, body);
        // What a produce does with the same bytes.
        let mut copy = buf[at..end].to_vec();
        let restamped = restamp_batch(&mut copy, 9, -1).expect("a checked batch restamps");
        assert_eq!(restamped, check_batch(&copy).expect("still checks"));
        at = end;
    }
    // A lone record, as a delivery carries it.
    let _ = view_record(&buf, 0);
    let _ = decode_record(&buf, u64::MAX, i64::MIN);
});
