//! Streams: named sets of partitions, each an append-only log of Kafka record batches
//! (`tidewater_format::kafka`), read by consumer groups that commit offsets. Being built
//! (issue 10); what exists so far:
//!
//! - `partition`: which partition a record goes to, as Kafka's default partitioner decides
//!   (murmur2 of the key), so Kafka clients and tidewater agree.

pub mod classic;
pub mod compaction;
pub mod config;
pub mod group;
pub mod partition;
pub mod records;
pub mod retention;
pub mod source;
pub mod subscription;
