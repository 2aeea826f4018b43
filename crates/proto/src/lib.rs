//! tidewater's binary protocol: frames and their codec (docs/protocol.md). No I/O.
//!
//! ```text
//! frame: len u32 (bytes after this field) | kind u8 | flags u8 (0) | request_id u32 | body
//! ```
//! Integers are little endian. Strings are UTF-8 with a length prefix (u8 for queue names
//! and receipts, u16 for codes, messages and error texts). Produce frames carry a record
//! batch in the on-disk format (docs/storage-format.md), appended by the broker unchanged
//! except for its header.

// A narrowing `as` cast silently cuts a length into a frame that decodes wrong: every
// narrowing is checked or proven (see `len_u32`).
#![deny(clippy::cast_possible_truncation)]

use std::fmt;

/// A length or count inside a frame. Frames are bounded by `max_frame_bytes`, itself a u32,
/// so this cannot fail for a frame that may be sent; a caller building a larger one is a bug.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("a frame cannot exceed 4 GiB (max_frame_bytes is a u32)")
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> &[u8] {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u16 = 1;
pub const HELLO_MAGIC: &[u8; 8] = b"TIDEWATR";
/// Bytes before the body: kind, flags, request id.
pub const FRAME_HEADER_LEN: usize = 6;
/// Subscription ids (assigned by the server) have this bit set; request ids (chosen by the
/// client) never do, so a server frame's id says which of the two it answers.
pub const SUBSCRIPTION_ID_BIT: u32 = 0x8000_0000;
/// Partitions (or streams, or offsets) one frame may list: Fetch, Heartbeat, Commit,
/// FetchCommitted and JoinGroup. A longer list is a malformed frame: decoding it would
/// make many small allocations out of one frame.
pub const MAX_LIST: usize = 10_000;
/// Default largest frame (after the length field) a peer accepts.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// How durable a produce must be before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Durable = 1,
    Written = 2,
}

/// A receipt failure inside `Settled`: which receipt (its index in the request) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub index: u32,
    pub code: String,
}

/// A delivered message: lease receipt, delivery count, and the record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireDelivery {
    pub receipt: String,
    pub delivery_count: u32,
    pub offset: u64,
    pub published_at_ms: i64,
    /// One record in the batch record layout (docs/storage-format.md), length prefix included.
    pub record: Vec<u8>,
}

/// The receipts of an Ack, Nack or Extend frame, held in one buffer: decoding a frame of
/// 5,000 receipts allocates twice, not 5,000 times (a `String` each was a tenth of the
/// server's CPU per message acked).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Receipts {
    text: String,
    /// End of each receipt in `text`.
    ends: Vec<u32>,
}

impl Receipts {
    fn with_capacity(count: usize, bytes: usize) -> Receipts {
        Receipts {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(count),
        }
    }

    pub fn push(&mut self, receipt: &str) {
        self.text.push_str(receipt);
        self.ends.push(len_u32(self.text.len()));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.ends.len()).map(|i| self.get(i).expect("in range"))
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p] as usize);
        Some(&self.text[start..end])
    }
}

impl<S: AsRef<str>> FromIterator<S> for Receipts {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Receipts {
        let mut receipts = Receipts::default();
        for r in iter {
            receipts.push(r.as_ref());
        }
        receipts
    }
}

impl From<Vec<String>> for Receipts {
    fn from(receipts: Vec<String>) -> Receipts {
        receipts.iter().collect()
    }
}

impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A partition of a stream, as frames name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamPartition {
    pub stream: String,
    pub partition: u32,
}

/// One partition a `Fetch` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartition {
    pub stream: String,
    pub partition: u32,
    pub offset: u64,
    /// At most this many bytes of this partition (at least one batch when one exists).
    pub max_bytes: u32,
}

/// One partition's answer inside `Fetched`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPartition {
    pub stream: String,
    pub partition: u32,
    /// Empty when the partition was read; else why not (an error code) and `message`.
    pub code: String,
    pub message: String,
    pub start_offset: u64,
    pub end_offset: u64,
    /// Whole Kafka v2 record batches as stored, back to back (the first may start before
    /// the offset asked for).
    pub records: Vec<u8>,
}

/// One offset inside `Commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOffset {
    pub stream: String,
    pub partition: u32,
    /// The next offset to consume.
    pub offset: u64,
    pub metadata: String,
}

/// One partition's committed offset inside `Committed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub stream: String,
    pub partition: u32,
    /// `None`: the group committed nothing for it.
    pub offset: Option<u64>,
    pub metadata: String,
}

