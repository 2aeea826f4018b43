// Consumer groups with the reference client, KafkaProducer + KafkaConsumer (kafka-clients 4.4.0),
// against $KAFKA_BOOTSTRAP: the Java counterpart of test_confluent.py's and go/kafka_test.go's
// group tests. Compiled by scripts/kafka-deps (javac against target/kafka/lib), run by
// scripts/kafka-clients-test --only java-group; by hand:
//   java -cp "target/kafka/java-classes:target/kafka/lib/*" \
//        -Dlog4j2.configurationFile=tests/kafka/java/log4j2.properties GroupTest
//
// What it does:
// 1. classic protocol: CreateTopics (6 partitions); a KafkaProducer (acks=all, lz4, idempotent by
//    default) sends 100,000 records (KAFKA_TEST_RECORDS) with key "k<i>", a value carrying i and
//    two headers ("i" = i, "none" = null); every send must succeed and the end offsets must add up
//    to the count. Three KafkaConsumers, each in its own thread, in one group
//    (group.protocol=classic, cooperative-sticky, enable.auto.commit=false, commitSync of what
//    each poll returned) consume them; until all three own partitions each handles one record per
//    poll (and seeks back for the rest), so the work really is shared; member m1 closes cleanly
//    (LeaveGroup) once half the records were seen, the other two finish. Every i must be seen, key,
//    value and headers intact (the null header value stays null); a record may come again only if
//    its earlier delivery's commit had not succeeded (counted, printed). Then the committed offsets
//    (Admin.listConsumerGroupOffsets) must equal the end offsets (Admin.listOffsets latest) on
//    every partition (lag 0), and Admin.describeConsumerGroups must show the group Empty.
// 2. the same flow with group.protocol=consumer (KIP-848) on a second topic: 4 partitions, 10,000
//    records.
// Bounded: every loop has a deadline, the whole test ends within 120 s (a watchdog exits 1 at
// 118 s). Exit 0 on success, 1 with a "FAIL (java group ...)" message on failure.

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.BitSet;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import java.util.stream.Collectors;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ConsumerGroupDescription;
import org.apache.kafka.clients.admin.MemberDescription;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.CloseOptions;
import org.apache.kafka.clients.consumer.ConsumerRebalanceListener;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.CooperativeStickyAssignor;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.GroupState;
import org.apache.kafka.common.GroupType;
import org.apache.kafka.common.KafkaException;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.TopicPartitionInfo;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class GroupTest {
    static final String BOOTSTRAP = System.getenv().getOrDefault("KAFKA_BOOTSTRAP", "127.0.0.1:9092");
    static final int RECORDS = Integer.parseInt(System.getenv().getOrDefault("KAFKA_TEST_RECORDS", "100000"));
    static final String PAD = "x".repeat(40);
    static final long START_MS = System.currentTimeMillis();
    /** everything (produce, consume, checks) must be done by then; the watchdog fires 3 s later */
    static final long DEADLINE = START_MS + 115_000;
    static volatile String phase = "start";
    static Admin admin;

    static void fail(String msg) {
        System.out.flush();
        System.err.println("FAIL (java group, " + phase + "): " + msg);
        System.err.flush();
        Runtime.getRuntime().halt(1);
    }

    static void check(boolean ok, String msg) {
        if (!ok) fail(msg);
    }

    static double secs(long fromNanos) {
        return (System.nanoTime() - fromNanos) / 1e9;
    }

    /** ms left for a step that should take at most capMs, bounded by the whole test's deadline */
    static long budget(long capMs) {
        long left = DEADLINE - System.currentTimeMillis();
        if (left <= 0) fail("the whole-test deadline (115 s) passed");
        return Math.max(1, Math.min(capMs, left));
    }

    static String value(int i) {
        return "value-" + i + "-" + PAD;
    }

    /** Returns the i of a record made by the producer below, or throws if key/value/headers differ. */
    static int checkRecord(ConsumerRecord<String, String> r) {
        String k = r.key();
        if (k == null || !k.startsWith("k")) throw new IllegalStateException("bad key " + k + " at " + where(r));
        int i;
        try {
            i = Integer.parseInt(k.substring(1));
        } catch (NumberFormatException e) {
            throw new IllegalStateException("bad key " + k + " at " + where(r));
        }
        if (i < 0 || i >= RECORDS) throw new IllegalStateException("key out of range " + k + " at " + where(r));
        if (!value(i).equals(r.value())) {
            throw new IllegalStateException("value mismatch for " + k + " at " + where(r) + ": " + r.value());
        }
        Header[] h = r.headers().toArray();
        boolean ok = h.length == 2
            && "i".equals(h[0].key()) && h[0].value() != null
            && Integer.toString(i).equals(new String(h[0].value(), StandardCharsets.UTF_8))
            && "none".equals(h[1].key()) && h[1].value() == null;
        if (!ok) {
            StringBuilder sb = new StringBuilder();
            for (Header x : h) {
                sb.append(x.key()).append('=')
                    .append(x.value() == null ? "null" : "\"" + new String(x.value(), StandardCharsets.UTF_8) + "\"")
                    .append(' ');
            }
            throw new IllegalStateException("headers mismatch for " + k + " at " + where(r) + ": [" + sb.toString().trim()
                + "], want [i=\"" + i + "\" none=null]");
        }
        return i;
    }

    static String where(ConsumerRecord<?, ?> r) {
        return "p" + r.partition() + "@" + r.offset();
    }

    static void createTopic(String topic, int parts) throws Exception {
        admin.createTopics(List.of(new NewTopic(topic, parts, (short) 1))).all().get(budget(30_000), TimeUnit.MILLISECONDS);
        // wait until the metadata shows every partition with a leader
        long until = System.currentTimeMillis() + budget(30_000);
        while (true) {
            String why;
            try {
                TopicDescription d = admin.describeTopics(List.of(topic)).allTopicNames()
                    .get(budget(10_000), TimeUnit.MILLISECONDS).get(topic);
                List<TopicPartitionInfo> ps = d.partitions();
                if (ps.size() == parts && ps.stream().allMatch(p -> p.leader() != null && p.leader().id() >= 0)) return;
                why = ps.size() + " partitions, leaders " + ps.stream()
                    .map(p -> p.leader() == null ? "none" : Integer.toString(p.leader().id())).collect(Collectors.toList());
            } catch (Exception e) {
                why = e.toString();
            }
            if (System.currentTimeMillis() > until) fail("topic " + topic + " not ready with " + parts + " partitions: " + why);
            Thread.sleep(100);
        }
    }

    static Map<Integer, Long> endOffsets(String topic, int parts) throws Exception {
        Map<TopicPartition, OffsetSpec> q = new HashMap<>();
        for (int p = 0; p < parts; p++) q.put(new TopicPartition(topic, p), OffsetSpec.latest());
        Map<Integer, Long> ends = new TreeMap<>();
        admin.listOffsets(q).all().get(budget(30_000), TimeUnit.MILLISECONDS)
            .forEach((tp, info) -> ends.put(tp.partition(), info.offset()));
        return ends;
    }

    /** Produces records 0..n-1 (keys k<i>, two headers, lz4, acks=all, idempotent by default). */
    static void produce(String topic, int parts, int n) throws Exception {
        phase = "produce " + topic;
        long t = System.nanoTime();
        Properties pp = new Properties();
        pp.put("bootstrap.servers", BOOTSTRAP);
        pp.put("acks", "all");
        pp.put("compression.type", "lz4");
        pp.put("linger.ms", "5");
        pp.put("batch.size", "65536");
        pp.put("max.block.ms", "30000");
        pp.put("delivery.timeout.ms", "60000");
        pp.put("key.serializer", StringSerializer.class.getName());
        pp.put("value.serializer", StringSerializer.class.getName());
        AtomicLong ok = new AtomicLong();
        AtomicLong errs = new AtomicLong();
        AtomicReference<Exception> firstErr = new AtomicReference<>();
        try (KafkaProducer<String, String> prod = new KafkaProducer<>(pp)) {
            for (int i = 0; i < n; i++) {
                RecordHeaders h = new RecordHeaders();
                h.add("i", Integer.toString(i).getBytes(StandardCharsets.UTF_8));
                h.add("none", null);
                prod.send(new ProducerRecord<>(topic, null, "k" + i, value(i), h), (md, e) -> {
                    if (e != null) {
                        errs.incrementAndGet();
                        firstErr.compareAndSet(null, e);
                    } else {
                        ok.incrementAndGet();
                    }
                });
                if (System.currentTimeMillis() > DEADLINE) fail("still sending at record " + i + " of " + n);
            }
            prod.flush(); // bounded by delivery.timeout.ms
            prod.close(Duration.ofMillis(budget(10_000)));
        }
        check(errs.get() == 0, errs.get() + " sends failed, first: " + firstErr.get());
        check(ok.get() == n, ok.get() + " sends acknowledged, want " + n);
        Map<Integer, Long> ends = endOffsets(topic, parts);
        long sum = ends.values().stream().mapToLong(Long::longValue).sum();
        check(sum == n, "end offsets " + ends + " add up to " + sum + ", want " + n);
        check(ends.size() == parts && ends.values().stream().allMatch(o -> o > 0),
            "records not spread over all " + parts + " partitions: end offsets " + ends);
        System.out.printf("produced %d records to %s (lz4, acks=all, enable.idempotence default) in %.1f s: all acknowledged; end offsets %s%n",
            n, topic, secs(t), ends);
    }

    static final class Delivery {
        final String member;
        volatile boolean committed;

        Delivery(String member) {
            this.member = member;
        }
    }

    /** One run of the group flow: three members, m1 leaves half-way. */
    static final class GroupRun {
        final String topic;
        final String group;
        final int total;
        final String protocol;
        final Object lock = new Object();
        final Map<Long, List<Delivery>> deliveries = new HashMap<>();
        final BitSet seen;
        int nseen;
        final List<String> events = Collections.synchronizedList(new ArrayList<>());
        final boolean[] owning = new boolean[3]; // written by member threads, read under lock
        final boolean[] everOwned = new boolean[3];
        volatile boolean warm = true;
        volatile boolean done = false;
        final AtomicReference<String> failure = new AtomicReference<>();
        final AtomicBoolean left = new AtomicBoolean();
        final AtomicLong commitFailures = new AtomicLong();
        final AtomicLong commits = new AtomicLong();

        GroupRun(String topic, String group, int total, String protocol) {
            this.topic = topic;
            this.group = group;
            this.total = total;
            this.protocol = protocol;
            this.seen = new BitSet(total);
        }

        void event(String s) {
            events.add(s);
        }

        int nseen() {
            synchronized (lock) {
                return nseen;
            }
        }

        KafkaConsumer<String, String> consumer(String name) {
            Properties p = new Properties();
            p.put("bootstrap.servers", BOOTSTRAP);
            p.put("group.id", group);
            p.put("client.id", name);
            p.put("group.protocol", protocol);
            p.put("enable.auto.commit", "false");
            p.put("auto.offset.reset", "earliest");
            p.put("key.deserializer", StringDeserializer.class.getName());
            p.put("value.deserializer", StringDeserializer.class.getName());
            if (protocol.equals("classic")) {
                p.put("partition.assignment.strategy", CooperativeStickyAssignor.class.getName());
                p.put("session.timeout.ms", "10000");
                p.put("heartbeat.interval.ms", "1000");
            }
            return new KafkaConsumer<>(p);
        }

        static List<Integer> parts(java.util.Collection<TopicPartition> tps) {
            return tps.stream().map(TopicPartition::partition).sorted().collect(Collectors.toList());
        }

        void member(int m) {
            String name = "m" + m;
            KafkaConsumer<String, String> c = null;
            boolean closed = false;
            try {
                c = consumer(name);
                c.subscribe(List.of(topic), new ConsumerRebalanceListener() {
                    @Override
                    public void onPartitionsRevoked(java.util.Collection<TopicPartition> ps) {
                        if (!ps.isEmpty()) event(name + "-" + parts(ps));
                    }

                    @Override
                    public void onPartitionsAssigned(java.util.Collection<TopicPartition> ps) {
                        event(name + "+" + parts(ps));
                    }

                    @Override
                    public void onPartitionsLost(java.util.Collection<TopicPartition> ps) {
                        event(name + " lost " + parts(ps));
                    }
                });
                while (!done && failure.get() == null) {
                    ConsumerRecords<String, String> recs = c.poll(Duration.ofMillis(100));
                    boolean owns = !c.assignment().isEmpty();
                    synchronized (lock) {
                        owning[m] = owns;
                        everOwned[m] |= owns;
                    }
                    List<ConsumerRecord<String, String>> batch = new ArrayList<>();
                    if (warm && !recs.isEmpty()) {
                        // until every member owns partitions: one record per poll, the rest is
                        // fetched again (seek back), as the Python test's consume(1)
                        ConsumerRecord<String, String> first = recs.iterator().next();
                        batch.add(first);
                        for (TopicPartition tp : recs.partitions()) {
                            long next = tp.partition() == first.partition() ? first.offset() + 1
                                : recs.records(tp).get(0).offset();
                            try {
                                c.seek(tp, next);
                            } catch (IllegalStateException e) {
                                // no longer assigned: its new owner starts from the committed offset
                            }
                        }
                    } else {
                        for (ConsumerRecord<String, String> r : recs) batch.add(r);
                    }
                    int n;
                    if (!batch.isEmpty()) {
                        List<Delivery> ds = new ArrayList<>(batch.size());
                        Map<TopicPartition, OffsetAndMetadata> offs = new HashMap<>();
                        synchronized (lock) {
                            for (ConsumerRecord<String, String> r : batch) {
                                int i = checkRecord(r);
                                long key = ((long) r.partition() << 40) | r.offset();
                                Delivery d = new Delivery(name);
                                deliveries.computeIfAbsent(key, x -> new ArrayList<>(1)).add(d);
                                ds.add(d);
                                if (!seen.get(i)) {
                                    seen.set(i);
                                    nseen++;
                                }
                                offs.merge(new TopicPartition(r.topic(), r.partition()), new OffsetAndMetadata(r.offset() + 1),
                                    (a, b) -> a.offset() >= b.offset() ? a : b);
                            }
                        }
                        boolean ok;
                        try {
                            c.commitSync(offs, Duration.ofMillis(Math.min(15_000, Math.max(1_000, DEADLINE - System.currentTimeMillis()))));
                            ok = true;
                            commits.incrementAndGet();
                        } catch (KafkaException e) {
                            ok = false;
                            commitFailures.incrementAndGet();
                            event(name + " commit of " + offs.size() + " partitions failed: " + e);
                        }
                        for (Delivery d : ds) d.committed = ok;
                        if (warm) Thread.sleep(10);
                    } else if (warm) {
                        Thread.sleep(10);
                    }
                    n = nseen();
                    if (m == 1 && !warm && n >= total / 2 && left.compareAndSet(false, true)) {
                        // m1 leaves the group half-way: a rebalance hands its partitions to the others
                        event("m1 leaves at " + n);
                        long t = System.nanoTime();
                        closed = true;
                        c.close(CloseOptions.timeout(Duration.ofSeconds(15)));
                        event(String.format("m1 closed in %.2f s", secs(t)));
                        return;
                    }
                }
            } catch (Throwable e) {
                failure.compareAndSet(null, name + ": " + e);
            } finally {
                if (c != null && !closed) {
                    try {
                        c.close(CloseOptions.timeout(Duration.ofSeconds(10)));
                    } catch (Throwable e) {
                        event(name + " close failed: " + e);
                    }
                }
            }
        }

        /** Runs the three members until every record was seen; returns the consume time in s. */
        double run(long consumeBudgetMs) throws Exception {
            phase = "group " + protocol + " consume";
            long t = System.nanoTime();
            List<Thread> threads = new ArrayList<>();
            for (int m = 0; m < 3; m++) {
                final int mm = m;
                Thread th = new Thread(() -> member(mm), "member-m" + m);
                th.setDaemon(true);
                threads.add(th);
                th.start();
            }
            long warmUntil = System.currentTimeMillis() + 30_000;
            long until = System.currentTimeMillis() + budget(consumeBudgetMs);
            while (true) {
                int n;
                boolean all;
                synchronized (lock) {
                    n = nseen;
                    all = owning[0] && owning[1] && owning[2];
                }
                if (n >= total || failure.get() != null) break;
                if (warm && all) {
                    warm = false;
                    event("all 3 own partitions at " + n + String.format(" (%.1f s)", secs(t)));
                }
                long now = System.currentTimeMillis();
                if (warm && now > warmUntil) {
                    failure.compareAndSet(null, "not every member of the group got partitions in 30 s (owning: m0 "
                        + owning[0] + ", m1 " + owning[1] + ", m2 " + owning[2] + "); seen " + n);
                    break;
                }
                if (now > until) {
                    failure.compareAndSet(null, "the group consumed only " + n + " of " + total + " distinct records in "
                        + (consumeBudgetMs / 1000) + " s");
                    break;
                }
                Thread.sleep(20);
            }
            double consumed = secs(t);
            done = true;
            long joinUntil = System.currentTimeMillis() + 20_000;
            for (Thread th : threads) th.join(Math.max(1, joinUntil - System.currentTimeMillis()));
            for (Thread th : threads) {
                if (th.isAlive()) failure.compareAndSet(null, th.getName() + " did not stop (close) within 20 s");
            }
            String f = failure.get();
            if (f != null) fail(f + "; commits " + commits.get() + ", failed commits " + commitFailures.get() + "; events " + events);
            check(left.get(), "member m1 never left half-way; events " + events);
            for (int m = 0; m < 3; m++) check(everOwned[m], "member m" + m + " never got partitions; events " + events);
            int redelivered = 0;
            for (Map.Entry<Long, List<Delivery>> e : deliveries.entrySet()) {
                List<Delivery> ds = e.getValue();
                for (int k = 0; k < ds.size() - 1; k++) {
                    if (ds.get(k).committed) {
                        fail("record p" + (e.getKey() >> 40) + "@" + (e.getKey() & ((1L << 40) - 1))
                            + " delivered again after " + ds.get(k).member + " committed it: deliveries by "
                            + ds.stream().map(d -> d.member + (d.committed ? "(committed)" : "(uncommitted)"))
                                .collect(Collectors.toList()) + "; events " + events);
                    }
                }
                redelivered += ds.size() - 1;
            }
            check(nseen == total && seen.cardinality() == total, "saw " + nseen + " distinct records, want " + total);
            check(deliveries.size() == total, deliveries.size() + " distinct (partition, offset) delivered, want " + total);
            System.out.printf("group %s: %d records consumed by 3 members in %.1f s, every i seen, keys/values/headers intact; "
                + "%d redelivered (uncommitted at the rebalance), %d commits, %d failed; events: %s%n",
                protocol, total, consumed, redelivered, commits.get(), commitFailures.get(), events);
            return consumed;
        }
    }

    /** Committed offsets (Admin) == end offsets on every partition; the group described. */
    static void checkLagAndDescribe(String topic, int parts, String group, String protocol) throws Exception {
        phase = "group " + protocol + " lag check";
        long t = System.nanoTime();
        Map<Integer, Long> ends = endOffsets(topic, parts);
        Map<TopicPartition, OffsetAndMetadata> got = admin.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata()
            .get(budget(30_000), TimeUnit.MILLISECONDS);
        Map<Integer, Long> committed = new TreeMap<>();
        got.forEach((tp, om) -> {
            if (tp.topic().equals(topic) && om != null) committed.put(tp.partition(), om.offset());
        });
        Map<Integer, Long> lag = new TreeMap<>();
        for (Map.Entry<Integer, Long> e : ends.entrySet()) {
            Long c = committed.get(e.getKey());
            lag.put(e.getKey(), c == null ? e.getValue() : e.getValue() - c);
        }
        check(committed.equals(ends), "committed offsets (listConsumerGroupOffsets) " + committed + " != end offsets "
            + ends + " (lag " + lag + ")");
        System.out.printf("group %s lag 0 on %d partitions: committed offsets == end offsets %s%n", protocol, parts, ends);

        phase = "group " + protocol + " describe";
        // every member closed cleanly (LeaveGroup): the group must be Empty; give it a moment
        long until = System.currentTimeMillis() + budget(12_000);
        ConsumerGroupDescription d;
        while (true) {
            d = admin.describeConsumerGroups(List.of(group)).describedGroups().get(group)
                .get(budget(30_000), TimeUnit.MILLISECONDS);
            if ((d.groupState() == GroupState.EMPTY && d.members().isEmpty()) || System.currentTimeMillis() > until) break;
            Thread.sleep(300);
        }
        List<String> members = new ArrayList<>();
        for (MemberDescription md : d.members()) members.add(md.clientId() + parts(md.assignment().topicPartitions()));
        System.out.printf("describeConsumerGroups %s: state %s, type %s, assignor '%s', members %s, coordinator %s (%.1f s with the lag check)%n",
            group, d.groupState(), d.type(), d.partitionAssignor(), members,
            d.coordinator() == null ? "none" : d.coordinator().host() + ":" + d.coordinator().port(), secs(t));
        GroupType want = protocol.equals("classic") ? GroupType.CLASSIC : GroupType.CONSUMER;
        check(d.type() == want, "group type " + d.type() + ", want " + want);
        check(d.groupState() == GroupState.EMPTY && d.members().isEmpty(),
            "group state " + d.groupState() + " with members " + members + " after every member closed, want EMPTY with none");
    }

    static List<Integer> parts(java.util.Collection<TopicPartition> tps) {
        return GroupRun.parts(tps);
    }

    public static void main(String[] args) throws Exception {
        long t0 = System.nanoTime();
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(Math.max(0, DEADLINE + 3_000 - System.currentTimeMillis()));
            } catch (InterruptedException e) {
                return;
            }
            fail("the test did not finish within 118 s");
        }, "watchdog");
        watchdog.setDaemon(true);
        watchdog.start();
        try {
            String suffix = Long.toString(System.nanoTime() % 1_000_000_000L);
            Properties ap = new Properties();
            ap.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, BOOTSTRAP);
            ap.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "30000");
            admin = Admin.create(ap);

            // ---- 1. classic protocol, cooperative-sticky, 100k records, 6 partitions
            String topic = "tw-java-group-" + suffix;
            int parts = 6;
            phase = "create " + topic;
            createTopic(topic, parts);
            long tp = System.nanoTime();
            produce(topic, parts, RECORDS);
            double produced = secs(tp);
            GroupRun g = new GroupRun(topic, topic + "-group", RECORDS, "classic");
            // leave ~35 s of the budget for the KIP-848 half
            double consumed = g.run(Math.max(10_000, DEADLINE - 35_000 - System.currentTimeMillis()));
            long tl = System.nanoTime();
            checkLagAndDescribe(topic, parts, g.group, "classic");
            double checked = secs(tl);

            // ---- 2. KIP-848 (group.protocol=consumer), 10k records, 4 partitions
            String topic2 = "tw-java-group848-" + suffix;
            int parts2 = 4;
            int n2 = 10_000;
            phase = "create " + topic2;
            createTopic(topic2, parts2);
            long tp2 = System.nanoTime();
            produce(topic2, parts2, n2);
            double produced2 = secs(tp2);
            GroupRun g2 = new GroupRun(topic2, topic2 + "-group", n2, "consumer");
            double consumed2 = g2.run(DEADLINE - 5_000 - System.currentTimeMillis());
            long tl2 = System.nanoTime();
            checkLagAndDescribe(topic2, parts2, g2.group, "consumer");
            double checked2 = secs(tl2);

            phase = "delete topics";
            admin.deleteTopics(List.of(topic, topic2)).all().get(budget(30_000), TimeUnit.MILLISECONDS);
            admin.close(Duration.ofSeconds(5));
            System.out.printf("java group test OK in %.1f s: classic %d records: produce %.1f s, consume %.1f s, checks %.1f s; "
                + "consumer (KIP-848) %d records: produce %.1f s, consume %.1f s, checks %.1f s%n",
                secs(t0), RECORDS, produced, consumed, checked, n2, produced2, consumed2, checked2);
            System.out.flush();
            Runtime.getRuntime().halt(0);
        } catch (Throwable e) {
            e.printStackTrace();
            fail(e.toString());
        }
    }
}
