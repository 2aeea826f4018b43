"""Kafka protocol tests with confluent-kafka (librdkafka), against any Kafka-compatible broker.

Run through scripts/kafka-clients-test (which uses target/kafka/venv), or directly:
    KAFKA_BOOTSTRAP=127.0.0.1:9092 target/kafka/venv/bin/pytest -v tests/kafka/test_confluent.py

Environment:
  KAFKA_BOOTSTRAP        bootstrap address (default 127.0.0.1:9092)
  KAFKA_PROXY_TARGET     for test_idempotent_producer_through_cutting_proxy: a broker listener
  KAFKA_PROXY_LISTEN     (host:port) that advertises KAFKA_PROXY_LISTEN in Metadata and
                         FindCoordinator; the test runs a TCP proxy on KAFKA_PROXY_LISTEN that
                         forwards to KAFKA_PROXY_TARGET and cuts connections mid-request. Kafka
                         clients connect to the advertised address, not the bootstrap one, so a
                         proxy only stays in the path if the broker advertises it. Unset: the
                         test is skipped (loudly).
  KAFKA_EXPECT_COMPACTION=1  the compaction test also requires that older values per key get
                         removed within its deadline (set for real Kafka, whose cleaner is run
                         with log.cleaner.backoff.ms=500 by the suite runner)
  KAFKA_TEST_RECORDS     records in the big group test (default 100000)

Every test creates its own uniquely named topics with CreateTopics and deletes them at the end.
"""

import os
import socket
import threading
import time
import uuid

import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
    OFFSET_BEGINNING,
)
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    OffsetSpec,
)

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
RECORDS = int(os.environ.get("KAFKA_TEST_RECORDS", "100000"))
PAD = b"x" * 40


def uniq(name):
    return f"tw-py-{name}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def admin():
    return AdminClient({"bootstrap.servers": BOOTSTRAP})


def create_topic(admin, name, partitions, config=None):
    fut = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
        operation_timeout=30,
        request_timeout=30,
    )
    fut[name].result()
    # wait until the metadata shows every partition with a leader
    deadline = time.time() + 30
    while time.time() < deadline:
        md = admin.list_topics(name, timeout=10).topics.get(name)
        if md and md.error is None and len(md.partitions) == partitions and all(
            p.leader >= 0 for p in md.partitions.values()
        ):
            return name
        time.sleep(0.1)
    raise AssertionError(f"topic {name} not ready with {partitions} partitions after 30 s")


def delete_topic(admin, name):
    try:
        admin.delete_topics([name], operation_timeout=30)[name].result()
    except KafkaException:
        pass


@pytest.fixture
def topic_factory(admin):
    made = []

    def make(name, partitions, config=None):
        t = create_topic(admin, uniq(name), partitions, config)
        made.append(t)
        return t

    yield make
    for t in made:
        delete_topic(admin, t)


def rec(i):
    return (
        f"key-{i}".encode(),
        f"value-{i}-".encode() + PAD,
        [("i", str(i).encode()), ("src", b"confluent"), ("empty", b"")],
    )


def check_rec(msg):
    """Returns the index i of a record produced by rec(i), asserting key, value and headers."""
    key = msg.key()
    assert key is not None and key.startswith(b"key-"), f"bad key {key!r}"
    i = int(key[4:])
    k, v, h = rec(i)
    assert msg.value() == v, f"value mismatch for {key!r}: {msg.value()!r}"
    got_h = [(n, b"" if x is None else x) for n, x in (msg.headers() or [])]
    assert got_h == h, f"headers mismatch for {key!r}: {got_h!r}"
    return i


class DeliveryTracker:
    def __init__(self):
        self.ok = 0
        self.errors = []
        self.offsets = {}

    def cb(self, err, msg):
        if err is not None:
            self.errors.append(err)
        else:
            self.ok += 1