/// A partition's range inside `StreamMetadata`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    pub start_offset: u64,
    pub end_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // client -> server
    /// `credentials`: an optional trailing `text`, the API key token `<key id>.<secret>`
    /// when the server has authentication on (empty: none; then not written at all).
    Hello {
        version: u16,
        client: String,
        credentials: String,
    },
    Produce {
        queue: String,
        ack: Ack,
        batch: Vec<u8>,
    },
    Subscribe {
        queue: String,
        lease_ms: u64,
        credit: u32,
    },
    Credit {
        subscription: u32,
        credit: u32,
    },
    Ack {
        queue: String,
        receipts: Receipts,
    },
    /// `delay_ms` < 0: the queue's backoff applies. `overloaded`: the consumer is
    /// overloaded (adaptive throttling slows dispatch); an optional trailing byte.
    Nack {
        queue: String,
        delay_ms: i64,
        error: String,
        receipts: Receipts,
        overloaded: bool,
    },
    Extend {
        queue: String,
        lease_ms: u64,
        receipts: Receipts,
    },
    Unsubscribe {
        subscription: u32,
    },
    Ping,
    /// Appends one Kafka v2 record batch (uncompressed, offset deltas 0, 1, 2, ...) to a
    /// partition of a stream. Answered by `Produced`.
    StreamProduce {
        stream: String,
        partition: u32,
        ack: Ack,
        batch: Vec<u8>,
    },
    /// Reads partitions from offsets, waiting up to `wait_ms` until one has records.
    /// Answered by `Fetched`.
    Fetch {
        wait_ms: u32,
        max_bytes: u32,
        partitions: Vec<FetchPartition>,
    },
    /// A partition's offset at a time: -2 its start, -1 its end, else the first record at
    /// or after the time (ms since the epoch). Answered by `Offset`.
    ListOffset {
        stream: String,
        partition: u32,
        at: i64,
    },
    /// Joins a consumer group for streams; `instance` (empty: none) names a static member.
    /// Answered by `Joined`.
    JoinGroup {
        group: String,
        instance: String,
        session_timeout_ms: u32,
        streams: Vec<String>,
    },
    /// A member's heartbeat with the partitions it consumes now. Answered by `Assignment`.
    Heartbeat {
        group: String,
        member: String,
        owned: Vec<StreamPartition>,
    },
    /// Answered by `Ok`.
    LeaveGroup {
        group: String,
        member: String,
    },
    /// Commits offsets for a group, all or none: by a member (only partitions it owns), or
    /// with an empty `member` by a consumer outside the group's membership. Answered by
    /// `Ok`.
    Commit {
        group: String,
        member: String,
        offsets: Vec<CommitOffset>,
    },
    /// A group's committed offsets for partitions. Answered by `Committed`.
    FetchCommitted {
        group: String,
        partitions: Vec<StreamPartition>,
    },
    /// A stream's partitions and their ranges. Answered by `StreamInfo`.
    StreamMetadata {
        stream: String,
    },
    // server -> client
    HelloOk {
        version: u16,
        max_frame: u32,
        server: String,
    },
    Produced {
        base_offset: u64,
        count: u32,
    },
    Subscribed {
        subscription: u32,
    },
    Deliver {
        deliveries: Vec<WireDelivery>,
    },
    Settled {
        ok: u32,
        failed: Vec<Failure>,
    },
    /// Refused by backpressure: nothing was done; retry after the wait.
    Throttle {
        retry_after_ms: u64,
        code: String,
        message: String,
    },
    Error {
        code: String,
        message: String,
    },
    Pong,
    Ok,
    Fetched {
        partitions: Vec<FetchedPartition>,
    },
    /// `None`: no record is that late.
    Offset {
        offset: Option<u64>,
    },
    Joined {
        member: String,
        /// How often to heartbeat (a third of the session timeout).
        heartbeat_ms: u32,
    },
    Assignment {
        generation: u64,
        /// What the member may consume now (it owns them from now on).
        assigned: Vec<StreamPartition>,
        /// What it must give up: commit, then leave them out of its next heartbeat.
        revoked: Vec<StreamPartition>,
    },
    Committed {
        offsets: Vec<CommittedOffset>,
    },
    StreamInfo {
        partitions: Vec<PartitionRange>,
    },
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const PRODUCE: u8 = 0x02;
    pub const SUBSCRIBE: u8 = 0x03;
    pub const CREDIT: u8 = 0x04;
    pub const ACK: u8 = 0x05;
    pub const NACK: u8 = 0x06;
    pub const EXTEND: u8 = 0x07;
    pub const UNSUBSCRIBE: u8 = 0x08;
    pub const PING: u8 = 0x09;
    pub const STREAM_PRODUCE: u8 = 0x0A;
    pub const FETCH: u8 = 0x0B;
    pub const LIST_OFFSET: u8 = 0x0C;
    pub const JOIN_GROUP: u8 = 0x0D;
    pub const HEARTBEAT: u8 = 0x0E;
    pub const LEAVE_GROUP: u8 = 0x0F;
    pub const COMMIT: u8 = 0x10;
    pub const FETCH_COMMITTED: u8 = 0x11;
    pub const STREAM_METADATA: u8 = 0x12;
    pub const HELLO_OK: u8 = 0x81;
    pub const PRODUCED: u8 = 0x82;
    pub const SUBSCRIBED: u8 = 0x83;
    pub const DELIVER: u8 = 0x84;
    pub const SETTLED: u8 = 0x85;
    pub const THROTTLE: u8 = 0x86;
    pub const ERROR: u8 = 0x87;
    pub const PONG: u8 = 0x88;
    pub const OK: u8 = 0x89;
    pub const FETCHED: u8 = 0x8A;
    pub const OFFSET: u8 = 0x8B;
    pub const JOINED: u8 = 0x8C;
    pub const ASSIGNMENT: u8 = 0x8D;
    pub const COMMITTED: u8 = 0x8E;
    pub const STREAM_INFO: u8 = 0x8F;
}

/// Why bytes are not a valid frame. Any of these closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    TooLarge {
        len: usize,
        max: usize,
    },
    UnknownKind(u8),
    /// The body does not match its kind's layout.
    Malformed(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max}")
            }
            ProtoError::UnknownKind(k) => write!(f, "unknown frame kind 0x{k:02x}"),
            ProtoError::Malformed(what) => write!(f, "malformed frame: {what}"),
        }
    }
}

impl std::error::Error for ProtoError {}

impl ProtoError {
    /// The code of the `Error` frame that closes the connection over this error.
    pub fn code(&self) -> FrameCode {
        match self {
            ProtoError::TooLarge { .. } => FrameCode::FrameTooLarge,
            ProtoError::UnknownKind(_) | ProtoError::Malformed(_) => FrameCode::InvalidFrame,
        }
    }
}

/// The error codes of the protocol itself: an `Error` frame with request id 0 carries one
/// before the server closes the connection (docs/protocol.md). The strings are stable and
/// documented with every other code in docs/errors.md; the broker's codes travel in the
/// same `code` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameCode {
    /// A malformed frame, an unknown kind, a server-only frame from a client, or a first
    /// frame that is not `Hello`.
    InvalidFrame,
    /// A frame longer than the limit (`max_frame_bytes`, 4 KiB before `Hello`).
    FrameTooLarge,
    /// A `Hello` with a version this side does not speak.
    UnsupportedVersion,
}

impl FrameCode {
    pub const ALL: &'static [FrameCode] = &[
        FrameCode::InvalidFrame,
        FrameCode::FrameTooLarge,
        FrameCode::UnsupportedVersion,
    ];

    /// The code as it travels in a frame's `code` field.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameCode::InvalidFrame => "invalid_frame",
            FrameCode::FrameTooLarge => "frame_too_large",
            FrameCode::UnsupportedVersion => "unsupported_version",
        }
    }

    /// What a person should do about it (for docs/errors.md).
    pub fn meaning(self) -> &'static str {
        match self {
            FrameCode::InvalidFrame => {
                "Binary protocol: the frame is malformed (docs/protocol.md). The server closes the connection after this error."
            }
            FrameCode::FrameTooLarge => {
                "Binary protocol: the frame exceeds max_frame_bytes. The server closes the connection after this error."
            }
            FrameCode::UnsupportedVersion => {
                "Binary protocol: the client speaks a protocol version this server does not. Upgrade the client or the server."
            }
        }
    }
}

