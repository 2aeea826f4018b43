//! Receipts (crates/core/src/receipt.rs): any text a client sends as a receipt. A receipt
//! that decodes re-encodes to the same text; any receipt encodes to text that decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewater_core::receipt::Receipt;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(receipt) = Receipt::decode(&text) {
        assert_eq!(receipt.encode(), text, "a receipt decoded from other text");
    }
    if data.len() >= 24 {
        let n = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
        let receipt = Receipt {
            log_uid: n(0),
            offset: n(8),
            nonce: n(16),
        };
        assert_eq!(Receipt::decode(&receipt.encode()), Some(receipt));
    }
});
