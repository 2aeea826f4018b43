//! tidewater's security model, without I/O: API keys (`keys`), Kafka's SCRAM exchange
//! (`scram`), grants and what they allow (`acl`), the keys and grants in force and the
//! questions asked of them (`state`), and the limit on failed attempts (`limiter`). The
//! broker keeps keys and grants durable; the listeners authenticate and ask `allows`.

pub mod acl;
pub mod guard;
pub mod jwt;
pub mod keys;
pub mod limiter;
pub mod receipts;
pub mod scram;
pub mod state;
pub mod webhook;

pub use acl::{Acl, AclSpec, Match, Operation, Resource, ResourceKind, Subject};
pub use guard::{Guard, Refused};
pub use keys::{ApiKey, KeyInfo, KeySpec};
pub use limiter::FailureLimiter;
pub use receipts::{NotYours, ReceiptBinder};
pub use state::{ANONYMOUS, AuthError, AuthState, Change, Identity};
