"""Small admin helper for the shell tests (confluent-kafka AdminClient, i.e. CreateTopics etc.).

Usage (KAFKA_BOOTSTRAP, default 127.0.0.1:9092):
  kafka_admin.py create TOPIC PARTITIONS [key=value ...]   CreateTopics, waits for leaders
  kafka_admin.py delete TOPIC                              DeleteTopics
  kafka_admin.py ends TOPIC                                end offsets, one "partition offset" a line
  kafka_admin.py lag GROUP TOPIC                           exits 1 unless committed == end everywhere
"""

import os
import sys
import time

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def ends(admin, topic):
    md = admin.list_topics(topic, timeout=10).topics[topic]
    parts = sorted(md.partitions)
    fut = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in parts})
    return {tp.partition: f.result().offset for tp, f in fut.items()}


def main():
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    cmd = sys.argv[1]
    try:
        admin.list_topics(timeout=15)
    except Exception as e:  # noqa: BLE001
        sys.exit(f"kafka_admin: no answer to Metadata from {BOOTSTRAP} in 15 s: {e}")
    if cmd == "create":
        topic, parts = sys.argv[2], int(sys.argv[3])
        cfg = dict(a.split("=", 1) for a in sys.argv[4:])
        admin.create_topics([NewTopic(topic, parts, 1, config=cfg)], operation_timeout=30, request_timeout=30)[topic].result()
        deadline = time.time() + 30
        while True:
            md = admin.list_topics(topic, timeout=10).topics.get(topic)
            if md and md.error is None and len(md.partitions) == parts and all(
                p.leader >= 0 for p in md.partitions.values()
            ):
                break
            if time.time() > deadline:
                sys.exit(f"topic {topic} not ready after 30 s")
            time.sleep(0.1)
    elif cmd == "delete":
        admin.delete_topics([sys.argv[2]], operation_timeout=30, request_timeout=30)[sys.argv[2]].result()
    elif cmd == "ends":
        for p, o in sorted(ends(admin, sys.argv[2]).items()):
            print(p, o)
    elif cmd == "lag":
        group, topic = sys.argv[2], sys.argv[3]
        e = ends(admin, topic)
        res = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result()
        c = {tp.partition: tp.offset for tp in res.topic_partitions if tp.topic == topic}
        print(f"group {group} topic {topic}: committed {dict(sorted(c.items()))} end {dict(sorted(e.items()))}")
        if c != e:
            sys.exit(f"lag is not 0: committed {c} != end offsets {e}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