def produce_records(topic, n, extra_conf, start=0, partitions=None):
    conf = {
        "bootstrap.servers": BOOTSTRAP,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 2000,
        "queue.buffering.max.messages": 200000,
    }
    conf.update(extra_conf)
    p = Producer(conf)
    t = DeliveryTracker()
    for i in range(start, start + n):
        k, v, h = rec(i)
        while True:
            try:
                if partitions:
                    p.produce(topic, v, k, partition=i % partitions, headers=h, on_delivery=t.cb)
                else:
                    p.produce(topic, v, k, headers=h, on_delivery=t.cb)
                break
            except BufferError:
                p.poll(0.05)
        if i % 1000 == 0:
            p.poll(0)
    left = p.flush(60)
    assert left == 0, f"{left} records not delivered after 60 s"
    assert not t.errors, f"delivery errors: {t.errors[:5]}"
    assert t.ok == n, f"{t.ok} delivery reports, expected {n}"
    return t


def read_all(topic, partitions, expect, timeout=60, conf=None):
    """Reads every partition from the beginning (assign, no group) until `expect` records."""
    c = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": uniq("reader"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **(conf or {}),
        }
    )
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    out = []
    deadline = time.time() + timeout
    while len(out) < expect and time.time() < deadline:
        for m in c.consume(1000, 0.5):
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consume error: {m.error()}")
            out.append(m)
    # a short extra poll: anything past `expect` is a duplicate
    for m in c.consume(1000, 0.5):
        if not m.error():
            out.append(m)
    c.close()
    return out


def end_offsets(admin, topic, partitions):
    fut = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)})
    return {tp.partition: f.result().offset for tp, f in fut.items()}


# --------------------------------------------------------------------------------------------
# 1. 100k records, lz4, consumer group of three with one leaving half-way, lag 0 at the end
# --------------------------------------------------------------------------------------------


def run_group(topic, partitions, total, group_protocol):
    group = uniq("group")
    common = {
        "bootstrap.servers": BOOTSTRAP,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "group.protocol": group_protocol,
    }
    if group_protocol == "classic":
        common.update({"session.timeout.ms": 10000, "heartbeat.interval.ms": 1000})
    members = []
    events = []

    # delivery log: (partition, offset) -> list of [member, committed_ok]
    deliveries = {}
    seen = set()

    def make(name):
        c = Consumer({**common, "client.id": name})

        def on_assign(cons, parts):
            events.append((name, "assign", sorted(p.partition for p in parts)))

        def on_revoke(cons, parts):
            events.append((name, "revoke", sorted(p.partition for p in parts)))

        c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        return c

    for n in range(3):
        members.append((f"m{n}", make(f"m{n}")))

    # Wait until every member owns partitions (records polled meanwhile are processed as usual,
    # one per member per turn), so the member that leaves half-way really hands work over.
    warm_deadline = time.time() + 30
    warm = True

    deadline = time.time() + 150
    closed_one = False
    while len(seen) < total:
        assert time.time() < deadline, (
            f"group consumed only {len(seen)} of {total} distinct records in 150 s; events {events}"
        )
        if warm and all(c.assignment() for _, c in members):
            warm = False
            events.append(("all", "assigned", len(seen)))
        if warm and time.time() > warm_deadline:
            raise AssertionError(
                f"not every member of the group got partitions in 30 s: "
                f"{[(n, [p.partition for p in c.assignment()]) for n, c in members]}; events {events}"
            )
        for name, c in list(members):
            msgs = c.consume(1 if warm else 500, 0.05)
            batch = []
            for m in msgs:
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise AssertionError(f"{name}: consume error {m.error()}")
                check_rec(m)
                key = (m.partition(), m.offset())
                entry = [name, False]
                deliveries.setdefault(key, []).append(entry)
                seen.add(key)
                batch.append((m, entry))
            if batch:
                hi = {}
                for m, _ in batch:
                    hi[m.partition()] = max(hi.get(m.partition(), -1), m.offset())
                ok = True
                try:
                    c.commit(
                        offsets=[TopicPartition(topic, p, o + 1) for p, o in hi.items()],
                        asynchronous=False,
                    )
                except KafkaException as e:
                    ok = False
                    events.append((name, "commit-failed", str(e)))
                for _, entry in batch:
                    entry[1] = ok
            if not closed_one and not warm and len(seen) >= total // 2 and name == "m1":
                # m1 leaves the group half-way: a rebalance hands its partitions to the others
                c.close()
                members.remove((name, c))
                events.append((name, "closed", len(seen)))
                closed_one = True
    for _, c in members:
        c.close()

    assert closed_one
    # exactly once in the group sense: a record whose commit succeeded is never redelivered
    redelivered = 0
    for key, ds in deliveries.items():
        for d in ds[:-1]:
            assert not d[1], f"record {key} redelivered after a successful commit: {ds}"
        redelivered += len(ds) - 1
    assert len(seen) == total
    print(f"group {group_protocol}: {total} records, {redelivered} redelivered (uncommitted), events: {events}")
    return group


