//! Checkpoint files (crates/storage/src/store.rs, state.rs), decoded as recovery loads
//! them. Whatever decodes must re-encode to a checkpoint that decodes to the same state.
//! First byte odd: magic, length and CRC are repaired first, so the payload is explored.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewater_fuzz::{checkpoint_max_span, mode, repair_checkpoint};
use tidewater_storage::LogState;
use tidewater_storage::fuzzing::{decode_checkpoint, encode_checkpoint};

fuzz_target!(|data: &[u8]| {
    let Some((repair, rest)) = mode(data) else {
        return;
    };
    let mut buf = rest.to_vec();
    if repair {
        repair_checkpoint(&mut buf);
    }
    // Valid but slow by design (see checkpoint_max_span); 2^24 offsets are 4,096 chunks.
    if checkpoint_max_span(&buf) > 1 << 24 {
        return;
    }
    let Ok((next_uid, logs)) = decode_checkpoint(&buf) else {
        return;
    };
    let refs: Vec<&LogState> = logs.iter().collect();
    let bytes = encode_checkpoint(next_uid, &refs);
    let (uid_again, logs_again) = decode_checkpoint(&bytes).expect("a written checkpoint decodes");
    assert_eq!(
        (uid_again, &logs_again),
        (next_uid, &logs),
        "checkpoint does not round-trip"
    );
});
