//! The Kafka listener against requests encoded by an independent implementation of Kafka's
//! schemas (the `kafka-protocol` crate's client side): every API at every version it
//! serves answers with a response that decodes at that version, produce and fetch round
//! trip (compressed batches included), an idempotent producer's retry is not written
//! twice, and a malformed or hostile request closes only its own connection. Real Kafka
//! clients are run against it by scripts/kafka-clients-test.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tidewater_core::broker::BrokerOptions;
use tidewater_core::{Broker, stream::config::StreamPatch};
use tidewater_kafka::{Kafka, KafkaConfig, SUPPORTED};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Fixture {
    _dir: tempfile::TempDir,
    broker: Broker,
    addr: SocketAddr,
}

async fn start() -> Fixture {
    start_in(tempfile::tempdir().unwrap()).await
}

async fn start_in(dir: tempfile::TempDir) -> Fixture {
    start_with(dir, |_| {}).await
}

async fn start_with(dir: tempfile::TempDir, configure: impl FnOnce(&mut KafkaConfig)) -> Fixture {
    let broker = Broker::open(dir.path(), BrokerOptions::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = KafkaConfig::new(addr);
    configure(&mut config);
    let kafka = Kafka::new(broker.clone(), config, Default::default());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _stop = _stop;
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            tokio::spawn(tidewater_kafka::serve_connection(
                kafka.clone(),
                stream,
                peer,
                None,
                shutdown.clone(),
            ));
        }
    });
    broker.spawn_maintenance(Duration::from_millis(50));
    Fixture {
        _dir: dir,
        broker,
        addr,
    }
}

struct Client {
    stream: TcpStream,
    correlation: i32,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            correlation: 0,
        }
    }

    fn frame<R: Encodable>(&mut self, api: ApiKey, version: i16, req: &R) -> BytesMut {
        self.correlation += 1;
        let mut header = RequestHeader::default();
        header.request_api_key = api as i16;
        header.request_api_version = version;
        header.correlation_id = self.correlation;
        header.client_id = Some(StrBytes::from_static_str("protocol-test"));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header
            .encode(&mut buf, api.request_header_version(version))
            .unwrap();
        req.encode(&mut buf, version)
            .unwrap_or_else(|e| panic!("{api:?} v{version}: {e}"));
        let len = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        buf
    }

    async fn read_response<P: Decodable>(&mut self, api: ApiKey, version: i16) -> P {
        let len = tokio::time::timeout(Duration::from_secs(20), self.stream.read_i32())
            .await
            .unwrap_or_else(|_| panic!("{api:?} v{version}: no answer"))
            .unwrap_or_else(|e| panic!("{api:?} v{version}: connection closed: {e}"));
        let mut body = vec![0; len as usize];
        self.stream.read_exact(&mut body).await.unwrap();
        let mut body = Bytes::from(body);
        let header =
            ResponseHeader::decode(&mut body, api.response_header_version(version)).unwrap();
        assert_eq!(
            header.correlation_id, self.correlation,
            "{api:?} v{version}"
        );
        let response = P::decode(&mut body, version)
            .unwrap_or_else(|e| panic!("{api:?} v{version}: the response does not decode: {e}"));
        assert!(
            body.is_empty(),
            "{api:?} v{version}: {} bytes left over",
            body.len()
        );
        response
    }

    async fn call<R: Encodable, P: Decodable>(&mut self, api: ApiKey, version: i16, req: &R) -> P {
        let frame = self.frame(api, version, req);
        self.stream.write_all(&frame).await.unwrap();
        self.read_response(api, version).await
    }

    /// Whether the broker closed the connection (within a few seconds).
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn text(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn record(i: i64, producer: (i64, i16, i32)) -> Record {
    let mut headers = kafka_protocol::indexmap::IndexMap::new();
    headers.insert(text("h"), Some(Bytes::from(format!("v{i}"))));
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id: producer.0,
        producer_epoch: producer.1,
        timestamp_type: TimestampType::Creation,
        offset: i,
        sequence: producer.2 + i as i32,
        timestamp: 1_700_000_000_000 + i,
        key: Some(Bytes::from(format!("key-{i}"))),
        value: Some(Bytes::from(format!("value-{i}"))),
        headers,
    }
}

fn batch(n: i64, compression: Compression, producer: (i64, i16, i32)) -> Bytes {
    let records: Vec<Record> = (0..n).map(|i| record(i, producer)).collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    buf.freeze()
}

fn produce_request(topic: &str, partition: i32, records: Bytes, acks: i16) -> ProduceRequest {
    let mut part = produce_request::PartitionProduceData::default();
    part.index = partition;
    part.records = Some(records);
    let mut t = produce_request::TopicProduceData::default();
    t.name = name(topic);
    t.partition_data = vec![part];
    let mut req = ProduceRequest::default();
    req.acks = acks;
    req.timeout_ms = 30_000;
    req.topic_data = vec![t];
    req
}

fn fetch_request(version: i16, topic: &str, id: uuid::Uuid, offset: i64) -> FetchRequest {
    let mut part = fetch_request::FetchPartition::default();
    part.partition = 0;
    part.fetch_offset = offset;
    part.partition_max_bytes = 1 << 20;
    let mut t = fetch_request::FetchTopic::default();
    if version >= 13 {
        t.topic_id = id;
    } else {
        t.topic = name(topic);
    }
    t.partitions = vec![part];
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = 0;
    req.min_bytes = 1;
    req.max_bytes = 1 << 20;
    req.topics = vec![t];
    req
}

/// A share fetch of partition 0 of a topic, without waiting, in session `epoch`.
fn share_fetch(group: &str, member: &str, topic_id: uuid::Uuid, epoch: i32) -> ShareFetchRequest {
    let mut fetch = ShareFetchRequest::default();
    fetch.group_id = Some(GroupId(text(group)));
    fetch.member_id = Some(text(member));
    fetch.share_session_epoch = epoch;
    fetch.max_wait_ms = 0;
    fetch.max_records = 10;
    let mut fp = share_fetch_request::FetchPartition::default();
    fp.partition_index = 0;
    let mut ft = share_fetch_request::FetchTopic::default();
    ft.topic_id = topic_id;
    ft.partitions = vec![fp];
    fetch.topics = vec![ft];
    fetch
}

async fn create_stream(broker: &Broker, stream: &str, partitions: u32) {
    broker
        .put_stream(
            stream,
            &StreamPatch {
                partitions: Some(partitions),
                ..StreamPatch::default()
            },
        )
        .await
        .unwrap();
}

