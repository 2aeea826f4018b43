"""Summarises which Kafka API versions each client used, from a real Kafka's request log.

    KAFKA_BROKER_REQUEST_LOG=1 KAFKA_TEST_KEEP=1 scripts/kafka-clients-test --against-kafka
    python3 tests/kafka/api_versions.py /tmp/tidewater-kafka.XXXXXX/logs/requests.log

Prints a Markdown table: API key, name, and per client (software name from ApiVersions v3+) the
versions seen. Forwarded (controller) requests are left out; the broker's own inter-broker and
share-coordinator (persister) requests show up under "broker".
"""

import collections
import json
import sys

SHORT = {
    "confluent-kafka-python": "confluent-kafka",
    "librdkafka": "kcat",
    "kgo": "franz-go",
    "apache-kafka-java": "java",
}


def main(path):
    agg = collections.defaultdict(lambda: collections.defaultdict(set))
    for line in open(path, errors="replace"):
        if not line.startswith("Completed request:"):
            continue
        try:
            d = json.loads(line[len("Completed request:"):])
        except ValueError:
            continue
        if d.get("isForwarded"):
            continue
        h = d["requestHeader"]
        sw = d.get("clientInformation", {}).get("softwareName", "unknown")
        if sw == "unknown" and h["requestApiKeyName"] == "API_VERSIONS":
            sw = d.get("request", {}).get("clientSoftwareName", "unknown")
        who = SHORT.get(sw, sw)
        cid = h.get("clientId") or ""
        if who == "java" and (cid.isdigit() or cid.startswith(("broker-", "Persister-", "NetworkPartition"))):
            who = "broker"
        agg[(h["requestApiKey"], h["requestApiKeyName"])][who].add(h["requestApiVersion"])
    print("| key | API | versions used (client: versions) |")
    print("| --- | --- | --- |")
    for (key, name), by in sorted(agg.items()):
        cells = ", ".join(f"{c} v{'/'.join(map(str, sorted(v)))}" for c, v in sorted(by.items()))
        print(f"| {key} | {name} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1])