def check_lag_zero(admin, topic, partitions, group):
    ends = end_offsets(admin, topic, partitions)
    fresh = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": group, "enable.auto.commit": False})
    committed = fresh.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
    wm = {p: fresh.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in range(partitions)}
    fresh.close()
    got = {tp.partition: tp.offset for tp in committed}
    assert got == ends, f"committed {got} != end offsets {ends}"
    assert {p: hi for p, (lo, hi) in wm.items()} == ends, f"watermarks {wm} != end offsets {ends}"
    assert all(lo == 0 for lo, hi in wm.values()), f"low watermarks {wm}"
    return ends


def test_group_100k_lz4(admin, topic_factory):
    parts = 6
    topic = topic_factory("group-lz4", parts)
    t0 = time.time()
    produce_records(topic, RECORDS, {"compression.type": "lz4"})
    t1 = time.time()
    ends = end_offsets(admin, topic, parts)
    assert sum(ends.values()) == RECORDS, f"end offsets {ends} sum != {RECORDS}"
    assert sum(1 for v in ends.values() if v > 0) == parts, f"not spread over {parts} partitions: {ends}"
    group = run_group(topic, parts, RECORDS, "classic")
    t2 = time.time()
    check_lag_zero(admin, topic, parts, group)
    # the group is visible through the admin API too, with the same offsets
    res = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result()
    adm = {tp.partition: tp.offset for tp in res.topic_partitions if tp.topic == topic}
    assert adm == ends, f"admin list_consumer_group_offsets {adm} != {ends}"
    print(f"produce {RECORDS} lz4: {t1 - t0:.1f} s; group consume: {t2 - t1:.1f} s")


def test_group_kip848_consumer_protocol(admin, topic_factory):
    """The same group flow on the new consumer group protocol (KIP-848, ConsumerGroupHeartbeat)."""
    parts = 4
    n = 10000
    topic = topic_factory("group-848", parts)
    produce_records(topic, n, {"compression.type": "lz4"})
    group = run_group(topic, parts, n, "consumer")
    check_lag_zero(admin, topic, parts, group)


@pytest.mark.parametrize("codec", ["gzip", "snappy", "zstd", "none"])
def test_compression_codecs(topic_factory, codec):
    parts = 3
    n = 5000
    topic = topic_factory(f"codec-{codec}", parts)
    produce_records(topic, n, {"compression.type": codec})
    msgs = read_all(topic, parts, n)
    idx = sorted(check_rec(m) for m in msgs)
    assert idx == list(range(n)), f"{codec}: read {len(idx)} records, expected 0..{n - 1} once each"


