//! Journal entries (crates/storage/src/journal.rs), decoded one after another as recovery
//! replays a journal file, and applied to per-log state as replay does (settles, retries,
//! id windows, data batches; files aside). Every decoded entry must re-encode to the very
//! bytes it came from (an error text is cut to MAX_ERROR_LEN, as the writer cuts it), and
//! the replayed state must survive a checkpoint round trip. First byte odd: the CRCs
//! (entries', and the batches' inside Data entries) are repaired first.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tidewater_format::BatchHeader;
use tidewater_fuzz::{mode, repair_journal};
use tidewater_storage::LogState;
use tidewater_storage::fuzzing::{decode_checkpoint, encode_checkpoint};
use tidewater_storage::journal::{Entry, MAX_ERROR_LEN, decode_entry, encode_entry};

fn replay(states: &mut BTreeMap<u64, LogState>, entry: &Entry<'_>) {
    match *entry {
        Entry::CreateLog { uid, name, config } => {
            states.insert(uid, LogState::new(uid, name.into(), config.into()));
        }
        Entry::UpdateConfig { uid, config } => {
            if let Some(s) = states.get_mut(&uid) {
                s.config = config.into();
            }
        }
        Entry::CreateView {
            uid,
            name,
            source,
            floor,
        } => {
            // As replay: a view of an existing log that is not a view (never of itself).
            let Some(src) = states.get(&source).filter(|s| s.source.is_none()) else {
                return;
            };
            if uid == source || uid == 0 {
                return;
            }
            let mut view = LogState::new(uid, name.into(), String::new());
            view.source = Some(source);
            view.next_offset = src.next_offset;
            view.ack_floor = floor.clamp(src.ack_floor.min(src.next_offset), src.next_offset);
            states.insert(uid, view);
        }
        Entry::DeleteLog { uid } => {
            states.remove(&uid);
        }
        Entry::IdWindow {
            uid,
            window_ms,
            max,
        } => {
            if let Some(s) = states.get_mut(&uid) {
                s.recent_ids.set_window(window_ms, max);
            }
        }
        Entry::Data { batch } => {
            let header = BatchHeader::decode(batch).expect("a Data entry holds a checked batch");
            if let Some(s) = states.get_mut(&header.log_uid)
                && header.base_offset == s.next_offset
            {
                // A batch's count is not checked against its records on replay, so a few
                // (CRC-valid) entries can claim 2^40 offsets, and settling them fills the
                // settled set 4,096 offsets at a time: by design, and too slow to fuzz.
                if let Some(end) = s
                    .next_offset
                    .checked_add(header.count as u64)
                    .filter(|&end| end <= 1 << 24)
                {
                    s.next_offset = end;
                    s.recent_ids.remember_batch(batch);
                }
            }
        }
        Entry::Settle { uid, ref ranges } => {
            if let Some(s) = states.get_mut(&uid) {
                s.settle(ranges);
            }
        }
        Entry::Retry {
            uid,
            offset,
            deliver_at_ms,
            delivery_count,
            at_ms,
            error,
        } => {
            if let Some(s) = states.get_mut(&uid) {
                s.record_retry(offset, deliver_at_ms, delivery_count, at_ms, error);
            }
        }
        // A group header alone (as `decode_entry` returns it): its framing is replayed by
        // `decode_unit`, checked in the storage crate's unit tests.
        Entry::Group { .. } => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((repair, rest)) = mode(data) else {
        return;
    };
    let mut buf = rest.to_vec();
    if repair {
        repair_journal(&mut buf);
    }
    let mut states = BTreeMap::new();
    let mut pos = 0;
    while pos < buf.len() {
        let Ok((entry, len)) = decode_entry(&buf[pos..]) else {
            break;
        };
        assert!(len > 8 && len <= buf.len() - pos);
        let mut again = Vec::new();
        encode_entry(&mut again, &entry);
        match &entry {
            Entry::Retry { error, .. } if error.len() > MAX_ERROR_LEN => {
                // The writer never writes a longer text; re-encoding cuts it.
                let (cut, _) = decode_entry(&again).expect("re-encoded entry decodes");
                let Entry::Retry { error: short, .. } = cut else {
                    panic!("kind changed")
                };
                assert!(error.starts_with(short) && short.len() <= MAX_ERROR_LEN);
            }
            _ => assert_eq!(
                again,
                &buf[pos..pos + len],
                "entry does not re-encode to its bytes"
            ),
        }
        replay(&mut states, &entry);
        pos += len;
    }
    // The replayed state as the next checkpoint writes it.
    let logs: Vec<&LogState> = states.values().collect();
    let bytes = encode_checkpoint(7, &logs);
    let (next_uid, decoded) = decode_checkpoint(&bytes).expect("a written checkpoint decodes");
    assert_eq!(next_uid, 7);
    assert_eq!(decoded.iter().collect::<Vec<_>>(), logs);
});