impl fmt::Display for FrameCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// u8-prefixed string; longer input is cut at a character boundary (callers validate
    /// lengths first: queue names, receipts and codes are shorter).
    fn short(&mut self, s: &str) {
        let bytes = cut(s, usize::from(u8::MAX));
        self.u8(u8::try_from(bytes.len()).expect("cut to 255"));
        self.0.extend_from_slice(bytes);
    }
    /// u16-prefixed string; longer input (an error text) is cut at a character boundary.
    fn text(&mut self, s: &str) {
        let bytes = cut(s, usize::from(u16::MAX));
        self.u16(u16::try_from(bytes.len()).expect("cut to 65535"));
        self.0.extend_from_slice(bytes);
    }
    fn partitions(&mut self, partitions: &[StreamPartition]) {
        self.u32(len_u32(partitions.len()));
        for p in partitions {
            self.short(&p.stream);
            self.u32(p.partition);
        }
    }
    /// An offset that may be absent: -1 when it is.
    fn maybe(&mut self, offset: Option<u64>) {
        self.i64(offset.map_or(-1, |o| i64::try_from(o).unwrap_or(i64::MAX)));
    }
    fn receipts(&mut self, receipts: &Receipts) {
        self.u32(len_u32(receipts.len()));
        for r in receipts.iter() {
            self.short(r);
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, ProtoError>;

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(ProtoError::Malformed("truncated body"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    fn i64(&mut self) -> R<i64> {
        Ok(i64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    fn string(&mut self, n: usize) -> R<String> {
        String::from_utf8(self.bytes(n)?.to_vec())
            .map_err(|_| ProtoError::Malformed("invalid UTF-8"))
    }
    fn short(&mut self) -> R<String> {
        let n = self.u8()? as usize;
        self.string(n)
    }
    fn text(&mut self) -> R<String> {
        let n = self.u16()? as usize;
        self.string(n)
    }
    fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }
    /// A count that cannot claim more items than bytes remain (each item >= `min_item` bytes).
    fn count(&mut self, min_item: usize) -> R<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.len() - self.pos {
            return Err(ProtoError::Malformed("count larger than the frame"));
        }
        Ok(n)
    }
    /// A list's length: bounded by the bytes left and by `MAX_LIST`.
    fn list(&mut self, min_item: usize) -> R<usize> {
        let n = self.count(min_item)?;
        if n > MAX_LIST {
            return Err(ProtoError::Malformed(
                "a list of more than 10000 partitions, streams or offsets",
            ));
        }
        Ok(n)
    }
    fn partitions(&mut self) -> R<Vec<StreamPartition>> {
        let n = self.list(5)?;
        (0..n)
            .map(|_| {
                Ok(StreamPartition {
                    stream: self.short()?,
                    partition: self.u32()?,
                })
            })
            .collect()
    }
    fn maybe(&mut self) -> R<Option<u64>> {
        match self.i64()? {
            -1 => Ok(None),
            n => u64::try_from(n)
                .map(Some)
                .map_err(|_| ProtoError::Malformed("negative offset")),
        }
    }
    fn ack(&mut self) -> R<Ack> {
        match self.u8()? {
            1 => Ok(Ack::Durable),
            2 => Ok(Ack::Written),
            _ => Err(ProtoError::Malformed("unknown ack level")),
        }
    }
    fn receipts(&mut self) -> R<Receipts> {
        let n = self.count(1)?;
        let mut receipts = Receipts::with_capacity(n, self.buf.len() - self.pos);
        for _ in 0..n {
            let len = self.u8()? as usize;
            let text = std::str::from_utf8(self.bytes(len)?)
                .map_err(|_| ProtoError::Malformed("invalid UTF-8"))?;
            receipts.push(text);
        }
        Ok(receipts)
    }
    fn done(&self) -> R<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes"))
        }
    }
}

impl Frame {
    /// Appends the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, request_id: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut w = Writer(out);
        let kind = self.kind();
        w.u8(kind);
        w.u8(0);
        w.u32(request_id);
        match self {
            Frame::Hello {
                version,
                client,
                credentials,
            } => {
                w.0.extend_from_slice(HELLO_MAGIC);
                w.u16(*version);
                w.text(client);
                if !credentials.is_empty() {
                    w.text(credentials);
                }
            }
            Frame::Produce { queue, ack, batch } => {
                w.short(queue);
                w.u8(*ack as u8);
                w.0.extend_from_slice(batch);
            }
            Frame::Subscribe {
                queue,
                lease_ms,
                credit,
            } => {
                w.short(queue);
                w.u64(*lease_ms);
                w.u32(*credit);
            }
            Frame::Credit {
                subscription,
                credit,
            } => {
                w.u32(*subscription);
                w.u32(*credit);
            }
            Frame::Ack { queue, receipts } => {
                w.short(queue);
                w.receipts(receipts);
            }
            Frame::Nack {
                queue,
                delay_ms,
                error,
                receipts,
                overloaded,
            } => {
                w.short(queue);
                w.i64(*delay_ms);
                w.text(error);
                w.receipts(receipts);
                if *overloaded {
                    w.u8(NACK_OVERLOADED);
                }
            }
            Frame::Extend {
                queue,
                lease_ms,
                receipts,
            } => {
                w.short(queue);
                w.u64(*lease_ms);
                w.receipts(receipts);
            }
            Frame::Unsubscribe { subscription } => w.u32(*subscription),
            Frame::StreamProduce {
                stream,
                partition,
                ack,
                batch,
            } => {
                w.short(stream);
                w.u32(*partition);
                w.u8(*ack as u8);
                w.0.extend_from_slice(batch);
            }
            Frame::Fetch {
                wait_ms,
                max_bytes,
                partitions,
            } => {
                w.u32(*wait_ms);
                w.u32(*max_bytes);
                w.u32(len_u32(partitions.len()));
                for p in partitions {
                    w.short(&p.stream);
                    w.u32(p.partition);
                    w.u64(p.offset);
                    w.u32(p.max_bytes);
                }
            }
            Frame::ListOffset {
                stream,
                partition,
                at,
            } => {
                w.short(stream);
                w.u32(*partition);
                w.i64(*at);
            }
            Frame::JoinGroup {
                group,
                instance,
                session_timeout_ms,
                streams,
            } => {
                w.short(group);
                w.short(instance);
                w.u32(*session_timeout_ms);
                w.u32(len_u32(streams.len()));
                for stream in streams {
                    w.short(stream);
                }
            }
            Frame::Heartbeat {
                group,
                member,
                owned,
            } => {
                w.short(group);
                w.short(member);
                w.partitions(owned);
            }
            Frame::LeaveGroup { group, member } => {
                w.short(group);
                w.short(member);
            }
            Frame::Commit {
                group,
                member,
                offsets,
            } => {
                w.short(group);
                w.short(member);
                w.u32(len_u32(offsets.len()));
                for o in offsets {
                    w.short(&o.stream);
                    w.u32(o.partition);
                    w.u64(o.offset);
                    w.text(&o.metadata);
                }
            }
            Frame::FetchCommitted { group, partitions } => {
                w.short(group);
                w.partitions(partitions);
            }
            Frame::StreamMetadata { stream } => w.short(stream),
            Frame::Fetched { partitions } => {
                w.u32(len_u32(partitions.len()));
                for p in partitions {
                    FetchedWriter::partition_header(
                        &mut w,
                        &p.stream,
                        p.partition,
                        &p.code,
                        &p.message,
                        p.start_offset,
                        p.end_offset,
                        p.records.len(),
                    );
                    w.0.extend_from_slice(&p.records);
                }
            }
            Frame::Offset { offset } => w.maybe(*offset),
            Frame::Joined {
                member,
                heartbeat_ms,
            } => {
                w.short(member);
                w.u32(*heartbeat_ms);
            }
            Frame::Assignment {
                generation,
                assigned,
                revoked,
            } => {
                w.u64(*generation);
                w.partitions(assigned);
                w.partitions(revoked);
            }
            Frame::Committed { offsets } => {
                w.u32(len_u32(offsets.len()));
                for o in offsets {
                    w.short(&o.stream);
                    w.u32(o.partition);
                    w.maybe(o.offset);
                    w.text(&o.metadata);
                }
            }
            Frame::StreamInfo { partitions } => {
                w.u32(len_u32(partitions.len()));
                for p in partitions {
                    w.u64(p.start_offset);
                    w.u64(p.end_offset);
                }
            }
            Frame::HelloOk {
                version,
                max_frame,
                server,
            } => {
                w.u16(*version);
                w.u32(*max_frame);
                w.text(server);
            }
            Frame::Produced { base_offset, count } => {
                w.u64(*base_offset);
                w.u32(*count);
            }
            Frame::Subscribed { subscription } => w.u32(*subscription),
            Frame::Deliver { deliveries } => {
                // Sized up front: a frame of 1,000 deliveries grew by ten reallocations.
                let size: usize = deliveries
                    .iter()
                    .map(|d| 2 + d.receipt.len() + 20 + d.record.len())
                    .sum();
                w.0.reserve(4 + size);
                w.u32(len_u32(deliveries.len()));
                for d in deliveries {
                    w.short(&d.receipt);
                    w.u32(d.delivery_count);
                    w.u64(d.offset);
                    w.i64(d.published_at_ms);
                    w.0.extend_from_slice(&d.record);
                }
            }
            Frame::Settled { ok, failed } => {
                w.u32(*ok);
                w.u32(len_u32(failed.len()));
                for f in failed {
                    w.u32(f.index);
                    w.short(&f.code);
                }
            }
            Frame::Throttle {
                retry_after_ms,
                code,
                message,
            } => {
                w.u64(*retry_after_ms);
                w.short(code);
                w.text(message);
            }
            Frame::Error { code, message } => {
                w.short(code);
                w.text(message);
            }
            Frame::Ping | Frame::Pong | Frame::Ok => {}
        }
        let len = len_u32(out.len() - start - 4);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    pub fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => kind::HELLO,
            Frame::Produce { .. } => kind::PRODUCE,
            Frame::Subscribe { .. } => kind::SUBSCRIBE,
            Frame::Credit { .. } => kind::CREDIT,
            Frame::Ack { .. } => kind::ACK,
            Frame::Nack { .. } => kind::NACK,
            Frame::Extend { .. } => kind::EXTEND,
            Frame::Unsubscribe { .. } => kind::UNSUBSCRIBE,
            Frame::Ping => kind::PING,
            Frame::StreamProduce { .. } => kind::STREAM_PRODUCE,
            Frame::Fetch { .. } => kind::FETCH,
            Frame::ListOffset { .. } => kind::LIST_OFFSET,
            Frame::JoinGroup { .. } => kind::JOIN_GROUP,
            Frame::Heartbeat { .. } => kind::HEARTBEAT,
            Frame::LeaveGroup { .. } => kind::LEAVE_GROUP,
            Frame::Commit { .. } => kind::COMMIT,
            Frame::FetchCommitted { .. } => kind::FETCH_COMMITTED,
            Frame::StreamMetadata { .. } => kind::STREAM_METADATA,
            Frame::Fetched { .. } => kind::FETCHED,
            Frame::Offset { .. } => kind::OFFSET,
            Frame::Joined { .. } => kind::JOINED,
            Frame::Assignment { .. } => kind::ASSIGNMENT,
            Frame::Committed { .. } => kind::COMMITTED,
            Frame::StreamInfo { .. } => kind::STREAM_INFO,
            Frame::HelloOk { .. } => kind::HELLO_OK,
            Frame::Produced { .. } => kind::PRODUCED,
            Frame::Subscribed { .. } => kind::SUBSCRIBED,
            Frame::Deliver { .. } => kind::DELIVER,
            Frame::Settled { .. } => kind::SETTLED,
            Frame::Throttle { .. } => kind::THROTTLE,
            Frame::Error { .. } => kind::ERROR,
            Frame::Pong => kind::PONG,
            Frame::Ok => kind::OK,
        }
    }
}