@pytest.mark.parametrize("acks", ["0", "1"])
def test_acks_0_and_1(topic_factory, acks):
    parts = 3
    n = 2000
    topic = topic_factory(f"acks{acks}", parts)
    # acks=0 has no error path: a record sent before the new partition's leader is ready on the
    # broker is silently dropped (Kafka closes the connection on NOT_LEADER_OR_FOLLOWER). So first
    # write one acks=all record per partition, which retries until every partition is writable.
    w = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all"})
    for part in range(parts):
        w.produce(topic, b"warm", b"warm", partition=part)
    assert w.flush(30) == 0, "warm-up records not acknowledged in 30 s"
    produce_records(topic, n, {"acks": acks}, partitions=parts)
    msgs = [m for m in read_all(topic, parts, n + parts, timeout=30) if m.key() != b"warm"]
    idx = sorted(check_rec(m) for m in msgs)
    assert idx == list(range(n)), f"acks={acks}: read back {len(idx)} of {n}"
    if acks == "1":
        # with acks>=1 the delivery report carries the offset; partition p got i = p, p+3, ...
        for m in msgs:
            assert m.partition() == check_rec(m) % parts


# --------------------------------------------------------------------------------------------
# 2. idempotent producer through a proxy that cuts connections after the request went through
# --------------------------------------------------------------------------------------------


