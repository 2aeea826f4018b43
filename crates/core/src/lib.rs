//! tidewater's queues over the embedded storage engine.
//!
//! Architecture invariant: this crate knows nothing of HTTP. It speaks in `BrokerError`s
//! with stable `ErrorCode`s; the server maps them to statuses.

pub mod broker;
pub mod clock;
pub mod config;
pub mod error;
pub mod forecast;
pub mod harness;
pub mod hook;
pub mod offsets;
pub mod plan;
pub mod policy;
pub mod push;
pub mod queue;
pub mod receipt;
pub mod stream;

pub use broker::{
    Broker, BrokerOptions, Delay, Fetched, ForecastOptions, GroupInfo, HookInfo, Ingested,
    NackReason, NewMessage, Observer, PartitionInfo, Produced, PushHandle, PushInfo, QueueInfo,
    RedriveProgress, RedriveRequest, SettleReply, StreamInfo, Subject,
};
pub use config::{ConfigPatch, Limits, QueueConfig};
pub use error::{BrokerError, ErrorCode};
pub use tidewater_storage::AckLevel;