/// Writes a Deliver frame straight into one buffer, each record by its own encoder (the
/// server's hot path: no receipt copy or record buffer per delivery, as `Frame::Deliver`
/// would need). The bytes are those `Frame::Deliver` encodes to.
pub struct DeliverWriter {
    out: Vec<u8>,
    count: u32,
}

impl DeliverWriter {
    /// Offset of the delivery count: length (4), kind, flags, request id (4).
    const COUNT_AT: usize = 10;

    /// A frame for `request_id`, with room for about `capacity` bytes of deliveries.
    pub fn new(request_id: u32, capacity: usize) -> DeliverWriter {
        let mut out = Vec::with_capacity(Self::COUNT_AT + 4 + capacity);
        out.extend_from_slice(&[0; 4]);
        let mut w = Writer(&mut out);
        w.u8(kind::DELIVER);
        w.u8(0);
        w.u32(request_id);
        w.u32(0);
        DeliverWriter { out, count: 0 }
    }

    /// Bytes one delivery takes besides its record.
    pub fn overhead(receipt: &str) -> usize {
        1 + receipt.len().min(255) + 4 + 8 + 8
    }

    /// Adds a delivery; `record` appends the record (length prefix included).
    pub fn push(
        &mut self,
        receipt: &str,
        delivery_count: u32,
        offset: u64,
        published_at_ms: i64,
        record: impl FnOnce(&mut Vec<u8>),
    ) {
        let mut w = Writer(&mut self.out);
        w.short(receipt);
        w.u32(delivery_count);
        w.u64(offset);
        w.i64(published_at_ms);
        record(&mut self.out);
        self.count += 1;
    }