class CuttingProxy:
    """TCP proxy that, a few times, lets a client->broker request through and then drops the
    connection (RST) instead of relaying the broker's response: the broker has appended the
    batch, the client has no ack, and retries. An idempotent producer must not duplicate."""

    def __init__(self, listen, target, cut_after_bytes, max_cuts):
        self.listen = listen
        self.target = target
        self.cut_after = cut_after_bytes
        self.max_cuts = max_cuts
        self.cuts = 0
        self.connections = 0
        self.lock = threading.Lock()
        self.stop = False
        host, port = listen.rsplit(":", 1)
        self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((host, int(port)))
        self.srv.listen(64)
        self.srv.settimeout(0.2)
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.srv.close()

    def accept_loop(self):
        while not self.stop:
            try:
                cli, _ = self.srv.accept()
            except socket.timeout:
                continue
            host, port = self.target.rsplit(":", 1)
            try:
                up = socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                cli.close()
                continue
            up.settimeout(None)
            with self.lock:
                self.connections += 1
            state = {"up_bytes": 0, "armed": False, "dead": False}
            threading.Thread(target=self.pump, args=(cli, up, state, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(up, cli, state, False), daemon=True).start()

    def kill(self, a, b, state):
        state["dead"] = True
        for s in (a, b):
            # shutdown() wakes the other pump thread blocked in recv(); close() alone would not
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def pump(self, src, dst, state, upstream):
        try:
            while not state["dead"]:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    state["up_bytes"] += len(data)
                    with self.lock:
                        if (
                            not state["armed"]
                            and self.cuts < self.max_cuts
                            and state["up_bytes"] >= self.cut_after
                        ):
                            state["armed"] = True
                elif state["armed"]:
                    # the broker answered a request we forwarded: drop the answer and the link
                    with self.lock:
                        cut = self.cuts < self.max_cuts
                        if cut:
                            self.cuts += 1
                        else:
                            state["armed"] = False  # disarmed meanwhile
                    if cut:
                        self.kill(src, dst, state)
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not state["dead"]:
                self.kill(src, dst, state)


def test_idempotent_producer_through_cutting_proxy():
    """Two ways to run it (the proxy is up, pass-through, during the whole test):
    - a broker with a second listener KAFKA_PROXY_TARGET advertising KAFKA_PROXY_LISTEN, while
      KAFKA_BOOTSTRAP is a plain listener (what --against-kafka sets up);
    - or a broker whose only listener KAFKA_PROXY_TARGET advertises KAFKA_PROXY_LISTEN, with
      KAFKA_BOOTSTRAP set to either address: then every client of this test goes through the
      proxy, which only cuts connections while it is armed (the idempotent produce phase)."""
    listen = os.environ.get("KAFKA_PROXY_LISTEN")
    target = os.environ.get("KAFKA_PROXY_TARGET")
    if not listen or not target:
        pytest.skip(
            "SKIPPED LOUDLY: set KAFKA_PROXY_LISTEN (the address the broker advertises on a listener) "
            "and KAFKA_PROXY_TARGET (that listener's real address) to run the connection-cut test"
        )
    parts = 3
    n = 30000
    proxy = CuttingProxy(listen, target, cut_after_bytes=400_000, max_cuts=0)  # disarmed
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    topic = None
    try:
        # The proxy must stay in the path: the broker seen through it must advertise it.
        probe = AdminClient({"bootstrap.servers": listen})
        md = probe.list_topics(timeout=10)
        adv = {f"{b.host}:{b.port}" for b in md.brokers.values()}
        assert adv == {listen}, (
            f"the listener behind {target} advertises {adv}, not the proxy {listen}: clients would "
            "bypass the proxy. Configure that listener's advertised address to be the proxy address."
        )
        topic = create_topic(admin, uniq("idem"), parts)
        conf = {
            "bootstrap.servers": listen,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "batch.num.messages": 500,
            "compression.type": "none",
            "message.timeout.ms": 60000,
            "retry.backoff.ms": 50,
            "reconnect.backoff.ms": 20,
            "reconnect.backoff.max.ms": 200,
            "queue.buffering.max.messages": 100000,
        }
        p = Producer(conf)
        t = DeliveryTracker()
        proxy.max_cuts = 4  # arm: cut up to 4 connections, each after 400 kB of requests
        for i in range(n):
            k, v, h = rec(i)
            p.produce(topic, v, k, partition=i % parts, headers=h, on_delivery=t.cb)
            if i % 500 == 0:
                p.poll(0)
                time.sleep(0.002)  # spread the load so several requests are in flight at a cut
        left = p.flush(90)
        with proxy.lock:
            proxy.max_cuts = proxy.cuts  # disarm
        assert left == 0, f"{left} records undelivered after 90 s"
        assert not t.errors, f"delivery errors: {t.errors[:5]}"
        del p
        cuts, conns = proxy.cuts, proxy.connections
        assert cuts >= 1, f"the proxy never cut a connection (connections {conns}); the test proved nothing"
        msgs = read_all(topic, parts, n, timeout=60)
        idx = [check_rec(m) for m in msgs]
        dups = len(idx) - len(set(idx))
        assert dups == 0, f"{dups} duplicate records after {cuts} connection cuts"
        assert sorted(idx) == list(range(n)), f"read {len(set(idx))} distinct of {n}"
        # idempotence also keeps the order per partition
        by_part = {}
        for m in msgs:
            by_part.setdefault(m.partition(), []).append((m.offset(), check_rec(m)))
        for part, lst in by_part.items():
            lst.sort()
            seq = [i for _, i in lst]
            assert seq == sorted(seq), f"partition {part}: order broken after reconnects"
        print(f"idempotent producer: {n} records, {cuts} cuts over {conns} proxied connections, no duplicates")
    finally:
        if topic:
            delete_topic(admin, topic)
        proxy.close()


# --------------------------------------------------------------------------------------------
# 3. ListOffsets by timestamp
# --------------------------------------------------------------------------------------------


def test_offsets_for_times(admin, topic_factory):
    parts = 3
    per = 50
    topic = topic_factory("times", parts)
    base = (int(time.time()) - 3600) * 1000  # an hour ago, CreateTime set by the producer
    p = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "linger.ms": 0})
    errs = []
    for part in range(parts):
        for j in range(per):
            # partition part, record j: timestamp base + j*1000 + part
            p.produce(
                topic, f"v{part}-{j}".encode(), f"k{j}".encode(), partition=part,
                timestamp=base + j * 1000 + part, on_delivery=lambda e, m: e and errs.append(e),
            )
    assert p.flush(30) == 0 and not errs, f"produce failed: {errs}"

    c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": uniq("times")})
    # record j of partition `part` has timestamp base + j*1000 + part; query base + delta + part
    cases = [
        (-10_000, 0),  # before everything -> first offset
        (0, 0),
        (10_000, 10),  # exact timestamp of record 10
        (10_500, 11),  # between 10 and 11 -> 11
        ((per - 1) * 1000, per - 1),
    ]
    for delta, expect in cases:
        q = [TopicPartition(topic, part, base + delta + part) for part in range(parts)]
        res = c.offsets_for_times(q, timeout=10)
        for tp in res:
            assert tp.error is None, f"offsets_for_times error {tp.error}"
            assert tp.offset == expect, f"ts base+{delta} partition {tp.partition}: offset {tp.offset}, expected {expect}"
    # after the last record: no offset (-1, librdkafka's OFFSET_END)
    res = c.offsets_for_times([TopicPartition(topic, 0, base + per * 1000 + 1)], timeout=10)
    assert res[0].offset == -1, f"after the last timestamp: {res[0].offset}, expected -1"
    c.close()

    # the same through AdminClient.list_offsets (ListOffsets v7+: earliest, latest, max timestamp)
    q = {}
    for part in range(parts):
        q[TopicPartition(topic, part, 0)] = OffsetSpec.for_timestamp(base + 20 * 1000 + part)
    for tp, f in admin.list_offsets(q).items():
        r = f.result()
        assert r.offset == 20, f"list_offsets for_timestamp partition {tp.partition}: {r.offset}"
        assert r.timestamp == base + 20 * 1000 + tp.partition, f"timestamp {r.timestamp}"
    for spec, want in [(OffsetSpec.earliest(), 0), (OffsetSpec.latest(), per), (OffsetSpec.max_timestamp(), per - 1)]:
        res = admin.list_offsets({TopicPartition(topic, 1): spec})
        r = list(res.values())[0].result()
        assert r.offset == want, f"list_offsets {spec}: {r.offset}, expected {want}"


