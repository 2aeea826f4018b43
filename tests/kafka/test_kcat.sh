#!/usr/bin/env bash
# kcat (librdkafka, Debian's build) against $KAFKA_BOOTSTRAP (default 127.0.0.1:9092):
# produce with keys (-K:), headers (-H) and compression (-z, and zstd through -X), consume with
# -C -e, metadata with -L, a balanced consumer group with -G, timestamps query with -Q.
# Topics are made with CreateTopics through tests/kafka/kafka_admin.py (confluent-kafka).
# Exit 0 on success, 77 when kcat is not installed (skip), 1 with a message on failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
B=${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
PY="$root/target/kafka/venv/bin/python"
[ -x "$PY" ] || PY=python3

if ! command -v kcat >/dev/null; then
    echo "SKIP: kcat is not installed (scripts/kafka-deps installs it with apt-get as root)" >&2
    exit 77
fi
fail() { echo "FAIL (kcat): $*" >&2; exit 1; }
admin() { KAFKA_BOOTSTRAP=$B "$PY" "$here/kafka_admin.py" "$@"; }

work=$(mktemp -d)
suffix=$(date +%s%N | tail -c 9)
topic="tw-kcat-$suffix"
group="tw-kcat-group-$suffix"
cleanup() { admin delete "$topic" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

admin create "$topic" 4
echo "kcat $(kcat -V | sed -n 's/^Version //p')"

# 3 x 1000 records, key:value lines, two headers, three codecs (snappy, lz4, zstd)
n=1000
for codec in snappy lz4 zstd; do
    for i in $(seq 1 $n); do echo "$codec-key-$i:$codec-value-$i"; done >"$work/in-$codec"
    if [ "$codec" = zstd ]; then zopt=(-X compression.codec=zstd); else zopt=(-z "$codec"); fi
    kcat -b "$B" -P -t "$topic" -K: -H "src=kcat" -H "codec=$codec" "${zopt[@]}" \
        -X acks=all -l "$work/in-$codec" || fail "produce $codec"
done
total=$((3 * n))

# read back everything from the beginning: key|value|headers
timeout 60 kcat -b "$B" -C -t "$topic" -o beginning -e -q -f '%k|%s|%h\n' >"$work/out" \
    || fail "consume -C -e"
got=$(wc -l <"$work/out")
[ "$got" -eq "$total" ] || fail "consumed $got records, expected $total"
for codec in snappy lz4 zstd; do
    sed 's/:/|/; s/$/|src=kcat,codec='"$codec"'/' "$work/in-$codec" | sort >"$work/want-$codec"
    grep "^$codec-" "$work/out" | sort >"$work/got-$codec"
    cmp -s "$work/want-$codec" "$work/got-$codec" \
        || { diff "$work/want-$codec" "$work/got-$codec" | head -5 >&2; fail "$codec records differ"; }
done
echo "produced and consumed $total records (snappy, lz4, zstd) with keys and headers"

# metadata: one broker, the topic with 4 partitions each with a leader
kcat -b "$B" -L -t "$topic" -J >"$work/md.json" || fail "metadata -L"
"$PY" - "$work/md.json" "$topic" <<'EOF' || fail "metadata content"
import json, sys
md = json.load(open(sys.argv[1]))
t = [t for t in md["topics"] if t["topic"] == sys.argv[2]]
assert t, f"topic missing from -L: {md}"
parts = t[0]["partitions"]
assert len(parts) == 4, f"{len(parts)} partitions"
assert all(p["leader"] >= 0 for p in parts), parts
assert md["brokers"], "no brokers"
print(f"metadata: {len(md['brokers'])} broker(s), {len(parts)} partitions")
EOF

# balanced consumer group: consume all, commit, then lag 0; a second run gets nothing
timeout 60 kcat -b "$B" -G "$group" -X auto.offset.reset=earliest -X enable.auto.commit=true \
    -X auto.commit.interval.ms=200 -e -q -f '%k\n' "$topic" >"$work/g1" || fail "-G run 1"
got=$(sort -u "$work/g1" | wc -l)
[ "$got" -eq "$total" ] || fail "group run 1 saw $got distinct keys, expected $total"
admin lag "$group" "$topic" || fail "group lag after -G run"
timeout 60 kcat -b "$B" -G "$group" -X auto.offset.reset=earliest -e -q -f '%k\n' "$topic" >"$work/g2" \
    || fail "-G run 2"
[ ! -s "$work/g2" ] || fail "group run 2 re-read $(wc -l <"$work/g2") records after a full commit"
echo "group $group: $total records, committed == end offsets, a second member run reads 0"

# query mode: offset for a timestamp far in the past is the first offset of the partition
q=$(kcat -b "$B" -Q -t "$topic:0:1000") || fail "-Q"
echo "$q" | grep -q "offset 0" || fail "-Q for timestamp 1000 gave: $q"
echo "kcat OK"
