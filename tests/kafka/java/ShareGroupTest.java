// Share groups (KIP-932) with the reference client, KafkaShareConsumer, against $KAFKA_BOOTSTRAP.
// Compiled by scripts/kafka-deps (javac against target/kafka/lib), run by
// scripts/kafka-clients-test --only java-share; by hand:
//   java -cp "target/kafka/java-classes:target/kafka/lib/*" \
//        -Dlog4j2.configurationFile=tests/kafka/java/log4j2.properties ShareGroupTest
//
// What it does: CreateTopics (3 partitions); sets the share group's config
// share.auto.offset.reset=earliest (IncrementalAlterConfigs on a GROUP resource, since a share
// group starts at the latest offset by default); produces 30 records; a share consumer in explicit
// acknowledgement mode ACCEPTs a third of them, RELEASEs a third (they must come back, with
// delivery count 2, and are accepted then) and REJECTs a third (they must never come back).
// Then a second consumer in the same share group must get nothing; the share group is described
// and its lag (ListShareGroupOffsets) must be 0 on every partition.
// Exit 0 on success, 1 with a message on failure.

import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.AlterConfigOp;
import org.apache.kafka.clients.admin.ConfigEntry;
import org.apache.kafka.clients.admin.ListShareGroupOffsetsSpec;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.ShareGroupDescription;
import org.apache.kafka.clients.admin.SharePartitionOffsetInfo;
import org.apache.kafka.clients.consumer.AcknowledgeType;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaShareConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class ShareGroupTest {
    static final String BOOTSTRAP = System.getenv().getOrDefault("KAFKA_BOOTSTRAP", "127.0.0.1:9092");
    static final int PARTS = 3;
    static final int N = 30;

    static void fail(String msg) {
        System.err.println("FAIL (share group): " + msg);
        System.exit(1);
    }

    static void check(boolean ok, String msg) {
        if (!ok) fail(msg);
    }

    /** 0 accept, 1 release (then accept on redelivery), 2 reject */
    static int plan(int i) {
        return (i / 3) % 3;
    }

    static KafkaShareConsumer<String, String> consumer(String group, String id) {
        Properties p = new Properties();
        p.put("bootstrap.servers", BOOTSTRAP);
        p.put("group.id", group);
        p.put("client.id", id);
        p.put("share.acknowledgement.mode", "explicit");
        p.put("key.deserializer", StringDeserializer.class.getName());
        p.put("value.deserializer", StringDeserializer.class.getName());
        return new KafkaShareConsumer<>(p);
    }

    public static void main(String[] args) throws Exception {
        long t0 = System.nanoTime();
        String suffix = Long.toString(System.nanoTime() % 1_000_000_000L);
        String topic = "tw-java-share-" + suffix;
        String group = "tw-java-share-group-" + suffix;
        Properties ap = new Properties();
        ap.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, BOOTSTRAP);
        try (Admin admin = Admin.create(ap)) {
            admin.createTopics(List.of(new NewTopic(topic, PARTS, (short) 1))).all().get(30, TimeUnit.SECONDS);
            ConfigResource gr = new ConfigResource(ConfigResource.Type.GROUP, group);
            admin.incrementalAlterConfigs(Map.of(gr, List.of(new AlterConfigOp(
                new ConfigEntry("share.auto.offset.reset", "earliest"), AlterConfigOp.OpType.SET))))
                .all().get(30, TimeUnit.SECONDS);
            System.out.println("topic " + topic + " (" + PARTS + " partitions), share group " + group
                + " with share.auto.offset.reset=earliest");

            Properties pp = new Properties();
            pp.put("bootstrap.servers", BOOTSTRAP);
            pp.put("acks", "all");
            pp.put("key.serializer", StringSerializer.class.getName());
            pp.put("value.serializer", StringSerializer.class.getName());
            try (KafkaProducer<String, String> prod = new KafkaProducer<>(pp)) {
                for (int i = 0; i < N; i++) {
                    prod.send(new ProducerRecord<>(topic, i % PARTS, "k" + i, "v" + i)).get(30, TimeUnit.SECONDS);
                }
            }
            System.out.println("produced " + N + " records");

            Map<Integer, List<Integer>> deliveries = new TreeMap<>(); // i -> delivery counts seen
            Map<Integer, String> outcome = new TreeMap<>();
            int accepted = 0, released = 0, rejected = 0;
            long releasedDone = 0;
            long deadline = System.currentTimeMillis() + 60_000;
            long quietUntil = Long.MAX_VALUE;
            try (KafkaShareConsumer<String, String> c = consumer(group, "share-1")) {
                c.subscribe(List.of(topic));
                while (System.currentTimeMillis() < Math.min(deadline, quietUntil)) {
                    ConsumerRecords<String, String> recs = c.poll(Duration.ofMillis(500));
                    for (ConsumerRecord<String, String> r : recs) {
                        int i = Integer.parseInt(r.key().substring(1));
                        check(r.value().equals("v" + i), "value " + r.value() + " for key " + r.key());
                        short dc = r.deliveryCount().orElse((short) -1);
                        deliveries.computeIfAbsent(i, k -> new ArrayList<>()).add((int) dc);
                        AcknowledgeType ack;
                        if (plan(i) == 0) {
                            ack = AcknowledgeType.ACCEPT;
                            accepted++;
                        } else if (plan(i) == 1 && deliveries.get(i).size() == 1) {
                            ack = AcknowledgeType.RELEASE;
                            released++;
                        } else if (plan(i) == 1) {
                            ack = AcknowledgeType.ACCEPT;
                            accepted++;
                            releasedDone++;
                        } else {
                            ack = AcknowledgeType.REJECT;
                            rejected++;
                        }
                        c.acknowledge(r, ack);
                        outcome.merge(i, ack + "(dc=" + dc + ",p" + r.partition() + "@" + r.offset() + ")",
                            (a, b) -> a + " " + b);
                    }
                    if (!recs.isEmpty()) {
                        Map<?, ?> res = c.commitSync(Duration.ofSeconds(30));
                        res.forEach((tp, err) -> {
                            if (((java.util.Optional<?>) err).isPresent()) fail("commitSync " + tp + ": " + err);
                        });
                    }
                    if (quietUntil == Long.MAX_VALUE && deliveries.size() == N && releasedDone == 9) {
                        // everything seen and every released record came back: now nothing more
                        // may arrive (accepted and rejected records are done for good)
                        quietUntil = System.currentTimeMillis() + 3000;
                    }
                }
            }
            System.out.println("first consumer: accepted " + accepted + ", released " + released
                + " (redelivered and accepted " + releasedDone + "), rejected " + rejected);
            for (Map.Entry<Integer, String> e : outcome.entrySet()) {
                System.out.println("  k" + e.getKey() + ": " + e.getValue());
            }
            check(deliveries.size() == N, "saw " + deliveries.size() + " distinct records of " + N);
            for (Map.Entry<Integer, List<Integer>> e : deliveries.entrySet()) {
                int i = e.getKey();
                List<Integer> dcs = e.getValue();
                if (plan(i) == 1) {
                    check(dcs.equals(List.of(1, 2)), "released k" + i + " delivery counts " + dcs + ", want [1, 2]");
                } else {
                    check(dcs.equals(List.of(1)), "k" + i + " (" + (plan(i) == 0 ? "accepted" : "rejected")
                        + ") delivered with counts " + dcs + ", want [1] (must not come back)");
                }
            }
            check(accepted == 21 && released == 9 && rejected == 9,
                "counts accepted " + accepted + " released " + released + " rejected " + rejected);

            // a second member of the share group finds nothing left
            int late = 0;
            try (KafkaShareConsumer<String, String> c2 = consumer(group, "share-2")) {
                c2.subscribe(List.of(topic));
                long until = System.currentTimeMillis() + 4000;
                while (System.currentTimeMillis() < until) {
                    for (ConsumerRecord<String, String> r : c2.poll(Duration.ofMillis(500))) {
                        late++;
                        c2.acknowledge(r, AcknowledgeType.ACCEPT);
                        System.out.println("  unexpected: second consumer got " + r.key() + " dc="
                            + r.deliveryCount().orElse((short) -1));
                    }
                }
                c2.commitSync(Duration.ofSeconds(10));
            }
            check(late == 0, "second consumer of the share group got " + late + " records");
            System.out.println("second consumer in the group: 0 records (all acknowledged)");

            // the share group through the admin API
            ShareGroupDescription d = admin.describeShareGroups(List.of(group)).describedGroups()
                .get(group).get(30, TimeUnit.SECONDS);
            System.out.println("describeShareGroups: state " + d.groupState() + ", members " + d.members().size());
            Map<TopicPartition, OffsetSpec> q = new HashMap<>();
            for (int p = 0; p < PARTS; p++) q.put(new TopicPartition(topic, p), OffsetSpec.latest());
            Map<Integer, Long> ends = new TreeMap<>();
            admin.listOffsets(q).all().get(30, TimeUnit.SECONDS)
                .forEach((tp, info) -> ends.put(tp.partition(), info.offset()));
            // Start offsets (SPSO) are the share coordinator's persisted state, which Kafka updates
            // lazily (it can stay behind records already acknowledged); the lag it reports counts
            // the records not yet acknowledged, and must be 0.
            Map<Integer, Long> start = new TreeMap<>();
            Map<Integer, Long> lag = new TreeMap<>();
            long until = System.currentTimeMillis() + 15_000;
            while (true) {
                Map<TopicPartition, SharePartitionOffsetInfo> so = admin
                    .listShareGroupOffsets(Map.of(group, new ListShareGroupOffsetsSpec()))
                    .partitionsToOffsetInfo(group).get(30, TimeUnit.SECONDS);
                start.clear();
                lag.clear();
                so.forEach((tp, info) -> {
                    if (info != null) {
                        start.put(tp.partition(), info.startOffset());
                        // Lag came with DescribeShareGroupOffsets v1; a broker serving v0 only
                        // (tidewater: its Kafka schemas are 4.1's) gives the start offset,
                        // which for it is the first record not yet acknowledged.
                        lag.put(tp.partition(), info.lag().orElse(ends.get(tp.partition()) - info.startOffset()));
                    }
                });
                if ((lag.size() == PARTS && lag.values().stream().allMatch(l -> l == 0))
                    || System.currentTimeMillis() > until) break;
                Thread.sleep(300);
            }
            System.out.println("listShareGroupOffsets: start offsets " + start + ", lag " + lag + "; end offsets " + ends);
            check(lag.size() == PARTS && lag.values().stream().allMatch(l -> l == 0),
                "share group lag " + lag + " (start offsets " + start + ", end offsets " + ends + "), want 0");

            admin.deleteTopics(List.of(topic)).all().get(30, TimeUnit.SECONDS);
        }
        System.out.printf("share group test OK in %.1f s%n", (System.nanoTime() - t0) / 1e9);
        System.exit(0);
    }
}