# --------------------------------------------------------------------------------------------
# 4. compacted topic
# --------------------------------------------------------------------------------------------


def test_compacted_topic(topic_factory):
    parts = 3
    keys = 30
    versions = 5
    topic = topic_factory(
        "compact",
        parts,
        {
            "cleanup.policy": "compact",
            "segment.bytes": "1048576",  # Kafka 4's minimum
            "segment.ms": "100",  # roll on the next append after 100 ms
            "min.cleanable.dirty.ratio": "0.01",
            "min.compaction.lag.ms": "0",
            "delete.retention.ms": "100",
        },
    )
    p = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "linger.ms": 0})
    errs = []
    for v in range(versions):
        for k in range(keys):
            p.produce(topic, f"k{k}-v{v}".encode(), f"k{k}".encode(), partition=k % parts,
                      on_delivery=lambda e, m: e and errs.append(e))
        assert p.flush(30) == 0
        time.sleep(0.15)  # each version in its own segment
    # one more record per partition so the segment holding the latest versions is not active
    for part in range(parts):
        p.produce(topic, b"roll", b"__roll", partition=part)
    assert p.flush(30) == 0 and not errs, f"produce errors {errs}"

    strict = os.environ.get("KAFKA_EXPECT_COMPACTION") == "1"
    deadline = time.time() + 60
    while True:
        c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": uniq("cmp"), "enable.partition.eof": True})
        c.assign([TopicPartition(topic, part, OFFSET_BEGINNING) for part in range(parts)])
        eof = set()
        msgs = []
        t_read = time.time() + 20
        while len(eof) < parts and time.time() < t_read:
            for m in c.consume(500, 0.3):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                        continue
                    raise AssertionError(f"consume error {m.error()}")
                msgs.append(m)
        c.close()
        assert len(eof) == parts, "could not read the compacted topic to its end in 20 s"
        latest = {}
        order = {}
        for m in msgs:
            if m.key() == b"__roll":
                continue
            latest[m.key()] = m.value()
            order.setdefault(m.partition(), []).append((m.offset(), m.value()))
        for k in range(keys):
            assert latest.get(f"k{k}".encode()) == f"k{k}-v{versions - 1}".encode(), (
                f"latest value for k{k} is {latest.get(f'k{k}'.encode())!r}"
            )
        for part, lst in order.items():
            assert [o for o, _ in lst] == sorted(o for o, _ in lst), "offsets out of order"
            # versions of a key appear in production order
            vers = {}
            for _, val in lst:
                k, v = val.decode().split("-v")
                assert int(v) > vers.get(k, -1), f"partition {part}: {val} after version {vers.get(k)}"
                vers[k] = int(v)
        n_user = sum(1 for m in msgs if m.key() != b"__roll")
        compacted = n_user == keys
        if compacted or not strict:
            print(f"compaction: {n_user} records for {keys} keys ({'compacted' if compacted else 'not yet compacted'})")
            return
        if time.time() > deadline:
            raise AssertionError(f"not compacted after 60 s: {n_user} records for {keys} keys")
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# 5. admin: DescribeConfigs, IncrementalAlterConfigs, CreatePartitions, DeleteTopics
# --------------------------------------------------------------------------------------------