fn versions(api: ApiKey) -> std::ops::RangeInclusive<i16> {
    let (_, min, max) = SUPPORTED.iter().find(|(k, _, _)| *k == api).unwrap();
    *min..=*max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_answers_at_every_version_it_serves() {
    let f = start().await;
    create_stream(&f.broker, "t", 2).await;
    let mut c = Client::connect(f.addr).await;

    for v in versions(ApiKey::ApiVersions) {
        let r: ApiVersionsResponse = c
            .call(ApiKey::ApiVersions, v, &ApiVersionsRequest::default())
            .await;
        assert_eq!(r.error_code, 0);
        assert_eq!(r.api_keys.len(), SUPPORTED.len());
    }
    let mut topic_id = uuid::Uuid::nil();
    for v in versions(ApiKey::Metadata) {
        let mut req = MetadataRequest::default();
        req.topics = if v == 0 { Some(vec![]) } else { None };
        let r: MetadataResponse = c.call(ApiKey::Metadata, v, &req).await;
        let t = r.topics.iter().find(|t| t.name == Some(name("t"))).unwrap();
        assert_eq!(t.partitions.len(), 2, "v{v}");
        if v >= 10 {
            assert!(!t.topic_id.is_nil());
            topic_id = t.topic_id;
        }
    }
    let mut expected_base = 0;
    for v in versions(ApiKey::Produce) {
        let req = produce_request("t", 0, batch(3, Compression::None, (-1, -1, -1)), -1);
        let r: ProduceResponse = c.call(ApiKey::Produce, v, &req).await;
        let p = &r.responses[0].partition_responses[0];
        assert_eq!((p.error_code, p.base_offset), (0, expected_base), "v{v}");
        expected_base += 3;
    }
    for v in versions(ApiKey::Fetch) {
        let r: FetchResponse = c
            .call(ApiKey::Fetch, v, &fetch_request(v, "t", topic_id, 4))
            .await;
        let p = &r.responses[0].partitions[0];
        assert_eq!(p.error_code, 0, "v{v}");
        assert_eq!(p.high_watermark, expected_base);
        let sets = RecordBatchDecoder::decode_all(&mut p.records.clone().unwrap()).unwrap();
        // Whole batches: the one holding offset 4 starts at 3.
        assert_eq!(sets[0].records[0].offset, 3, "v{v}");
    }
    for v in versions(ApiKey::ListOffsets) {
        let mut cases = vec![(-2, 0), (-1, expected_base), (1_700_000_000_001, 1)];
        if v >= 7 {
            // The first record with the largest timestamp (each batch's third).
            cases.push((-3, 2));
        }
        if v >= 8 {
            cases.push((-4, 0));
        }
        for (time, want) in cases {
            let mut part = list_offsets_request::ListOffsetsPartition::default();
            part.partition_index = 0;
            part.timestamp = time;
            let mut t = list_offsets_request::ListOffsetsTopic::default();
            t.name = name("t");
            t.partitions = vec![part];
            let mut req = ListOffsetsRequest::default();
            req.replica_id = BrokerId(-1);
            req.topics = vec![t];
            let r: ListOffsetsResponse = c.call(ApiKey::ListOffsets, v, &req).await;
            let p = &r.topics[0].partitions[0];
            assert_eq!((p.error_code, p.offset), (0, want), "v{v} time {time}");
        }
    }
    for v in versions(ApiKey::InitProducerId) {
        let mut req = InitProducerIdRequest::default();
        req.transactional_id = None;
        req.transaction_timeout_ms = 60_000;
        req.producer_id = ProducerId(-1);
        req.producer_epoch = -1;
        let r: InitProducerIdResponse = c.call(ApiKey::InitProducerId, v, &req).await;
        assert_eq!(r.error_code, 0);
        assert!(r.producer_id.0 > 0);
    }
    for v in versions(ApiKey::FindCoordinator) {
        let mut req = FindCoordinatorRequest::default();
        if v >= 4 {
            req.coordinator_keys = vec![text("g")];
        } else {
            req.key = text("g");
        }
        let r: FindCoordinatorResponse = c.call(ApiKey::FindCoordinator, v, &req).await;
        let port = if v >= 4 {
            r.coordinators[0].port
        } else {
            r.port
        };
        assert_eq!(port, i32::from(f.addr.port()), "v{v}");
    }
    for v in versions(ApiKey::OffsetCommit) {
        let mut part = offset_commit_request::OffsetCommitRequestPartition::default();
        part.partition_index = 0;
        part.committed_offset = 2 + i64::from(v);
        let mut t = offset_commit_request::OffsetCommitRequestTopic::default();
        t.name = name("t");
        t.partitions = vec![part];
        let mut req = OffsetCommitRequest::default();
        req.group_id = GroupId(text("committer"));
        req.generation_id_or_member_epoch = -1;
        req.topics = vec![t];
        let r: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, v, &req).await;
        assert_eq!(r.topics[0].partitions[0].error_code, 0, "v{v}");
    }
    let last_commit = 2 + i64::from(*versions(ApiKey::OffsetCommit).end());
    for v in versions(ApiKey::OffsetFetch) {
        let mut req = OffsetFetchRequest::default();
        let offset = if v >= 8 {
            let mut g = offset_fetch_request::OffsetFetchRequestGroup::default();
            g.group_id = GroupId(text("committer"));
            g.topics = None;
            req.groups = vec![g];
            let r: OffsetFetchResponse = c.call(ApiKey::OffsetFetch, v, &req).await;
            r.groups[0].topics[0].partitions[0].committed_offset
        } else {
            req.group_id = GroupId(text("committer"));
            let mut t = offset_fetch_request::OffsetFetchRequestTopic::default();
            t.name = name("t");
            t.partition_indexes = vec![0];
            req.topics = Some(vec![t]);
            let r: OffsetFetchResponse = c.call(ApiKey::OffsetFetch, v, &req).await;
            r.topics[0].partitions[0].committed_offset
        };
        assert_eq!(offset, last_commit, "v{v}");
    }
    for v in versions(ApiKey::CreateTopics) {
        let topic = format!("created-{v}");
        let mut t = create_topics_request::CreatableTopic::default();
        t.name = name(&topic);
        t.num_partitions = 3;
        t.replication_factor = -1;
        let mut config = create_topics_request::CreatableTopicConfig::default();
        config.name = text("cleanup.policy");
        config.value = Some(text("compact"));
        t.configs = vec![config];
        let mut req = CreateTopicsRequest::default();
        req.topics = vec![t.clone()];
        req.timeout_ms = 10_000;
        let r: CreateTopicsResponse = c.call(ApiKey::CreateTopics, v, &req).await;
        assert_eq!(
            r.topics[0].error_code, 0,
            "v{v}: {:?}",
            r.topics[0].error_message
        );
        let info = f.broker.get_stream(&topic).unwrap();
        assert_eq!(info.partitions.len(), 3);
        assert!(info.config.cleanup.compacts());
        let again: CreateTopicsResponse = c.call(ApiKey::CreateTopics, v, &req).await;
        assert_eq!(
            again.topics[0].error_code,
            kafka_protocol::ResponseError::TopicAlreadyExists.code()
        );
        // A setting tidewater does not have is refused by name.
        let mut bad = t.clone();
        bad.name = name(&format!("bad-{v}"));
        let mut config = create_topics_request::CreatableTopicConfig::default();
        config.name = text("unclean.leader.election.enable");
        config.value = Some(text("true"));
        bad.configs = vec![config];
        req.topics = vec![bad];
        let r: CreateTopicsResponse = c.call(ApiKey::CreateTopics, v, &req).await;
        assert_eq!(
            r.topics[0].error_code,
            kafka_protocol::ResponseError::InvalidConfig.code()
        );
    }
    for v in versions(ApiKey::DeleteTopics) {
        let topic = format!("created-{}", 1 + v);
        let mut req = DeleteTopicsRequest::default();
        if v >= 6 {
            let mut t = delete_topics_request::DeleteTopicState::default();
            t.name = Some(name(&topic));
            req.topics = vec![t];
        } else {
            req.topic_names = vec![name(&topic)];
        }
        let r: DeleteTopicsResponse = c.call(ApiKey::DeleteTopics, v, &req).await;
        assert_eq!(r.responses[0].error_code, 0, "v{v}");
        assert!(f.broker.get_stream(&topic).is_err());
    }
    for v in versions(ApiKey::DescribeCluster) {
        let r: DescribeClusterResponse = c
            .call(
                ApiKey::DescribeCluster,
                v,
                &DescribeClusterRequest::default(),
            )
            .await;
        assert_eq!(r.brokers.len(), 1);
    }
    // The classic group protocol, one group per JoinGroup version.
    for v in versions(ApiKey::JoinGroup) {
        let group = format!("join-{v}");
        let mut req = JoinGroupRequest::default();
        req.group_id = GroupId(text(&group));
        req.session_timeout_ms = 10_000;
        req.rebalance_timeout_ms = 10_000;
        req.protocol_type = text("consumer");
        let mut p = join_group_request::JoinGroupRequestProtocol::default();
        p.name = text("range");
        p.metadata = Bytes::from_static(b"meta");
        req.protocols = vec![p];
        let mut r: JoinGroupResponse = c.call(ApiKey::JoinGroup, v, &req).await;
        if v >= 4 {
            assert_eq!(
                r.error_code,
                kafka_protocol::ResponseError::MemberIdRequired.code()
            );
            req.member_id = r.member_id.clone();
            r = c.call(ApiKey::JoinGroup, v, &req).await;
        }
        assert_eq!(r.error_code, 0, "v{v}");
        assert_eq!(r.generation_id, 1);
        assert_eq!(r.leader, r.member_id);
        assert_eq!(r.members.len(), 1);
        let sv = v.min(*versions(ApiKey::SyncGroup).end());
        let mut sync = SyncGroupRequest::default();
        sync.group_id = GroupId(text(&group));
        sync.generation_id = 1;
        sync.member_id = r.member_id.clone();
        let mut a = sync_group_request::SyncGroupRequestAssignment::default();
        a.member_id = r.member_id.clone();
        a.assignment = Bytes::from_static(b"mine");
        sync.assignments = vec![a];
        if sv >= 5 {
            sync.protocol_type = Some(text("consumer"));
            sync.protocol_name = Some(text("range"));
        }
        let s: SyncGroupResponse = c.call(ApiKey::SyncGroup, sv, &sync).await;
        assert_eq!((s.error_code, &s.assignment[..]), (0, &b"mine"[..]), "v{v}");
        let hv = v.min(*versions(ApiKey::Heartbeat).end());
        let mut hb = HeartbeatRequest::default();
        hb.group_id = GroupId(text(&group));
        hb.generation_id = 1;
        hb.member_id = r.member_id.clone();
        let h: HeartbeatResponse = c.call(ApiKey::Heartbeat, hv, &hb).await;
        assert_eq!(h.error_code, 0);
        hb.generation_id = 7;
        let h: HeartbeatResponse = c.call(ApiKey::Heartbeat, hv, &hb).await;
        assert_eq!(
            h.error_code,
            kafka_protocol::ResponseError::IllegalGeneration.code()
        );
        for dv in versions(ApiKey::DescribeGroups) {
            let mut req = DescribeGroupsRequest::default();
            req.groups = vec![GroupId(text(&group))];
            let d: DescribeGroupsResponse = c.call(ApiKey::DescribeGroups, dv, &req).await;
            assert_eq!(d.groups[0].members.len(), 1);
            assert_eq!(&d.groups[0].group_state[..], "Stable");
        }
        let lv = v.min(*versions(ApiKey::LeaveGroup).end());
        let mut leave = LeaveGroupRequest::default();
        leave.group_id = GroupId(text(&group));
        if lv >= 3 {
            let mut m = leave_group_request::MemberIdentity::default();
            m.member_id = r.member_id.clone();
            leave.members = vec![m];
        } else {
            leave.member_id = r.member_id.clone();
        }
        let l: LeaveGroupResponse = c.call(ApiKey::LeaveGroup, lv, &leave).await;
        assert_eq!(l.error_code, 0);
        assert!(!f.broker.classic_has_members(&group));
    }
    for v in versions(ApiKey::ListGroups) {
        let r: ListGroupsResponse = c
            .call(ApiKey::ListGroups, v, &ListGroupsRequest::default())
            .await;
        assert!(
            r.groups.iter().any(|g| &g.group_id.0[..] == "committer"),
            "v{v}"
        );
    }
    for v in versions(ApiKey::OffsetDelete) {
        let mut p = offset_delete_request::OffsetDeleteRequestPartition::default();
        p.partition_index = 0;
        let mut t = offset_delete_request::OffsetDeleteRequestTopic::default();
        t.name = name("t");
        t.partitions = vec![p];
        let mut req = OffsetDeleteRequest::default();
        req.group_id = GroupId(text("committer"));
        req.topics = vec![t];
        let r: OffsetDeleteResponse = c.call(ApiKey::OffsetDelete, v, &req).await;
        assert_eq!(r.error_code, 0);
    }
    assert!(f.broker.committed("committer", "t", 0).await.is_none());
    for v in versions(ApiKey::IncrementalAlterConfigs) {
        let mut set = incremental_alter_configs_request::AlterableConfig::default();
        set.name = text("retention.ms");
        set.config_operation = 0;
        set.value = Some(text(&format!("{}", 3_600_000 + i64::from(v))));
        let mut append = incremental_alter_configs_request::AlterableConfig::default();
        append.name = text("cleanup.policy");
        append.config_operation = 2;
        append.value = Some(text("compact"));
        let mut r = incremental_alter_configs_request::AlterConfigsResource::default();
        r.resource_type = 2;
        r.resource_name = text("t");
        r.configs = vec![set, append];
        let mut req = IncrementalAlterConfigsRequest::default();
        req.resources = vec![r];
        let resp: IncrementalAlterConfigsResponse =
            c.call(ApiKey::IncrementalAlterConfigs, v, &req).await;
        assert_eq!(
            resp.responses[0].error_code, 0,
            "v{v}: {:?}",
            resp.responses[0].error_message
        );
        let config = f.broker.get_stream("t").unwrap().config;
        assert_eq!(config.retention_ms, 3_600_000 + i64::from(v));
        assert_eq!(
            config.cleanup,
            tidewater_core::stream::config::Cleanup::CompactDelete
        );
    }
    for v in versions(ApiKey::DescribeConfigs) {
        let mut r = describe_configs_request::DescribeConfigsResource::default();
        r.resource_type = 2;
        r.resource_name = text("t");
        r.configuration_keys = None;
        let mut req = DescribeConfigsRequest::default();
        req.resources = vec![r];
        let resp: DescribeConfigsResponse = c.call(ApiKey::DescribeConfigs, v, &req).await;
        let configs = &resp.results[0].configs;
        let get = |n: &str| {
            configs
                .iter()
                .find(|c| &*c.name == n)
                .and_then(|c| c.value.as_ref())
                .map(|v| v.to_string())
        };
        assert_eq!(
            get("cleanup.policy").as_deref(),
            Some("compact,delete"),
            "v{v}"
        );
        assert_eq!(get("retention.ms").as_deref(), Some("3600001"), "v{v}");
        assert_eq!(get("segment.bytes").as_deref(), Some("67108864"), "v{v}");
    }
    for v in versions(ApiKey::CreatePartitions) {
        let mut t = create_partitions_request::CreatePartitionsTopic::default();
        t.name = name("t");
        t.count = 3 + i32::from(v);
        t.assignments = None;
        let mut req = CreatePartitionsRequest::default();
        req.topics = vec![t];
        req.timeout_ms = 10_000;
        let resp: CreatePartitionsResponse = c.call(ApiKey::CreatePartitions, v, &req).await;
        assert_eq!(resp.results[0].error_code, 0, "v{v}");
        assert_eq!(
            f.broker.get_stream("t").unwrap().partitions.len(),
            3 + v as usize
        );
    }
    for v in versions(ApiKey::ConsumerGroupHeartbeat) {
        let group = format!("kip848-{v}");
        let mut req = ConsumerGroupHeartbeatRequest::default();
        req.group_id = GroupId(text(&group));
        req.member_id = text(if v >= 1 { "client-made-id" } else { "" });
        req.member_epoch = 0;
        req.rebalance_timeout_ms = 30_000;
        req.subscribed_topic_names = Some(vec![name("t")]);
        req.topic_partitions = Some(vec![]);
        let r: ConsumerGroupHeartbeatResponse =
            c.call(ApiKey::ConsumerGroupHeartbeat, v, &req).await;
        assert_eq!(r.error_code, 0, "v{v}: {:?}", r.error_message);
        assert!(r.member_epoch > 0);
        let member = r.member_id.clone().unwrap();
        let assigned = &r.assignment.as_ref().unwrap().topic_partitions;
        assert_eq!(
            assigned[0].partitions.len(),
            f.broker.get_stream("t").unwrap().partitions.len(),
            "v{v}: the only member gets every partition"
        );
        for dv in versions(ApiKey::ConsumerGroupDescribe) {
            let mut d = ConsumerGroupDescribeRequest::default();
            d.group_ids = vec![GroupId(text(&group))];
            let resp: ConsumerGroupDescribeResponse =
                c.call(ApiKey::ConsumerGroupDescribe, dv, &d).await;
            assert_eq!(resp.groups[0].members.len(), 1);
        }
        // It commits as a member, then leaves.
        let mut part = offset_commit_request::OffsetCommitRequestPartition::default();
        part.partition_index = 1;
        part.committed_offset = 0;
        let mut t = offset_commit_request::OffsetCommitRequestTopic::default();
        t.name = name("t");
        t.partitions = vec![part];
        let mut commit = OffsetCommitRequest::default();
        commit.group_id = GroupId(text(&group));
        commit.generation_id_or_member_epoch = r.member_epoch;
        commit.member_id = member.clone();
        commit.topics = vec![t];
        let cr: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, 9, &commit).await;
        assert_eq!(cr.topics[0].partitions[0].error_code, 0);
        let mut leave = ConsumerGroupHeartbeatRequest::default();
        leave.group_id = GroupId(text(&group));
        leave.member_id = member;
        leave.member_epoch = -1;
        leave.subscribed_topic_names = None;
        leave.topic_partitions = None;
        let r: ConsumerGroupHeartbeatResponse =
            c.call(ApiKey::ConsumerGroupHeartbeat, v, &leave).await;
        assert_eq!((r.error_code, r.member_epoch), (0, -1));
    }
    for v in versions(ApiKey::DeleteGroups) {
        let mut req = DeleteGroupsRequest::default();
        req.groups_names = vec![GroupId(text("nobody"))];
        let r: DeleteGroupsResponse = c.call(ApiKey::DeleteGroups, v, &req).await;
        assert_eq!(
            r.results[0].error_code,
            kafka_protocol::ResponseError::GroupIdNotFound.code()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_batches_are_stored_uncompressed_with_their_records() {
    let f = start().await;
    create_stream(&f.broker, "z", 1).await;
    let mut c = Client::connect(f.addr).await;
    let mut at = 0;
    for codec in [
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let r: ProduceResponse = c
            .call(
                ApiKey::Produce,
                9,
                &produce_request("z", 0, batch(50, codec, (-1, -1, -1)), -1),
            )
            .await;
        let p = &r.responses[0].partition_responses[0];
        assert_eq!((p.error_code, p.base_offset), (0, at), "{codec:?}");
        at += 50;
    }
    let r: FetchResponse = c
        .call(
            ApiKey::Fetch,
            12,
            &fetch_request(12, "z", uuid::Uuid::nil(), 0),
        )
        .await;
    let sets =
        RecordBatchDecoder::decode_all(&mut r.responses[0].partitions[0].records.clone().unwrap())
            .unwrap();
    assert_eq!(sets.len(), 4);
    for (i, set) in sets.iter().enumerate() {
        assert_eq!(set.compression, Compression::None);
        assert_eq!(set.records.len(), 50);
        for (j, rec) in set.records.iter().enumerate() {
            assert_eq!(rec.offset, (i * 50 + j) as i64);
            assert_eq!(rec.value.as_deref(), Some(format!("value-{j}").as_bytes()));
            assert_eq!(
                rec.headers[&text("h")].as_deref(),
                Some(format!("v{j}").as_bytes())
            );
        }
    }
    // A batch whose CRC does not match is refused, and nothing is written.
    let mut bad = BytesMut::from(&batch(2, Compression::None, (-1, -1, -1))[..]);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let r: ProduceResponse = c
        .call(
            ApiKey::Produce,
            9,
            &produce_request("z", 0, bad.freeze(), -1),
        )
        .await;
    assert_eq!(
        r.responses[0].partition_responses[0].error_code,
        kafka_protocol::ResponseError::CorruptMessage.code()
    );
    assert_eq!(
        f.broker.get_stream("z").unwrap().partitions[0].end_offset,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producers_retry_is_answered_not_written_twice() {
    let f = start().await;
    create_stream(&f.broker, "i", 1).await;
    let mut c = Client::connect(f.addr).await;
    let mut init = InitProducerIdRequest::default();
    init.transactional_id = None;
    init.producer_id = ProducerId(-1);
    init.producer_epoch = -1;
    let id: InitProducerIdResponse = c.call(ApiKey::InitProducerId, 4, &init).await;
    let pid = (id.producer_id.0, id.producer_epoch);
    let first = batch(5, Compression::Lz4, (pid.0, pid.1, 0));
    let second = batch(5, Compression::None, (pid.0, pid.1, 5));
    let produce = |b: &Bytes| produce_request("i", 0, b.clone(), -1);
    let r1: ProduceResponse = c.call(ApiKey::Produce, 9, &produce(&first)).await;
    // Pipelined: the second batch and a retry of the first, on one connection.
    let f2 = c.frame(ApiKey::Produce, 9, &produce(&second));
    c.stream.write_all(&f2).await.unwrap();
    let r2: ProduceResponse = c.read_response(ApiKey::Produce, 9).await;
    let r3: ProduceResponse = c.call(ApiKey::Produce, 9, &produce(&first)).await;
    let base = |r: &ProduceResponse| {
        let p = &r.responses[0].partition_responses[0];
        (p.error_code, p.base_offset)
    };
    assert_eq!(base(&r1), (0, 0));
    assert_eq!(base(&r2), (0, 5));
    assert_eq!(
        base(&r3),
        (0, 0),
        "the retry is answered with the first append's offset"
    );
    // A gap in the sequence is refused.
    let gap = batch(1, Compression::None, (pid.0, pid.1, 42));
    let r4: ProduceResponse = c.call(ApiKey::Produce, 9, &produce(&gap)).await;
    assert_eq!(
        base(&r4).0,
        kafka_protocol::ResponseError::OutOfOrderSequenceNumber.code()
    );
    // From another connection too (a producer reconnecting).
    let mut c2 = Client::connect(f.addr).await;
    let r5: ProduceResponse = c2.call(ApiKey::Produce, 9, &produce(&second)).await;
    assert_eq!(base(&r5), (0, 5));
    assert_eq!(
        f.broker.get_stream("i").unwrap().partitions[0].end_offset,
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_hostile_request_closes_only_its_own_connection() {
    let f = start().await;
    create_stream(&f.broker, "m", 1).await;
    let mut healthy = Client::connect(f.addr).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an unknown API key", {
            let mut b = vec![0, 0, 0, 10, 0x7f, 0x00, 0, 0, 0, 0, 0, 1, 0xff, 0xff];
            b.truncate(14);
            b
        }),
        ("a negative size", vec![0xff, 0xff, 0xff, 0xf0]),
        (
            "a size over max_request_bytes",
            (200u32 << 20).to_be_bytes().to_vec(),
        ),
        ("a request cut short", {
            // Metadata v1 whose topic array says two billion entries, in 14 bytes: the
            // decoder must not try to make room for them.
            let mut b = BytesMut::new();
            b.put_i32(14);
            b.put_i16(3);
            b.put_i16(1);
            b.put_i32(9);
            b.put_i16(-1);
            b.put_i32(0x7fff_ffff);
            b.to_vec()
        }),
        ("an unsupported version", {
            let mut b = BytesMut::new();
            b.put_i32(10);
            b.put_i16(3);
            b.put_i16(99);
            b.put_i32(1);
            b.put_i16(-1);
            b.to_vec()
        }),
    ];
    for (what, bytes) in cases {
        let mut bad = Client::connect(f.addr).await;
        bad.stream.write_all(&bytes).await.unwrap();
        assert!(bad.closed().await, "{what}: the connection stays open");
        let mut all = MetadataRequest::default();
        all.topics = None;
        let r: MetadataResponse = healthy.call(ApiKey::Metadata, 9, &all).await;
        assert_eq!(r.topics.len(), 1, "{what}");
    }
    // ApiVersions at a version the broker does not serve is answered (KIP-511), at v0.
    let mut probe = Client::connect(f.addr).await;
    let mut frame = BytesMut::new();
    // Header version 2 (flexible), as a client sends for ApiVersions 3 and later.
    frame.put_i32(11);
    frame.put_i16(ApiKey::ApiVersions as i16);
    frame.put_i16(99);
    frame.put_i32(1);
    frame.put_i16(-1);
    frame.put_u8(0);
    probe.correlation = 1;
    probe.stream.write_all(&frame).await.unwrap();
    let r: ApiVersionsResponse = probe.read_response(ApiKey::ApiVersions, 0).await;
    assert_eq!(
        r.error_code,
        kafka_protocol::ResponseError::UnsupportedVersion.code()
    );
    assert!(!r.api_keys.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producers_retry_after_a_restart_is_not_written_twice() {
    let f = start().await;
    create_stream(&f.broker, "r", 1).await;
    let mut c = Client::connect(f.addr).await;
    let first = batch(4, Compression::Zstd, (4242, 3, 0));
    let r: ProduceResponse = c
        .call(
            ApiKey::Produce,
            9,
            &produce_request("r", 0, first.clone(), -1),
        )
        .await;
    assert_eq!(r.responses[0].partition_responses[0].base_offset, 0);
    // The server stops (its answer may not have reached the producer), and starts again.
    let Fixture {
        _dir: dir, broker, ..
    } = f;
    drop(c);
    tokio::task::spawn_blocking(move || broker.shutdown())
        .await
        .unwrap();
    let f = start_in(dir).await;
    let mut c = Client::connect(f.addr).await;
    let r: ProduceResponse = c
        .call(ApiKey::Produce, 9, &produce_request("r", 0, first, -1))
        .await;
    let p = &r.responses[0].partition_responses[0];
    assert_eq!(
        (p.error_code, p.base_offset),
        (0, 0),
        "the retry is the batch written before the restart"
    );
    let next = batch(1, Compression::None, (4242, 3, 4));
    let r: ProduceResponse = c
        .call(ApiKey::Produce, 9, &produce_request("r", 0, next, -1))
        .await;
    assert_eq!(
        r.responses[0].partition_responses[0].base_offset, 4,
        "the sequence goes on"
    );
    assert_eq!(
        f.broker.get_stream("r").unwrap().partitions[0].end_offset,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_consumer_reads_a_queue_as_a_one_partition_topic() {
    use tidewater_core::broker::NewMessage;
    let f = start().await;
    f.broker
        .put_queue("jobs", &tidewater_core::ConfigPatch::default())
        .await
        .unwrap();
    let messages: Vec<NewMessage> = (0..3)
        .map(|i| NewMessage {
            body: format!("job-{i}").into_bytes(),
            key: Some(format!("k{i}")),
            headers: vec![("trace".into(), format!("t{i}"))],
            ..NewMessage::default()
        })
        .collect();
    f.broker
        .publish("jobs", &messages, tidewater_core::AckLevel::Durable)
        .await
        .unwrap();
    let mut c = Client::connect(f.addr).await;
    // The queue is a topic when asked for by name (not among all topics).
    let mut req = MetadataRequest::default();
    let mut t = metadata_request::MetadataRequestTopic::default();
    t.name = Some(name("jobs"));
    req.topics = Some(vec![t]);
    let m: MetadataResponse = c.call(ApiKey::Metadata, 12, &req).await;
    assert_eq!(
        (m.topics[0].error_code, m.topics[0].partitions.len()),
        (0, 1)
    );
    let topic_id = m.topics[0].topic_id;
    let mut hb = ShareGroupHeartbeatRequest::default();
    hb.group_id = GroupId(text("workers"));
    hb.member_id = text("member-1");
    hb.member_epoch = 0;
    hb.subscribed_topic_names = Some(vec![name("jobs")]);
    let r: ShareGroupHeartbeatResponse = c.call(ApiKey::ShareGroupHeartbeat, 1, &hb).await;
    assert_eq!(r.error_code, 0, "{:?}", r.error_message);
    assert_eq!(r.assignment.unwrap().topic_partitions[0].topic_id, topic_id);
    let fetch = share_fetch("workers", "member-1", topic_id, 0);
    let r: ShareFetchResponse = c.call(ApiKey::ShareFetch, 1, &fetch).await;
    let p = &r.responses[0].partitions[0];
    let sets = RecordBatchDecoder::decode_all(&mut p.records.clone().unwrap()).unwrap();
    let records: Vec<&Record> = sets.iter().flat_map(|s| &s.records).collect();
    assert_eq!(records.len(), 3);
    assert_eq!(records[1].value.as_deref(), Some(&b"job-1"[..]));
    assert_eq!(records[1].key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(
        records[1].headers[&text("trace")].as_deref(),
        Some(&b"t1"[..])
    );
    let acquired: Vec<(i64, i64, i16)> = p
        .acquired_records
        .iter()
        .map(|a| (a.first_offset, a.last_offset, a.delivery_count))
        .collect();
    assert_eq!(acquired, vec![(records[0].offset, records[2].offset, 1)]);
    // Accept two, reject one: the queue is empty, its dead-letter queue holds one.
    let batch = |offset: i64, kind: i8| {
        let mut b = share_acknowledge_request::AcknowledgementBatch::default();
        b.first_offset = offset;
        b.last_offset = offset;
        b.acknowledge_types = vec![kind];
        b
    };
    let mut ack = ShareAcknowledgeRequest::default();
    ack.group_id = Some(GroupId(text("workers")));
    ack.member_id = Some(text("member-1"));
    ack.share_session_epoch = 1;
    let mut ap = share_acknowledge_request::AcknowledgePartition::default();
    ap.partition_index = 0;
    ap.acknowledgement_batches = vec![
        batch(records[0].offset, 1),
        batch(records[1].offset, 3),
        batch(records[2].offset, 1),
    ];
    let mut at = share_acknowledge_request::AcknowledgeTopic::default();
    at.topic_id = topic_id;
    at.partitions = vec![ap];
    ack.topics = vec![at];
    let r: ShareAcknowledgeResponse = c.call(ApiKey::ShareAcknowledge, 1, &ack).await;
    assert_eq!(
        r.responses[0].partitions[0].error_code, 0,
        "{:?}",
        r.responses[0].partitions[0].error_message
    );
    assert_eq!(f.broker.get_queue("jobs").unwrap().stats.depth, 0);
    assert_eq!(f.broker.get_queue("jobs-dlq").unwrap().stats.depth, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_protocol_member_waits_for_a_topic_made_later() {
    let f = start().await;
    let mut c = Client::connect(f.addr).await;
    let heartbeat = |epoch: i32, topics: Option<Vec<TopicName>>| {
        let mut hb = ConsumerGroupHeartbeatRequest::default();
        hb.group_id = GroupId(text("waiting"));
        hb.member_id = text("m-1");
        hb.member_epoch = epoch;
        hb.rebalance_timeout_ms = 30_000;
        hb.subscribed_topic_names = topics;
        hb.topic_partitions = Some(vec![]);
        hb
    };
    let r: ConsumerGroupHeartbeatResponse = c
        .call(
            ApiKey::ConsumerGroupHeartbeat,
            1,
            &heartbeat(0, Some(vec![name("later")])),
        )
        .await;
    assert_eq!(r.error_code, 0, "{:?}", r.error_message);
    let no_partitions = r
        .assignment
        .as_ref()
        .is_none_or(|a| a.topic_partitions.iter().all(|t| t.partitions.is_empty()));
    assert!(no_partitions, "nothing to assign yet");
    create_stream(&f.broker, "later", 2).await;
    // Maintenance (every 50 ms here) assigns the new stream's partitions.
    let mut assigned = 0;
    for _ in 0..100 {
        let r: ConsumerGroupHeartbeatResponse = c
            .call(
                ApiKey::ConsumerGroupHeartbeat,
                1,
                &heartbeat(r.member_epoch, None),
            )
            .await;
        assert_eq!(r.error_code, 0);
        if let Some(a) = &r.assignment {
            assigned = a.topic_partitions.iter().map(|t| t.partitions.len()).sum();
        }
        if assigned == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        assigned, 2,
        "the member gets the topic's partitions once it exists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_requests_are_handled_in_the_order_sent() {
    let f = start().await;
    create_stream(&f.broker, "o", 1).await;
    let mut c = Client::connect(f.addr).await;
    let r: ProduceResponse = c
        .call(
            ApiKey::Produce,
            9,
            &produce_request("o", 0, batch(50, Compression::None, (-1, -1, -1)), -1),
        )
        .await;
    assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
    let commit = |offset: i64| {
        let mut part = offset_commit_request::OffsetCommitRequestPartition::default();
        part.partition_index = 0;
        part.committed_offset = offset;
        let mut t = offset_commit_request::OffsetCommitRequestTopic::default();
        t.name = name("o");
        t.partitions = vec![part];
        let mut req = OffsetCommitRequest::default();
        req.group_id = GroupId(text("ordered"));
        req.generation_id_or_member_epoch = -1;
        req.topics = vec![t];
        req
    };
    // Many commits pipelined on one connection: the last one sent is the one that stays.
    let mut frames = BytesMut::new();
    for offset in 1..=50 {
        frames.extend_from_slice(&c.frame(ApiKey::OffsetCommit, 8, &commit(offset)));
    }
    c.stream.write_all(&frames).await.unwrap();
    let last = c.correlation;
    c.correlation -= 50;
    for _ in 0..50 {
        c.correlation += 1;
        let r: OffsetCommitResponse = c.read_response(ApiKey::OffsetCommit, 8).await;
        assert_eq!(r.topics[0].partitions[0].error_code, 0);
    }
    assert_eq!(c.correlation, last);
    assert_eq!(
        f.broker.committed("ordered", "o", 0).await.unwrap().offset,
        50
    );

    // A long-polling fetch, then a produce that would answer it, pipelined: the produce is
    // handled only once the fetch is done, so the fetch finds nothing (as in Kafka).
    let mut fetch = fetch_request(12, "o", uuid::Uuid::nil(), 50);
    fetch.max_wait_ms = 300;
    let mut frames = BytesMut::new();
    frames.extend_from_slice(&c.frame(ApiKey::Fetch, 12, &fetch));
    let produce = produce_request("o", 0, batch(1, Compression::None, (-1, -1, -1)), -1);
    frames.extend_from_slice(&c.frame(ApiKey::Produce, 9, &produce));
    c.stream.write_all(&frames).await.unwrap();
    c.correlation -= 1;
    let fetched: FetchResponse = c.read_response(ApiKey::Fetch, 12).await;
    c.correlation += 1;
    let produced: ProduceResponse = c.read_response(ApiKey::Produce, 9).await;
    let got = fetched.responses[0].partitions[0]
        .records
        .as_ref()
        .map_or(0, |r| r.len());
    assert_eq!(got, 0, "the fetch saw the produce sent after it");
    assert_eq!(produced.responses[0].partition_responses[0].base_offset, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_decompresses_within_its_bound_as_a_whole() {
    let f = start_with(tempfile::tempdir().unwrap(), |c| {
        c.max_uncompressed_produce_bytes = 2 << 20;
    })
    .await;
    create_stream(&f.broker, "z", 3).await;
    // One record of a MiB of zeros, zstd: a few hundred bytes on the wire.
    let big = |partition: i32| {
        let mut r = record(0, (-1, -1, -1));
        r.value = Some(Bytes::from(vec![0u8; 1 << 20]));
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &[r],
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::Zstd,
            },
        )
        .unwrap();
        let mut part = produce_request::PartitionProduceData::default();
        part.index = partition;
        part.records = Some(buf.freeze());
        part
    };
    let mut t = produce_request::TopicProduceData::default();
    t.name = name("z");
    t.partition_data = vec![big(0), big(1), big(2)];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 30_000;
    req.topic_data = vec![t];
    assert!(
        req.topic_data[0].partition_data[0]
            .records
            .as_ref()
            .unwrap()
            .len()
            < 64 << 10
    );
    let mut c = Client::connect(f.addr).await;
    let r: ProduceResponse = c.call(ApiKey::Produce, 9, &req).await;
    let codes: Vec<i16> = r.responses[0]
        .partition_responses
        .iter()
        .map(|p| p.error_code)
        .collect();
    // The first MiB fits, the second leaves the allowance a few bytes short, the third is
    // refused before it is made.
    assert_eq!(codes[0], 0);
    assert_eq!(
        codes[2],
        kafka_protocol::ResponseError::RecordListTooLarge.code()
    );
    let info = f.broker.get_stream("z").unwrap();
    assert_eq!(info.partitions[0].end_offset, 1);
    assert_eq!(
        info.partitions[2].end_offset, 0,
        "nothing of a refused partition is written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_fetch_held_back_by_the_dispatch_rate_tells_the_client_to_wait() {
    use tidewater_core::broker::NewMessage;
    let f = start().await;
    let patch = tidewater_core::ConfigPatch {
        dispatch_rate: Some(Some(tidewater_core::config::DispatchRate {
            per_s: 0.05,
            burst: 1,
        })),
        ..tidewater_core::ConfigPatch::default()
    };
    f.broker.put_queue("slow", &patch).await.unwrap();
    let messages: Vec<NewMessage> = (0..3)
        .map(|i| NewMessage {
            body: format!("m{i}").into_bytes(),
            ..NewMessage::default()
        })
        .collect();
    f.broker
        .publish("slow", &messages, tidewater_core::AckLevel::Durable)
        .await
        .unwrap();
    let mut c = Client::connect(f.addr).await;
    let mut hb = ShareGroupHeartbeatRequest::default();
    hb.group_id = GroupId(text("g"));
    hb.member_id = text("m");
    hb.subscribed_topic_names = Some(vec![name("slow")]);
    let r: ShareGroupHeartbeatResponse = c.call(ApiKey::ShareGroupHeartbeat, 1, &hb).await;
    let topic_id = r.assignment.unwrap().topic_partitions[0].topic_id;
    let fetch = |epoch: i32| share_fetch("g", "m", topic_id, epoch);
    let first: ShareFetchResponse = c.call(ApiKey::ShareFetch, 1, &fetch(0)).await;
    let got = first.responses[0].partitions[0].acquired_records.len();
    assert_eq!(got, 1, "the burst lets one through");
    let second: ShareFetchResponse = c.call(ApiKey::ShareFetch, 1, &fetch(1)).await;
    assert!(
        second.responses[0].partitions[0]
            .acquired_records
            .is_empty()
    );
    assert!(
        (1..=20_000).contains(&second.throttle_time_ms),
        "throttle_time_ms {} says when the rate lets the next one go",
        second.throttle_time_ms
    );
}

/// SASL/PLAIN `\0<id>\0<secret>`.
fn plain(id: &str, secret: &str) -> Bytes {
    Bytes::from(format!("\0{id}\0{secret}"))
}

/// A connection that authenticated with SASL/PLAIN (handshake v1, authenticate v2).
async fn sasl_plain(
    addr: SocketAddr,
    id: &str,
    secret: &str,
) -> (Client, SaslAuthenticateResponse) {
    let mut c = Client::connect(addr).await;
    let mut hs = SaslHandshakeRequest::default();
    hs.mechanism = text("PLAIN");
    let r: SaslHandshakeResponse = c.call(ApiKey::SaslHandshake, 1, &hs).await;
    assert_eq!(r.error_code, 0);
    assert!(
        r.mechanisms.iter().any(|m| &**m == "SCRAM-SHA-512"),
        "{r:?}"
    );
    let mut auth = SaslAuthenticateRequest::default();
    auth.auth_bytes = plain(id, secret);
    let r: SaslAuthenticateResponse = c.call(ApiKey::SaslAuthenticate, 2, &auth).await;
    (c, r)
}

/// SASL/OAUTHBEARER's client response (RFC 7628) as Kafka's clients send it.
fn bearer(token: &str) -> Bytes {
    Bytes::from(format!("n,,\x01auth=Bearer {token}\x01\x01"))
}

/// SASL on connection `c` with `mechanism` (handshake v1) and one authenticate (v2).
async fn sasl_once(c: &mut Client, mechanism: &str, bytes: Bytes) -> SaslAuthenticateResponse {
    let mut hs = SaslHandshakeRequest::default();
    hs.mechanism = text(mechanism);
    let r: SaslHandshakeResponse = c.call(ApiKey::SaslHandshake, 1, &hs).await;
    assert_eq!(r.error_code, 0, "{r:?}");
    let mut auth = SaslAuthenticateRequest::default();
    auth.auth_bytes = bytes;
    c.call(ApiKey::SaslAuthenticate, 2, &auth).await
}

/// OAUTHBEARER takes a bearer token as HTTP does (here an API key's); a credential that
/// expires gives the session its lifetime, and the client authenticates again on the same
/// connection (KIP-368) as the same principal, never another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauthbearer_takes_a_bearer_token_and_reauthentication_keeps_the_principal() {
    let guard = std::sync::Arc::new(tidewater_auth::Guard::new(true, 20, 600_000, 100, [9; 32]));
    let f = start_with(tempfile::tempdir().unwrap(), |c| c.auth = Some(guard)).await;
    create_stream(&f.broker, "t", 1).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut keys = Vec::new();
    for (principal, expires_at_ms) in [("alice", Some(now + 3_600_000)), ("bob", None)] {
        let made = f
            .broker
            .create_key(
                tidewater_auth::KeySpec {
                    principal: principal.into(),
                    expires_at_ms,
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        keys.push(format!("{}.{}", made.info.id, made.secret));
    }
    f.broker
        .grant(tidewater_auth::AclSpec {
            subject: tidewater_auth::Subject::Principal("alice".into()),
            resource: tidewater_auth::ResourceKind::Stream,
            name: "t".into(),
            matching: tidewater_auth::Match::Exact,
            operations: [tidewater_auth::Operation::Describe].into_iter().collect(),
        })
        .await
        .unwrap();
    let (alice, bob) = (&keys[0], &keys[1]);

    let mut c = Client::connect(f.addr).await;
    let r = sasl_once(&mut c, "OAUTHBEARER", bearer(alice)).await;
    assert_eq!(r.error_code, 0, "{r:?}");
    assert!(
        (3_500_000..=3_600_000).contains(&r.session_lifetime_ms),
        "the key's expiry is the session's: {}",
        r.session_lifetime_ms
    );
    let m: MetadataResponse = c.call(ApiKey::Metadata, 12, &metadata_of("t")).await;
    assert_eq!(m.topics[0].error_code, 0);
    // Again, as the same principal (any mechanism): the connection goes on.
    let r = sasl_once(&mut c, "OAUTHBEARER", bearer(alice)).await;
    assert_eq!(r.error_code, 0, "{r:?}");
    let m: MetadataResponse = c.call(ApiKey::Metadata, 12, &metadata_of("t")).await;
    assert_eq!(m.topics[0].error_code, 0);
    // Again as someone else: refused, and the connection closes at its next request.
    let r = sasl_once(&mut c, "OAUTHBEARER", bearer(bob)).await;
    assert_eq!(
        r.error_code,
        kafka_protocol::ResponseError::SaslAuthenticationFailed.code()
    );
    assert!(
        r.error_message
            .as_deref()
            .unwrap()
            .contains("keep the principal ('alice')"),
        "{r:?}"
    );
    let frame = c.frame(ApiKey::Metadata, 12, &metadata_of("t"));
    c.stream.write_all(&frame).await.unwrap();
    assert!(c.closed().await);

    // A key that does not expire: no lifetime. Bad messages and tokens: refused, saying why.
    let mut c = Client::connect(f.addr).await;
    let r = sasl_once(&mut c, "OAUTHBEARER", bearer(bob)).await;
    assert_eq!((r.error_code, r.session_lifetime_ms), (0, 0), "{r:?}");
    for (bytes, says) in [
        (Bytes::from_static(b"auth=Bearer x"), "no GS2 header"),
        (
            Bytes::from_static(b"n,,\x01auth=Bearer\x01\x01"),
            "no auth=Bearer",
        ),
        (Bytes::from_static(b"n,,\x01\x01"), "not \\x01-separated"),
        (bearer("twnobody.secret"), "invalid credentials"),
        (
            Bytes::from(format!("n,a=mallory,\x01auth=Bearer {alice}\x01\x01")),
            "authorization id",
        ),
    ] {
        let mut c = Client::connect(f.addr).await;
        let r = sasl_once(&mut c, "OAUTHBEARER", bytes.clone()).await;
        assert_eq!(
            r.error_code,
            kafka_protocol::ResponseError::SaslAuthenticationFailed.code(),
            "{bytes:?}"
        );
        let message = r.error_message.unwrap();
        assert!(message.contains(says), "{bytes:?}: {message}");
        assert!(
            !message.contains(alice.split_once('.').unwrap().1),
            "a secret in {message}"
        );
    }
}

fn metadata_of(topic: &str) -> MetadataRequest {
    let mut t = metadata_request::MetadataRequestTopic::default();
    t.name = Some(name(topic));
    let mut req = MetadataRequest::default();
    req.topics = Some(vec![t]);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_authenticates_and_grants_decide_what_each_request_may_do() {
    let guard = std::sync::Arc::new(tidewater_auth::Guard::new(true, 3, 600_000, 100, [9; 32]));
    let f = start_with(tempfile::tempdir().unwrap(), |c| c.auth = Some(guard)).await;
    create_stream(&f.broker, "t", 1).await;
    let key = f
        .broker
        .create_key(
            tidewater_auth::KeySpec {
                principal: "alice".into(),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    let id = key.info.id.clone();
    let grant =
        |resource: tidewater_auth::ResourceKind, name: &str, op: tidewater_auth::Operation| {
            tidewater_auth::AclSpec {
                subject: tidewater_auth::Subject::Principal("alice".into()),
                resource,
                name: name.into(),
                matching: tidewater_auth::Match::Exact,
                operations: [op].into_iter().collect(),
            }
        };
    use tidewater_auth::Operation::{Consume, Describe, Produce};
    use tidewater_auth::ResourceKind::{Group, Stream};

    // Without SASL: ApiVersions is answered, anything else closes the connection.
    let mut c = Client::connect(f.addr).await;
    let r: ApiVersionsResponse = c
        .call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())
        .await;
    assert!(
        r.api_keys
            .iter()
            .any(|k| k.api_key == ApiKey::SaslAuthenticate as i16)
    );
    let frame = c.frame(ApiKey::Metadata, 12, &metadata_of("t"));
    c.stream.write_all(&frame).await.unwrap();
    assert!(
        c.closed().await,
        "a request before SASL must close the connection"
    );

    // A wrong secret: refused, and the connection closes at its next request.
    let (mut c, r) = sasl_plain(f.addr, &id, "not-the-secret").await;
    assert_eq!(
        r.error_code,
        kafka_protocol::ResponseError::SaslAuthenticationFailed.code()
    );
    let frame = c.frame(ApiKey::Metadata, 12, &metadata_of("t"));
    c.stream.write_all(&frame).await.unwrap();
    assert!(c.closed().await);

    // The right one: in, but nothing is granted yet.
    let (mut c, r) = sasl_plain(f.addr, &id, &key.secret).await;
    assert_eq!(r.error_code, 0, "{r:?}");
    let topic_denied = kafka_protocol::ResponseError::TopicAuthorizationFailed.code();
    let group_denied = kafka_protocol::ResponseError::GroupAuthorizationFailed.code();
    let m: MetadataResponse = c.call(ApiKey::Metadata, 12, &metadata_of("t")).await;
    assert_eq!(m.topics[0].error_code, topic_denied);
    let m: MetadataResponse = c
        .call(ApiKey::Metadata, 12, &MetadataRequest::default())
        .await;
    assert!(m.topics.is_empty(), "listed a topic not granted: {m:?}");
    let produce = || produce_request("t", 0, batch(2, Compression::None, (-1, -1, -1)), -1);
    let p: ProduceResponse = c.call(ApiKey::Produce, 9, &produce()).await;
    assert_eq!(
        p.responses[0].partition_responses[0].error_code,
        topic_denied
    );

    // Granted on the open connection: applies to its next request.
    f.broker.grant(grant(Stream, "t", Produce)).await.unwrap();
    let p: ProduceResponse = c.call(ApiKey::Produce, 9, &produce()).await;
    assert_eq!(p.responses[0].partition_responses[0].error_code, 0);
    // A record naming another tenant needs set_tenant.
    let mut spoofed = record(0, (-1, -1, -1));
    spoofed
        .headers
        .insert(text("tidewater-tenant"), Some(Bytes::from_static(b"acme")));
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &[spoofed],
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    let p: ProduceResponse = c
        .call(
            ApiKey::Produce,
            9,
            &produce_request("t", 0, buf.freeze(), -1),
        )
        .await;
    assert_eq!(
        p.responses[0].partition_responses[0].error_code,
        topic_denied
    );
    let m: MetadataResponse = c.call(ApiKey::Metadata, 12, &metadata_of("t")).await;
    assert_eq!(m.topics[0].error_code, 0, "produce implies describe");
    let fetched: FetchResponse = c
        .call(
            ApiKey::Fetch,
            12,
            &fetch_request(12, "t", uuid::Uuid::nil(), 0),
        )
        .await;
    assert_eq!(fetched.responses[0].partitions[0].error_code, topic_denied);
    f.broker.grant(grant(Stream, "t", Consume)).await.unwrap();
    let fetched: FetchResponse = c
        .call(
            ApiKey::Fetch,
            12,
            &fetch_request(12, "t", uuid::Uuid::nil(), 0),
        )
        .await;
    assert_eq!(fetched.responses[0].partitions[0].error_code, 0);

    // Groups: denied until granted.
    let mut find = FindCoordinatorRequest::default();
    find.key = text("g");
    let r: FindCoordinatorResponse = c.call(ApiKey::FindCoordinator, 3, &find).await;
    assert_eq!(r.error_code, group_denied);
    let mut commit = OffsetCommitRequest::default();
    commit.group_id = GroupId(text("g"));
    commit.generation_id_or_member_epoch = -1;
    let mut cp = offset_commit_request::OffsetCommitRequestPartition::default();
    cp.partition_index = 0;
    cp.committed_offset = 1;
    let mut ct = offset_commit_request::OffsetCommitRequestTopic::default();
    ct.name = name("t");
    ct.partitions = vec![cp];
    commit.topics = vec![ct];
    let r: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, 8, &commit).await;
    assert_eq!(r.topics[0].partitions[0].error_code, group_denied);
    f.broker.grant(grant(Group, "g", Consume)).await.unwrap();
    let r: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, 8, &commit).await;
    assert_eq!(r.topics[0].partitions[0].error_code, 0);
    let r: FindCoordinatorResponse = c.call(ApiKey::FindCoordinator, 3, &find).await;
    assert_eq!(r.error_code, 0, "consume implies describe");
    let mut describe = DescribeGroupsRequest::default();
    describe.groups = vec![GroupId(text("g")), GroupId(text("other"))];
    let r: DescribeGroupsResponse = c.call(ApiKey::DescribeGroups, 5, &describe).await;
    assert_eq!(r.groups[0].error_code, 0);
    assert_eq!(r.groups[1].error_code, group_denied);
    let _ = Describe;

    // Admin calls need admin.
    let mut create = CreateTopicsRequest::default();
    let mut ct = create_topics_request::CreatableTopic::default();
    ct.name = name("u");
    ct.num_partitions = 1;
    ct.replication_factor = 1;
    create.topics = vec![ct];
    let r: CreateTopicsResponse = c.call(ApiKey::CreateTopics, 7, &create).await;
    assert_eq!(r.topics[0].error_code, topic_denied);

    // The key revoked: the connection closes at its next request.
    f.broker.revoke_key(&id).await.unwrap();
    let frame = c.frame(ApiKey::Metadata, 12, &metadata_of("t"));
    c.stream.write_all(&frame).await.unwrap();
    assert!(c.closed().await, "a revoked key's connection must close");
    let (_, r) = sasl_plain(f.addr, &id, &key.secret).await;
    assert_eq!(
        r.error_code,
        kafka_protocol::ResponseError::SaslAuthenticationFailed.code()
    );
}

/// One request of each API the table test sends, aimed at stream `t`, group `g`,
/// consumer-protocol group `k`, share group `s` (share topic `t`), topic id `id`; the
/// response's Debug text. Panics for an API with no entry: a new API makes the table test
/// fail until it says what to send.
async fn any_request(c: &mut Client, api: ApiKey, id: uuid::Uuid, send_only: bool) -> String {
    let v = *versions(api).end();
    macro_rules! call {
        ($req:expr, $resp:ty) => {{
            if send_only {
                let frame = c.frame(api, v, &$req);
                c.stream.write_all(&frame).await.unwrap();
                return String::new();
            }
            let r: $resp = c.call(api, v, &$req).await;
            format!("{r:?}")
        }};
    }
    match api {
        ApiKey::Produce => call!(
            produce_request("t", 0, batch(1, Compression::None, (-1, -1, -1)), -1),
            ProduceResponse
        ),
        ApiKey::Fetch => call!(fetch_request(v, "t", id, 0), FetchResponse),
        ApiKey::ListOffsets => {
            let mut p = list_offsets_request::ListOffsetsPartition::default();
            p.timestamp = -1;
            let mut t = list_offsets_request::ListOffsetsTopic::default();
            t.name = name("t");
            t.partitions = vec![p];
            let mut req = ListOffsetsRequest::default();
            req.replica_id = BrokerId(-1);
            req.topics = vec![t];
            call!(req, ListOffsetsResponse)
        }
        ApiKey::Metadata => call!(metadata_of("t"), MetadataResponse),
        ApiKey::OffsetCommit => {
            let mut p = offset_commit_request::OffsetCommitRequestPartition::default();
            p.committed_offset = 0;
            let mut t = offset_commit_request::OffsetCommitRequestTopic::default();
            t.name = name("t");
            t.partitions = vec![p];
            let mut req = OffsetCommitRequest::default();
            req.group_id = GroupId(text("g"));
            req.generation_id_or_member_epoch = -1;
            req.topics = vec![t];
            call!(req, OffsetCommitResponse)
        }
        ApiKey::OffsetFetch => {
            let mut g = offset_fetch_request::OffsetFetchRequestGroup::default();
            g.group_id = GroupId(text("g"));
            g.topics = None;
            let mut req = OffsetFetchRequest::default();
            req.groups = vec![g];
            call!(req, OffsetFetchResponse)
        }
        ApiKey::FindCoordinator => {
            let mut req = FindCoordinatorRequest::default();
            req.coordinator_keys = vec![text("g")];
            call!(req, FindCoordinatorResponse)
        }
        ApiKey::JoinGroup => {
            let mut req = JoinGroupRequest::default();
            req.group_id = GroupId(text("g"));
            req.session_timeout_ms = 10_000;
            req.rebalance_timeout_ms = 10_000;
            req.protocol_type = text("consumer");
            let mut p = join_group_request::JoinGroupRequestProtocol::default();
            p.name = text("range");
            req.protocols = vec![p];
            call!(req, JoinGroupResponse)
        }
        ApiKey::SyncGroup => {
            let mut req = SyncGroupRequest::default();
            req.group_id = GroupId(text("g"));
            req.generation_id = 1;
            req.member_id = text("m");
            call!(req, SyncGroupResponse)
        }
        ApiKey::Heartbeat => {
            let mut req = HeartbeatRequest::default();
            req.group_id = GroupId(text("g"));
            req.member_id = text("m");
            call!(req, HeartbeatResponse)
        }
        ApiKey::LeaveGroup => {
            let mut req = LeaveGroupRequest::default();
            req.group_id = GroupId(text("g"));
            let mut m = leave_group_request::MemberIdentity::default();
            m.member_id = text("m");
            req.members = vec![m];
            call!(req, LeaveGroupResponse)
        }
        ApiKey::ListGroups => call!(ListGroupsRequest::default(), ListGroupsResponse),
        ApiKey::DescribeGroups => {
            let mut req = DescribeGroupsRequest::default();
            req.groups = vec![GroupId(text("g"))];
            call!(req, DescribeGroupsResponse)
        }
        ApiKey::DeleteGroups => {
            let mut req = DeleteGroupsRequest::default();
            req.groups_names = vec![GroupId(text("gone"))];
            call!(req, DeleteGroupsResponse)
        }
        ApiKey::OffsetDelete => {
            let mut p = offset_delete_request::OffsetDeleteRequestPartition::default();
            p.partition_index = 0;
            let mut t = offset_delete_request::OffsetDeleteRequestTopic::default();
            t.name = name("t");
            t.partitions = vec![p];
            let mut req = OffsetDeleteRequest::default();
            req.group_id = GroupId(text("gone"));
            req.topics = vec![t];
            call!(req, OffsetDeleteResponse)
        }
        ApiKey::CreateTopics => {
            let mut t = create_topics_request::CreatableTopic::default();
            t.name = name("made");
            t.num_partitions = 1;
            t.replication_factor = -1;
            let mut req = CreateTopicsRequest::default();
            req.topics = vec![t];
            req.validate_only = true;
            call!(req, CreateTopicsResponse)
        }
        ApiKey::DeleteTopics => {
            let mut t = delete_topics_request::DeleteTopicState::default();
            t.name = Some(name("doomed"));
            let mut req = DeleteTopicsRequest::default();
            req.topics = vec![t];
            call!(req, DeleteTopicsResponse)
        }
        ApiKey::InitProducerId => {
            let mut req = InitProducerIdRequest::default();
            req.transaction_timeout_ms = 60_000;
            req.producer_id = ProducerId(-1);
            req.producer_epoch = -1;
            call!(req, InitProducerIdResponse)
        }
        ApiKey::DescribeCluster => {
            call!(DescribeClusterRequest::default(), DescribeClusterResponse)
        }
        ApiKey::DescribeConfigs => {
            let mut r = describe_configs_request::DescribeConfigsResource::default();
            r.resource_type = 2;
            r.resource_name = text("t");
            let mut req = DescribeConfigsRequest::default();
            req.resources = vec![r];
            call!(req, DescribeConfigsResponse)
        }
        ApiKey::IncrementalAlterConfigs => {
            let mut r = incremental_alter_configs_request::AlterConfigsResource::default();
            r.resource_type = 2;
            r.resource_name = text("t");
            let mut req = IncrementalAlterConfigsRequest::default();
            req.resources = vec![r];
            req.validate_only = true;
            call!(req, IncrementalAlterConfigsResponse)
        }
        ApiKey::CreatePartitions => {
            let mut t = create_partitions_request::CreatePartitionsTopic::default();
            t.name = name("t");
            t.count = 2;
            t.assignments = None;
            let mut req = CreatePartitionsRequest::default();
            req.topics = vec![t];
            req.validate_only = true;
            call!(req, CreatePartitionsResponse)
        }
        ApiKey::ConsumerGroupHeartbeat => {
            let mut req = ConsumerGroupHeartbeatRequest::default();
            req.group_id = GroupId(text("k"));
            req.member_id = text("kip848-member");
            req.rebalance_timeout_ms = 30_000;
            req.subscribed_topic_names = Some(vec![name("t")]);
            req.topic_partitions = Some(vec![]);
            call!(req, ConsumerGroupHeartbeatResponse)
        }
        ApiKey::ConsumerGroupDescribe => {
            let mut req = ConsumerGroupDescribeRequest::default();
            req.group_ids = vec![GroupId(text("k"))];
            call!(req, ConsumerGroupDescribeResponse)
        }
        ApiKey::ShareGroupHeartbeat => {
            let mut req = ShareGroupHeartbeatRequest::default();
            req.group_id = GroupId(text("s"));
            req.member_id = text("share-member");
            req.subscribed_topic_names = Some(vec![name("t")]);
            call!(req, ShareGroupHeartbeatResponse)
        }
        ApiKey::ShareGroupDescribe => {
            let mut req = ShareGroupDescribeRequest::default();
            req.group_ids = vec![GroupId(text("s"))];
            call!(req, ShareGroupDescribeResponse)
        }
        ApiKey::ShareFetch => call!(share_fetch("s", "share-member", id, 0), ShareFetchResponse),
        ApiKey::ShareAcknowledge => {
            let mut req = ShareAcknowledgeRequest::default();
            req.group_id = Some(GroupId(text("s")));
            req.member_id = Some(text("share-member"));
            req.share_session_epoch = 1;
            let mut t = share_acknowledge_request::AcknowledgeTopic::default();
            t.topic_id = id;
            req.topics = vec![t];
            call!(req, ShareAcknowledgeResponse)
        }
        ApiKey::DescribeShareGroupOffsets => {
            let mut g = describe_share_group_offsets_request::DescribeShareGroupOffsetsRequestGroup::default();
            g.group_id = GroupId(text("s"));
            let mut req = DescribeShareGroupOffsetsRequest::default();
            req.groups = vec![g];
            call!(req, DescribeShareGroupOffsetsResponse)
        }
        other => panic!("{other:?} has no entry in the table test: say what it sends"),
    }
}

/// Whether a response carries one of Kafka's authorization failures (29, 30, 31).
fn denied(debug: &str) -> bool {
    ["error_code: 29", "error_code: 30", "error_code: 31"]
        .iter()
        .any(|code| debug.contains(code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kafka_request_is_refused_without_sasl_and_without_grants_and_allowed_with_them() {
    let guard = std::sync::Arc::new(tidewater_auth::Guard::new(true, 100, 1, 100, [9; 32]));
    let f = start_with(tempfile::tempdir().unwrap(), |c| c.auth = Some(guard)).await;
    create_stream(&f.broker, "t", 1).await;
    create_stream(&f.broker, "doomed", 1).await;
    let key = |principal: &str| {
        let broker = f.broker.clone();
        let principal = principal.to_string();
        async move {
            broker
                .create_key(
                    tidewater_auth::KeySpec {
                        principal,
                        ..Default::default()
                    },
                    None,
                )
                .await
                .unwrap()
        }
    };
    let nobody = key("nobody").await;
    let root = key("root").await;
    f.broker
        .grant(tidewater_auth::AclSpec {
            subject: tidewater_auth::Subject::Principal("root".into()),
            resource: tidewater_auth::ResourceKind::Any,
            name: "*".into(),
            matching: tidewater_auth::Match::Glob,
            operations: tidewater_auth::Operation::ALL.into_iter().collect(),
        })
        .await
        .unwrap();
    let (mut granted, r) = sasl_plain(f.addr, &root.info.id, &root.secret).await;
    assert_eq!(r.error_code, 0);
    let m: MetadataResponse = granted.call(ApiKey::Metadata, 12, &metadata_of("t")).await;
    let id = m.topics[0].topic_id;
    let (mut refused, r) = sasl_plain(f.addr, &nobody.info.id, &nobody.secret).await;
    assert_eq!(r.error_code, 0);
    let free = [
        ApiKey::ApiVersions,
        ApiKey::SaslHandshake,
        ApiKey::SaslAuthenticate,
    ];
    // Answered to anyone authenticated: no resource of its own (ListGroups lists what may
    // be described; InitProducerId hands out an id).
    let open = [ApiKey::ListGroups, ApiKey::InitProducerId];
    let mut checked = 0;
    for &(api, _, _) in SUPPORTED {
        if free.contains(&api) {
            continue;
        }
        // Without SASL: the connection closes.
        let mut anonymous = Client::connect(f.addr).await;
        any_request(&mut anonymous, api, id, true).await;
        assert!(
            anonymous.closed().await,
            "{api:?} before SASL: the connection stays open"
        );
        let without = any_request(&mut refused, api, id, false).await;
        let with = any_request(&mut granted, api, id, false).await;
        assert!(!denied(&with), "{api:?} with every grant: {with}");
        if open.contains(&api) {
            assert!(!denied(&without), "{api:?}: {without}");
        } else {
            assert!(
                denied(&without),
                "{api:?} without a grant answered no authorization failure: {without}"
            );
        }
        checked += 1;
    }
    assert_eq!(
        checked,
        SUPPORTED.len() - free.len(),
        "every API but ApiVersions and SASL's is checked"
    );
    // What ListGroups shows: only the groups one may describe.
    let mine: ListGroupsResponse = granted
        .call(ApiKey::ListGroups, 5, &ListGroupsRequest::default())
        .await;
    assert!(!mine.groups.is_empty());
    let theirs: ListGroupsResponse = refused
        .call(ApiKey::ListGroups, 5, &ListGroupsRequest::default())
        .await;
    assert!(theirs.groups.is_empty(), "{theirs:?}");
}