    /// The encoded frame.
    pub fn finish(mut self) -> Vec<u8> {
        let len = len_u32(self.out.len() - 4);
        self.out[..4].copy_from_slice(&len.to_le_bytes());
        self.out[Self::COUNT_AT..Self::COUNT_AT + 4].copy_from_slice(&self.count.to_le_bytes());
        self.out
    }
}

/// Writes a Fetched frame straight into one buffer, each partition's stored batches copied
/// once (the server's fetch path). The bytes are those `Frame::Fetched` encodes to.
pub struct FetchedWriter {
    out: Vec<u8>,
    count: u32,
}

impl FetchedWriter {
    /// Offset of the partition count: length (4), kind, flags, request id (4).
    const COUNT_AT: usize = 10;

    pub fn new(request_id: u32, capacity: usize) -> FetchedWriter {
        let mut out = Vec::with_capacity(Self::COUNT_AT + 4 + capacity);
        out.extend_from_slice(&[0; 4]);
        let mut w = Writer(&mut out);
        w.u8(kind::FETCHED);
        w.u8(0);
        w.u32(request_id);
        w.u32(0);
        FetchedWriter { out, count: 0 }
    }

    /// Bytes one partition takes besides its records.
    pub fn overhead(stream: &str, message: &str) -> usize {
        1 + stream.len().min(255) + 4 + 1 + 255 + 2 + message.len() + 8 + 8 + 4
    }

    #[allow(clippy::too_many_arguments)]
    fn partition_header(
        w: &mut Writer<'_>,
        stream: &str,
        partition: u32,
        code: &str,
        message: &str,
        start_offset: u64,
        end_offset: u64,
        records_len: usize,
    ) {
        w.short(stream);
        w.u32(partition);
        w.short(code);
        w.text(message);
        w.u64(start_offset);
        w.u64(end_offset);
        w.u32(len_u32(records_len));
    }

    /// Adds a partition that was read: its range and its batches.
    pub fn push<B: AsRef<[u8]>>(
        &mut self,
        stream: &str,
        partition: u32,
        start_offset: u64,
        end_offset: u64,
        batches: &[B],
    ) {
        let len = batches.iter().map(|b| b.as_ref().len()).sum();
        let mut w = Writer(&mut self.out);
        Self::partition_header(
            &mut w,
            stream,
            partition,
            "",
            "",
            start_offset,
            end_offset,
            len,
        );
        for b in batches {
            self.out.extend_from_slice(b.as_ref());
        }
        self.count += 1;
    }

    /// Adds a partition that could not be read, and why.
    pub fn push_error(&mut self, stream: &str, partition: u32, code: &str, message: &str) {
        let mut w = Writer(&mut self.out);
        Self::partition_header(&mut w, stream, partition, code, message, 0, 0, 0);
        self.count += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = len_u32(self.out.len() - 4);
        self.out[..4].copy_from_slice(&len.to_le_bytes());
        self.out[Self::COUNT_AT..Self::COUNT_AT + 4].copy_from_slice(&self.count.to_le_bytes());
        self.out
    }
}

/// Decodes the first frame of `buf`: `Ok(None)` while it is incomplete, else the frame, its
/// request id and the bytes it used. A frame announcing more than `max_frame` bytes is an
/// error at once (before its body arrives).
/// The optional reason byte of a Nack frame: the consumer is overloaded.
const NACK_OVERLOADED: u8 = 1;

