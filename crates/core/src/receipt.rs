//! Receipts name one lease: the queue's log, the message's offset and a random nonce drawn
//! per delivery. A receipt from an earlier lease carries an old nonce and is refused as
//! stale; damaged or foreign text fails its checksum and is refused as invalid.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const RECEIPT_VERSION: u8 = 1;
const RECEIPT_LEN: usize = 1 + 8 + 8 + 8 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub log_uid: u64,
    pub offset: u64,
    pub nonce: u64,
}

impl Receipt {
    pub fn encode(&self) -> String {
        let mut raw = [0u8; RECEIPT_LEN];
        raw[0] = RECEIPT_VERSION;
        raw[1..9].copy_from_slice(&self.log_uid.to_le_bytes());
        raw[9..17].copy_from_slice(&self.offset.to_le_bytes());
        raw[17..25].copy_from_slice(&self.nonce.to_le_bytes());
        let crc = checksum(&raw[..25]);
        raw[25..29].copy_from_slice(&crc.to_le_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(text: &str) -> Option<Receipt> {
        if text.len() > 64 {
            return None;
        }
        let mut raw = [0u8; 48];
        let n = URL_SAFE_NO_PAD.decode_slice(text, &mut raw).ok()?;
        if n != RECEIPT_LEN || raw[0] != RECEIPT_VERSION {
            return None;
        }
        if checksum(&raw[..25]).to_le_bytes() != raw[25..29] {
            return None;
        }
        Some(Receipt {
            log_uid: u64::from_le_bytes(raw[1..9].try_into().ok()?),
            offset: u64::from_le_bytes(raw[9..17].try_into().ok()?),
            nonce: u64::from_le_bytes(raw[17..25].try_into().ok()?),
        })
    }
}

/// A cheap integrity check (not a secret: the nonce is what makes leases unguessable).
fn checksum(bytes: &[u8]) -> u32 {
    // FNV-1a folded; avoids a CRC dependency in core for 25 bytes.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash ^ (hash >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip_and_reject_damage() {
        let receipt = Receipt {
            log_uid: 3,
            offset: 1 << 40,
            nonce: 0xdead_beef,
        };
        let text = receipt.encode();
        assert_eq!(Receipt::decode(&text), Some(receipt));
        let mut damaged = text.clone().into_bytes();
        damaged[10] = if damaged[10] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            Receipt::decode(std::str::from_utf8(&damaged).unwrap()),
            None
        );
        for junk in ["", "x", "!!!!", &"A".repeat(500), &text[..text.len() - 1]] {
            assert_eq!(Receipt::decode(junk), None);
        }
    }
}
