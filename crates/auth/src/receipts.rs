//! Receipts bound to the principal they were delivered to. With authentication on, the
//! listeners hand out `<receipt>.<mac>`, the MAC (HMAC-SHA-256, 64 bits) of the receipt and
//! the principal under a key of the process; settling checks it against the caller's
//! principal, so a receipt seen by someone else (in a log, a shared dead-letter tool) cannot
//! be acked, nacked or extended by them. An admin of the queue may settle any (`strip`).
//! The key lives as long as the process, as leases do: a restart makes every lease, and so
//! every receipt, stale anyway.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Bytes of MAC kept.
const MAC_BYTES: usize = 8;

pub struct ReceiptBinder {
    key: [u8; 32],
}

/// Why a presented receipt is not the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotYours {
    /// Not of the bound form (a raw receipt: refused with authentication on).
    Unbound,
    /// Bound to another principal (or altered).
    Foreign,
}

impl ReceiptBinder {
    pub fn new(key: [u8; 32]) -> ReceiptBinder {
        ReceiptBinder { key }
    }

    fn mac(&self, receipt: &str, principal: &str) -> [u8; MAC_BYTES] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(receipt.as_bytes());
        mac.update(&[0]);
        mac.update(principal.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    /// The receipt as handed to `principal`.
    pub fn bind(&self, receipt: &str, principal: &str) -> String {
        let mac = URL_SAFE_NO_PAD.encode(self.mac(receipt, principal));
        format!("{receipt}.{mac}")
    }

    /// The receipt inside `bound`, if it was handed to `principal`.
    pub fn check<'a>(&self, bound: &'a str, principal: &str) -> Result<&'a str, NotYours> {
        let (receipt, mac) = bound.rsplit_once('.').ok_or(NotYours::Unbound)?;
        let mut given = [0u8; MAC_BYTES];
        match URL_SAFE_NO_PAD.decode_slice(mac, &mut given) {
            Ok(MAC_BYTES) => {}
            _ => return Err(NotYours::Foreign),
        }
        if bool::from(given.ct_eq(&self.mac(receipt, principal))) {
            Ok(receipt)
        } else {
            Err(NotYours::Foreign)
        }
    }

    /// The receipt inside `bound`, whoever it was handed to (an admin settling).
    pub fn strip(bound: &str) -> &str {
        bound.rsplit_once('.').map_or(bound, |(receipt, _)| receipt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_is_its_principals_only() {
        let binder = ReceiptBinder::new([7; 32]);
        let bound = binder.bind("AQID", "alice");
        assert_eq!(binder.check(&bound, "alice"), Ok("AQID"));
        assert_eq!(binder.check(&bound, "bob"), Err(NotYours::Foreign));
        assert_eq!(binder.check("AQID", "alice"), Err(NotYours::Unbound));
        let mut altered = bound.clone();
        altered.replace_range(0..1, "B");
        assert_eq!(binder.check(&altered, "alice"), Err(NotYours::Foreign));
        assert_eq!(ReceiptBinder::strip(&bound), "AQID");
        // Another process (a restart) does not take it.
        assert!(ReceiptBinder::new([8; 32]).check(&bound, "alice").is_err());
    }
}
