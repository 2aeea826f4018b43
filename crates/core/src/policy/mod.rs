//! Flow control, free of queues and I/O: producer quotas (`quota`), deduplication
//! (`dedup`), dispatch rates and adaptive throttling (`rate`), per-key concurrency
//! (`keys`), priorities and weighted fairness (`shaper`), coalescing windows (`coalesce`).
//! Time is passed in (ms since the epoch), so every rule is tested with exact figures; the
//! queue (`crate::queue`) applies them.

pub mod coalesce;
pub mod dedup;
pub mod keys;
pub mod quota;
pub mod rate;
pub mod shaper;

pub use dedup::DedupWindow;
pub use quota::{MAX_TENANT_LABELS, MAX_TRACKED_TENANTS, OverQuota, TenantQuotas, TokenBucket};
pub use rate::{Aimd, Gcra};