pub fn decode_frame(
    buf: &[u8],
    max_frame: usize,
) -> Result<Option<(Frame, u32, usize)>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    if len > max_frame {
        return Err(ProtoError::TooLarge {
            len,
            max: max_frame,
        });
    }
    if len < FRAME_HEADER_LEN {
        return Err(ProtoError::Malformed("frame shorter than its header"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = &buf[4..4 + len];
    let kind = body[0];
    let request_id = u32::from_le_bytes(body[2..6].try_into().unwrap());
    let mut r = Reader {
        buf: &body[FRAME_HEADER_LEN..],
        pos: 0,
    };
    let frame = match kind {
        kind::HELLO => {
            if r.bytes(8)? != HELLO_MAGIC {
                return Err(ProtoError::Malformed(
                    "bad hello magic: not a tidewater client",
                ));
            }
            Frame::Hello {
                version: r.u16()?,
                client: r.text()?,
                credentials: if r.pos < r.buf.len() {
                    r.text()?
                } else {
                    String::new()
                },
            }
        }
        kind::PRODUCE => Frame::Produce {
            queue: r.short()?,
            ack: r.ack()?,
            batch: r.rest().to_vec(),
        },
        kind::STREAM_PRODUCE => Frame::StreamProduce {
            stream: r.short()?,
            partition: r.u32()?,
            ack: r.ack()?,
            batch: r.rest().to_vec(),
        },
        kind::FETCH => {
            let wait_ms = r.u32()?;
            let max_bytes = r.u32()?;
            let n = r.list(1 + 4 + 8 + 4)?;
            let partitions = (0..n)
                .map(|_| {
                    Ok(FetchPartition {
                        stream: r.short()?,
                        partition: r.u32()?,
                        offset: r.u64()?,
                        max_bytes: r.u32()?,
                    })
                })
                .collect::<R<Vec<_>>>()?;
            Frame::Fetch {
                wait_ms,
                max_bytes,
                partitions,
            }
        }
        kind::LIST_OFFSET => Frame::ListOffset {
            stream: r.short()?,
            partition: r.u32()?,
            at: r.i64()?,
        },
        kind::JOIN_GROUP => {
            let group = r.short()?;
            let instance = r.short()?;
            let session_timeout_ms = r.u32()?;
            let n = r.list(1)?;
            let streams = (0..n).map(|_| r.short()).collect::<R<Vec<_>>>()?;
            Frame::JoinGroup {
                group,
                instance,
                session_timeout_ms,
                streams,
            }
        }
        kind::HEARTBEAT => Frame::Heartbeat {
            group: r.short()?,
            member: r.short()?,
            owned: r.partitions()?,
        },
        kind::LEAVE_GROUP => Frame::LeaveGroup {
            group: r.short()?,
            member: r.short()?,
        },
        kind::COMMIT => {
            let group = r.short()?;
            let member = r.short()?;
            let n = r.list(1 + 4 + 8 + 2)?;
            let offsets = (0..n)
                .map(|_| {
                    Ok(CommitOffset {
                        stream: r.short()?,
                        partition: r.u32()?,
                        offset: r.u64()?,
                        metadata: r.text()?,
                    })
                })
                .collect::<R<Vec<_>>>()?;
            Frame::Commit {
                group,
                member,
                offsets,
            }
        }
        kind::FETCH_COMMITTED => Frame::FetchCommitted {
            group: r.short()?,
            partitions: r.partitions()?,
        },
        kind::STREAM_METADATA => Frame::StreamMetadata { stream: r.short()? },
        kind::FETCHED => {
            let n = r.list(1 + 4 + 1 + 2 + 8 + 8 + 4)?;
            let partitions = (0..n)
                .map(|_| {
                    let stream = r.short()?;
                    let partition = r.u32()?;
                    let code = r.short()?;
                    let message = r.text()?;
                    let start_offset = r.u64()?;
                    let end_offset = r.u64()?;
                    let len = r.u32()? as usize;
                    Ok(FetchedPartition {
                        stream,
                        partition,
                        code,
                        message,
                        start_offset,
                        end_offset,
                        records: r.bytes(len)?.to_vec(),
                    })
                })
                .collect::<R<Vec<_>>>()?;
            Frame::Fetched { partitions }
        }
        kind::OFFSET => Frame::Offset { offset: r.maybe()? },
        kind::JOINED => Frame::Joined {
            member: r.short()?,
            heartbeat_ms: r.u32()?,
        },
        kind::ASSIGNMENT => Frame::Assignment {
            generation: r.u64()?,
            assigned: r.partitions()?,
            revoked: r.partitions()?,
        },
        kind::COMMITTED => {
            let n = r.list(1 + 4 + 8 + 2)?;
            let offsets = (0..n)
                .map(|_| {
                    Ok(CommittedOffset {
                        stream: r.short()?,
                        partition: r.u32()?,
                        offset: r.maybe()?,
                        metadata: r.text()?,
                    })
                })
                .collect::<R<Vec<_>>>()?;
            Frame::Committed { offsets }
        }
        kind::STREAM_INFO => {
            let n = r.count(16)?;
            let partitions = (0..n)
                .map(|_| {
                    Ok(PartitionRange {
                        start_offset: r.u64()?,
                        end_offset: r.u64()?,
                    })
                })
                .collect::<R<Vec<_>>>()?;
            Frame::StreamInfo { partitions }
        }
        kind::SUBSCRIBE => Frame::Subscribe {
            queue: r.short()?,
            lease_ms: r.u64()?,
            credit: r.u32()?,
        },
        kind::CREDIT => Frame::Credit {
            subscription: r.u32()?,
            credit: r.u32()?,
        },
        kind::ACK => Frame::Ack {
            queue: r.short()?,
            receipts: r.receipts()?,
        },
        kind::NACK => Frame::Nack {
            queue: r.short()?,
            delay_ms: r.i64()?,
            error: r.text()?,
            receipts: r.receipts()?,
            overloaded: r.pos < r.buf.len() && r.u8()? == NACK_OVERLOADED,
        },
        kind::EXTEND => Frame::Extend {
            queue: r.short()?,
            lease_ms: r.u64()?,
            receipts: r.receipts()?,
        },
        kind::UNSUBSCRIBE => Frame::Unsubscribe {
            subscription: r.u32()?,
        },
        kind::PING => Frame::Ping,
        kind::HELLO_OK => Frame::HelloOk {
            version: r.u16()?,
            max_frame: r.u32()?,
            server: r.text()?,
        },
        kind::PRODUCED => Frame::Produced {
            base_offset: r.u64()?,
            count: r.u32()?,
        },
        kind::SUBSCRIBED => Frame::Subscribed {
            subscription: r.u32()?,
        },
        kind::DELIVER => {
            let n = r.count(1 + 4 + 8 + 8 + 4)?;
            let mut deliveries = Vec::with_capacity(n);
            for _ in 0..n {
                let receipt = r.short()?;
                let delivery_count = r.u32()?;
                let offset = r.u64()?;
                let published_at_ms = r.i64()?;
                let record_len = u32::from_le_bytes(r.bytes(4)?.try_into().unwrap()) as usize;
                r.pos -= 4;
                let record = r
                    .bytes(
                        4usize
                            .checked_add(record_len)
                            .ok_or(ProtoError::Malformed("record length"))?,
                    )?
                    .to_vec();
                deliveries.push(WireDelivery {
                    receipt,
                    delivery_count,
                    offset,
                    published_at_ms,
                    record,
                });
            }
            Frame::Deliver { deliveries }
        }
        kind::SETTLED => {
            let ok = r.u32()?;
            let n = r.count(5)?;
            let failed = (0..n)
                .map(|_| {
                    Ok(Failure {
                        index: r.u32()?,
                        code: r.short()?,
                    })
                })
                .collect::<R<Vec<_>>>()?;
            Frame::Settled { ok, failed }
        }
        kind::THROTTLE => Frame::Throttle {
            retry_after_ms: r.u64()?,
            code: r.short()?,
            message: r.text()?,
        },
        kind::ERROR => Frame::Error {
            code: r.short()?,
            message: r.text()?,
        },
        kind::PONG => Frame::Pong,
        kind::OK => Frame::Ok,
        other => return Err(ProtoError::UnknownKind(other)),
    };
    r.done()?;
    Ok(Some((frame, request_id, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long text was cut at byte 65,535 whatever the character there: the frame then
    /// held invalid UTF-8 and its decoder refused it (a connection error for the peer).
    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let message = "é".repeat(40_000); // 80,000 bytes
        let mut buf = Vec::new();
        Frame::Error {
            code: "x".repeat(300), // cut to 255
            message: message.clone(),
        }
        .encode(7, &mut buf);
        let (frame, id, used) = decode_frame(&buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!((id, used), (7, buf.len()));
        let Frame::Error { code, message: got } = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(code.len(), 255);
        assert_eq!(
            got.len(),
            65_534,
            "the last whole character before 65,535 bytes"
        );
        assert!(message.starts_with(&got));
    }
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        let s = |t: &str| t.to_string();
        vec![
            Frame::Hello {
                version: 1,
                client: s("test"),
                credentials: String::new(),
            },
            Frame::Hello {
                version: 1,
                client: s("test"),
                credentials: s("tw0123456789abcdef.secret"),
            },
            Frame::Produce {
                queue: s("q"),
                ack: Ack::Written,
                batch: vec![1, 2, 3],
            },
            Frame::Subscribe {
                queue: s("q"),
                lease_ms: 30_000,
                credit: 500,
            },
            Frame::Credit {
                subscription: 7,
                credit: 100,
            },
            Frame::Ack {
                queue: s("q"),
                receipts: vec![s("a"), s("bb")].into(),
            },
            Frame::Nack {
                queue: s("q"),
                delay_ms: -1,
                error: s("boom"),
                receipts: vec![s("r")].into(),
                overloaded: false,
            },
            Frame::Nack {
                queue: s("q"),
                delay_ms: 5,
                error: s(""),
                receipts: vec![s("r")].into(),
                overloaded: true,
            },
            Frame::Extend {
                queue: s("q"),
                lease_ms: 5,
                receipts: Receipts::default(),
            },
            Frame::Unsubscribe { subscription: 7 },
            Frame::Ping,
            Frame::HelloOk {
                version: 1,
                max_frame: 1 << 20,
                server: s("tidewater"),
            },
            Frame::Produced {
                base_offset: 42,
                count: 3,
            },
            Frame::Subscribed { subscription: 9 },
            Frame::Deliver {
                deliveries: vec![WireDelivery {
                    receipt: s("rc"),
                    delivery_count: 2,
                    offset: 5,
                    published_at_ms: 77,
                    record: vec![3, 0, 0, 0, 9, 9, 9],
                }],
            },
            Frame::Settled {
                ok: 3,
                failed: vec![Failure {
                    index: 1,
                    code: s("stale_receipt"),
                }],
            },
            Frame::Throttle {
                retry_after_ms: 250,
                code: s("queue_full"),
                message: s("full"),
            },
            Frame::Error {
                code: s("queue_not_found"),
                message: s("no such queue"),
            },
            Frame::Pong,
            Frame::Ok,
            Frame::StreamProduce {
                stream: s("s"),
                partition: 3,
                ack: Ack::Durable,
                batch: vec![4, 5],
            },
            Frame::Fetch {
                wait_ms: 500,
                max_bytes: 1 << 20,
                partitions: vec![FetchPartition {
                    stream: s("s"),
                    partition: 1,
                    offset: 99,
                    max_bytes: 4096,
                }],
            },
            Frame::ListOffset {
                stream: s("s"),
                partition: 0,
                at: -2,
            },
            Frame::JoinGroup {
                group: s("g"),
                instance: s(""),
                session_timeout_ms: 10_000,
                streams: vec![s("a"), s("b")],
            },
            Frame::Heartbeat {
                group: s("g"),
                member: s("member-1"),
                owned: vec![StreamPartition {
                    stream: s("a"),
                    partition: 2,
                }],
            },
            Frame::LeaveGroup {
                group: s("g"),
                member: s("m"),
            },
            Frame::Commit {
                group: s("g"),
                member: s(""),
                offsets: vec![CommitOffset {
                    stream: s("a"),
                    partition: 0,
                    offset: 12,
                    metadata: s("meta"),
                }],
            },
            Frame::FetchCommitted {
                group: s("g"),
                partitions: vec![],
            },
            Frame::StreamMetadata { stream: s("a") },
            Frame::Fetched {
                partitions: vec![
                    FetchedPartition {
                        stream: s("a"),
                        partition: 0,
                        code: s(""),
                        message: s(""),
                        start_offset: 0,
                        end_offset: 10,
                        records: vec![1, 2, 3],
                    },
                    FetchedPartition {
                        stream: s("b"),
                        partition: 9,
                        code: s("partition_not_found"),
                        message: s("no partition 9"),
                        start_offset: 0,
                        end_offset: 0,
                        records: vec![],
                    },
                ],
            },
            Frame::Offset { offset: None },
            Frame::Offset { offset: Some(7) },
            Frame::Joined {
                member: s("m-1"),
                heartbeat_ms: 3_000,
            },
            Frame::Assignment {
                generation: 4,
                assigned: vec![StreamPartition {
                    stream: s("a"),
                    partition: 1,
                }],
                revoked: vec![],
            },
            Frame::Committed {
                offsets: vec![
                    CommittedOffset {
                        stream: s("a"),
                        partition: 1,
                        offset: Some(5),
                        metadata: s(""),
                    },
                    CommittedOffset {
                        stream: s("a"),
                        partition: 2,
                        offset: None,
                        metadata: s(""),
                    },
                ],
            },
            Frame::StreamInfo {
                partitions: vec![PartitionRange {
                    start_offset: 0,
                    end_offset: 3,
                }],
            },
        ]
    }

    #[test]
    fn the_fetched_writer_encodes_what_frame_fetched_does() {
        let batches = [vec![1u8, 2, 3], vec![4, 5]];
        let mut expected = Vec::new();
        Frame::Fetched {
            partitions: vec![
                FetchedPartition {
                    stream: "a".into(),
                    partition: 2,
                    code: String::new(),
                    message: String::new(),
                    start_offset: 1,
                    end_offset: 9,
                    records: batches.concat(),
                },
                FetchedPartition {
                    stream: "b".into(),
                    partition: 0,
                    code: "stream_not_found".into(),
                    message: "no stream b".into(),
                    start_offset: 0,
                    end_offset: 0,
                    records: vec![],
                },
            ],
        }
        .encode(77, &mut expected);
        let mut writer = FetchedWriter::new(77, 0);
        writer.push("a", 2, 1, 9, &batches);
        writer.push_error("b", 0, "stream_not_found", "no stream b");
        assert_eq!(writer.finish(), expected);
    }

    #[test]
    fn every_frame_round_trips_and_is_incomplete_until_whole() {
        for (id, frame) in samples().into_iter().enumerate() {
            let mut buf = Vec::new();
            frame.encode(u32::try_from(id).unwrap(), &mut buf);
            let (decoded, request_id, used) =
                decode_frame(&buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
            assert_eq!(
                (decoded, request_id as usize, used),
                (frame.clone(), id, buf.len())
            );
            for cut in 0..buf.len() {
                assert_eq!(
                    decode_frame(&buf[..cut], DEFAULT_MAX_FRAME),
                    Ok(None),
                    "{frame:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn the_deliver_writer_encodes_what_frame_deliver_does() {
        let deliveries: Vec<WireDelivery> = (0..3u8)
            .map(|i| WireDelivery {
                receipt: "r".repeat(i as usize * 7),
                delivery_count: i as u32 + 1,
                offset: 1_000 + i as u64,
                published_at_ms: -5 + i as i64,
                record: vec![2, 0, 0, 0, i, i],
            })
            .collect();
        for n in [0, 1, 3] {
            let mut expected = Vec::new();
            let frame = Frame::Deliver {
                deliveries: deliveries[..n].to_vec(),
            };
            frame.encode(42, &mut expected);
            let mut writer = DeliverWriter::new(42, 0);
            for d in &deliveries[..n] {
                let r = &d.record;
                writer.push(
                    &d.receipt,
                    d.delivery_count,
                    d.offset,
                    d.published_at_ms,
                    |b| b.extend_from_slice(r),
                );
            }
            assert_eq!(writer.finish(), expected, "{n} deliveries");
        }
    }

    #[test]
    fn lists_longer_than_max_list_are_malformed() {
        let list = |n: usize| Frame::FetchCommitted {
            group: "g".into(),
            partitions: (0..n)
                .map(|p| StreamPartition {
                    stream: "s".into(),
                    partition: u32::try_from(p).unwrap(),
                })
                .collect(),
        };
        let mut ok = Vec::new();
        list(MAX_LIST).encode(1, &mut ok);
        assert!(decode_frame(&ok, DEFAULT_MAX_FRAME).unwrap().is_some());
        let mut long = Vec::new();
        list(MAX_LIST + 1).encode(1, &mut long);
        assert!(matches!(
            decode_frame(&long, DEFAULT_MAX_FRAME),
            Err(ProtoError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_frames_are_refused_before_their_body_arrives() {
        let announced = (100u32).to_le_bytes();
        assert_eq!(
            decode_frame(&announced, 50),
            Err(ProtoError::TooLarge { len: 100, max: 50 })
        );
    }

    #[test]
    fn a_decoding_error_closes_with_its_frame_code() {
        let too_large = decode_frame(&(100u32).to_le_bytes(), 50).unwrap_err();
        assert_eq!(too_large.code(), FrameCode::FrameTooLarge);
        assert_eq!(too_large.code().as_str(), "frame_too_large");
        let mut unknown = Vec::new();
        Frame::Ping.encode(1, &mut unknown);
        unknown[4] = 0x7f; // the kind byte
        let unknown = decode_frame(&unknown, DEFAULT_MAX_FRAME).unwrap_err();
        assert_eq!(unknown, ProtoError::UnknownKind(0x7f));
        assert_eq!(unknown.code().as_str(), "invalid_frame");
        assert_eq!(ProtoError::Malformed("x").code(), FrameCode::InvalidFrame);
        let codes: Vec<&str> = FrameCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            codes,
            ["invalid_frame", "frame_too_large", "unsupported_version"]
        );
    }

    #[test]
    fn pipelined_frames_decode_one_after_another() {
        let mut buf = Vec::new();
        for (id, frame) in samples().iter().enumerate() {
            frame.encode(u32::try_from(id).unwrap(), &mut buf);
        }
        let mut at = 0;
        let mut n = 0;
        while let Some((_, id, used)) = decode_frame(&buf[at..], DEFAULT_MAX_FRAME).unwrap() {
            assert_eq!(id, n);
            at += used;
            n += 1;
        }
        assert_eq!((at, n as usize), (buf.len(), samples().len()));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_frame(&bytes, 1 << 16);
        }

        #[test]
        fn corrupted_frames_never_panic(idx in 0usize..37, flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
            let mut buf = Vec::new();
            let samples = samples();
            samples[idx % samples.len()].encode(1, &mut buf);
            for (at, byte) in flips {
                let at = 4 + at % (buf.len() - 4);
                buf[at] = byte;
            }
            let cut = cut % (buf.len() + 1);
            let _ = decode_frame(&buf[..cut], DEFAULT_MAX_FRAME);
            let _ = decode_frame(&buf, DEFAULT_MAX_FRAME);
        }
    }
}
