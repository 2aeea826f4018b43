#!/usr/bin/env bash
# Apache Kafka 4.4's own command-line tools, run from the jars in target/kafka/lib (the same
# classes as bin/kafka-*.sh), against $KAFKA_BOOTSTRAP (default 127.0.0.1:9092):
#   kafka-topics           org.apache.kafka.tools.TopicCommand (--create, --describe, --delete)
#   kafka-console-producer org.apache.kafka.tools.ConsoleProducer (keys, headers, gzip, acks=all)
#   kafka-console-consumer org.apache.kafka.tools.consumer.ConsoleConsumer (group, from beginning)
#   kafka-consumer-groups  org.apache.kafka.tools.consumer.group.ConsumerGroupCommand
#                          (--describe, --reset-offsets --to-earliest --execute)
#   kafka-producer-perf-test org.apache.kafka.tools.ProducerPerformance (100,000 x 100 B, acks=all)
#   kafka-consumer-perf-test org.apache.kafka.tools.ConsumerPerformance
# Option names are 4.4's (KIP-1147: --command-property, --formatter-property, --reader-property,
# --num-records). Exit 0 on success, 1 with a message on failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
B=${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
lib="$root/target/kafka/lib"
[ -f "$lib/kafka-tools-4.4.0.jar" ] || { echo "FAIL (java tools): $lib is missing; run scripts/kafka-deps" >&2; exit 1; }
J=(java -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -cp "$lib/*"
    -Dlog4j2.configurationFile="$here/java/log4j2.properties")
fail() { echo "FAIL (java tools): $*" >&2; exit 1; }
step() { echo "--- $*"; }

work=$(mktemp -d)
suffix=$(date +%s%N | tail -c 9)
topic="tw-java-tools-$suffix"
perf="tw-java-perf-$suffix"
group="tw-java-tools-group-$suffix"
cleanup() {
    "${J[@]}" org.apache.kafka.tools.TopicCommand --bootstrap-server "$B" --delete --topic "$topic" >/dev/null 2>&1 || true
    "${J[@]}" org.apache.kafka.tools.TopicCommand --bootstrap-server "$B" --delete --topic "$perf" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

step "kafka-topics --create (CreateTopics), --describe"
"${J[@]}" org.apache.kafka.tools.TopicCommand --bootstrap-server "$B" --create --topic "$topic" \
    --partitions 3 --replication-factor 1 --config retention.ms=3600000 || fail "TopicCommand --create"
"${J[@]}" org.apache.kafka.tools.TopicCommand --bootstrap-server "$B" --create --topic "$perf" \
    --partitions 4 --replication-factor 1 || fail "TopicCommand --create $perf"
"${J[@]}" org.apache.kafka.tools.TopicCommand --bootstrap-server "$B" --describe --topic "$topic" >"$work/desc" \
    || fail "TopicCommand --describe"
cat "$work/desc"
grep -q "PartitionCount: 3" "$work/desc" || fail "describe does not show 3 partitions"
grep -q "retention.ms=3600000" "$work/desc" || fail "describe does not show retention.ms=3600000"

step "kafka-console-producer: 500 records with headers and keys, gzip, acks=all"
n=500
for i in $(seq 1 $n); do printf 'h1:a%s,h2:b\tkey-%s\tvalue-%s\n' "$i" "$i" "$i"; done >"$work/in"
"${J[@]}" org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$B" --topic "$topic" \
    --compression-codec gzip --command-property acks=all --command-property linger.ms=5 \
    --reader-property parse.key=true --reader-property parse.headers=true <"$work/in" \
    || fail "ConsoleProducer"

consume() {
    "${J[@]}" org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$B" --topic "$topic" \
        --group "$group" --from-beginning --max-messages "$n" --timeout-ms 30000 \
        --formatter-property print.key=true --formatter-property print.headers=true \
        --command-property auto.commit.interval.ms=200 >"$1" 2>"$1.err" \
        || { cat "$1.err" >&2; fail "ConsoleConsumer"; }
    sort "$1" >"$1.sorted"
    sort "$work/in" >"$work/in.sorted"
    cmp -s "$work/in.sorted" "$1.sorted" \
        || { diff "$work/in.sorted" "$1.sorted" | head -5 >&2; fail "console consumer output differs from input ($(wc -l <"$1") lines)"; }
}
step "kafka-console-consumer --group $group --from-beginning"
consume "$work/out1"
echo "read back $n records, keys, values and headers identical"

describe() {
    "${J[@]}" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server "$B" \
        --describe --group "$group" >"$work/grp" 2>&1 || { cat "$work/grp" >&2; fail "ConsumerGroupCommand --describe"; }
    cat "$work/grp"
}
# columns: GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
step "kafka-consumer-groups --describe: lag 0"
describe
lags=$(awk -v t="$topic" '$2 == t {print $3 ":" $4 ":" $5 ":" $6}' "$work/grp")
[ "$(echo "$lags" | wc -l)" -eq 3 ] || fail "describe lists $(echo "$lags" | wc -l) partitions, want 3"
echo "$lags" | awk -F: '$4 != "0" || $2 != $3 {bad=1} END {exit bad}' || fail "lag is not 0: $lags"

step "kafka-consumer-groups --reset-offsets --to-earliest --execute"
"${J[@]}" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server "$B" \
    --reset-offsets --to-earliest --execute --group "$group" --topic "$topic" || fail "--reset-offsets"
describe
sum=$(awk -v t="$topic" '$2 == t {c += $4; l += $6} END {print c ":" l}' "$work/grp")
[ "$sum" = "0:$n" ] || fail "after reset: current offsets sum:lag sum = $sum, want 0:$n"
step "kafka-console-consumer again in the reset group: all $n records again"
consume "$work/out2"

step "kafka-producer-perf-test: 100000 records of 100 B, acks=all"
"${J[@]}" org.apache.kafka.tools.ProducerPerformance --bootstrap-server "$B" --topic "$perf" \
    --num-records 100000 --record-size 100 --throughput -1 \
    --command-property acks=all linger.ms=5 batch.size=65536 >"$work/pp" 2>&1 || { cat "$work/pp" >&2; fail "ProducerPerformance"; }
tail -1 "$work/pp"
grep -q "^100000 records sent" "$work/pp" || fail "ProducerPerformance did not report 100000 records sent"

step "kafka-consumer-perf-test: 100000 records"
"${J[@]}" org.apache.kafka.tools.ConsumerPerformance --bootstrap-server "$B" --topic "$perf" \
    --num-records 100000 --timeout 30000 --group "$group-perf" >"$work/cp" 2>&1 || { cat "$work/cp" >&2; fail "ConsumerPerformance"; }
cat "$work/cp"
# header: start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, ...
got=$(awk -F', *' 'NR == 2 {print $5}' "$work/cp")
[ "$got" = "100000" ] || fail "ConsumerPerformance consumed '$got' records, want 100000"

step "kafka-topics --delete"
"${J[@]}" org.apache.kafka.tools.TopicCommand --bootstrap-server "$B" --delete --topic "$perf" || fail "TopicCommand --delete"
echo "java tools OK"