def describe_topic_config(admin, topic):
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    return admin.describe_configs([res])[res].result()


def test_admin_configs_partitions_delete(admin):
    topic = create_topic(admin, uniq("admin"), 3)
    try:
        cfg = describe_topic_config(admin, topic)
        assert "retention.ms" in cfg, f"DescribeConfigs has no retention.ms: {sorted(cfg)[:20]}"
        default = cfg["retention.ms"].value

        res = ConfigResource(
            ConfigResource.Type.TOPIC, topic,
            incremental_configs=[ConfigEntry("retention.ms", "3600000", incremental_operation=AlterConfigOpType.SET)],
        )
        admin.incremental_alter_configs([res])[res].result()
        cfg = describe_topic_config(admin, topic)
        assert cfg["retention.ms"].value == "3600000", f"retention.ms after SET: {cfg['retention.ms'].value}"
        assert cfg["retention.ms"].source == 1, f"source {cfg['retention.ms'].source} (want DYNAMIC_TOPIC_CONFIG=1)"

        res = ConfigResource(
            ConfigResource.Type.TOPIC, topic,
            incremental_configs=[ConfigEntry("retention.ms", None, incremental_operation=AlterConfigOpType.DELETE)],
        )
        admin.incremental_alter_configs([res])[res].result()
        cfg = describe_topic_config(admin, topic)
        assert cfg["retention.ms"].value == default, f"retention.ms after DELETE: {cfg['retention.ms'].value}"

        # CreatePartitions 3 -> 5, then produce to the new partition 4
        admin.create_partitions([NewPartitions(topic, 5)], operation_timeout=30)[topic].result()
        deadline = time.time() + 30
        while len(admin.list_topics(topic, timeout=10).topics[topic].partitions) != 5:
            assert time.time() < deadline, "CreatePartitions: metadata never showed 5 partitions"
            time.sleep(0.1)
        p = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "topic.metadata.refresh.interval.ms": 500})
        got = []
        p.produce(topic, b"on-4", b"k", partition=4, on_delivery=lambda e, m: got.append((e, m.partition(), m.offset())))
        assert p.flush(30) == 0 and got and got[0][0] is None, f"produce to new partition 4: {got}"
        assert got[0][1:] == (4, 0)
    finally:
        admin.delete_topics([topic], operation_timeout=30)[topic].result()
    deadline = time.time() + 30
    while topic in admin.list_topics(timeout=10).topics:
        assert time.time() < deadline, "DeleteTopics: topic still listed after 30 s"
        time.sleep(0.2)
    # a deleted topic cannot be described
    with pytest.raises(KafkaException):
        describe_topic_config(admin, topic)
