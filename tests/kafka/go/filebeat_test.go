// TestFilebeatStyleProducer: a Sarama AsyncProducer configured the way Filebeat 8.x's Kafka
// output (libbeat/outputs/kafka, which runs Elastic's fork of Sarama) configures it by default,
// floods a fresh 6-partition topic with 200,000 keyless JSON log events (~300 bytes each, like
// Filebeat's JSON codec output) and wants 200,000 successes and no error. Right after the last
// success, ListOffsets(latest) must cover every acknowledged record (a single Kafka broker moves
// the high watermark with the leader's append, acks=1 included). Then it reads the topic back
// with franz-go from the earliest offsets and checks every event arrived exactly once,
// byte-identical (value, null key, no headers, timestamp), in order per partition, at the
// partition and offset the producer's success reported.
//
// Settings mirrored (libbeat's defaultConfig() and newSaramaConfig(); Filebeat 8.x docs):
//
//	client_id: beats                   -> Config.ClientID = "beats"
//	version: 2.1.0 (8.x default)       -> Config.Version = sarama.V2_1_0_0 (Produce v7, Metadata v7)
//	required_acks: 1                   -> Producer.RequiredAcks = sarama.WaitForLocal
//	compression: gzip, level 4         -> Producer.Compression = gzip, Producer.CompressionLevel = 4
//	bulk_max_size: 2048                -> Producer.Flush.MaxMessages = 2048
//	bulk_flush_frequency: 0            -> Producer.Flush.Frequency left 0 (flush as fast as possible)
//	max_message_bytes: 1000000         -> Producer.MaxMessageBytes = 1000000 (the documented value;
//	                                      libbeat leaves Sarama's default when unset)
//	channel_buffer_size: 256           -> Config.ChannelBufferSize = 256
//	max_retries: 3                     -> Producer.Retry.Max = 3
//	backoff.init: 1s, backoff.max: 60s -> Producer.Retry.BackoffFunc: libbeat's makeBackoffFunc,
//	                                      exponential with equal jitter in [d/2, d] (copied below)
//	metadata.retry.max: 3, .backoff: 250ms -> Metadata.Retry.Max = 3, Metadata.Retry.Backoff = 250ms
//	metadata.refresh_frequency: 10m, metadata.full: false -> Metadata.RefreshFrequency, Metadata.Full
//	timeout: 30s                       -> Net.DialTimeout / ReadTimeout / WriteTimeout = 30s
//	broker_timeout: 10s                -> Producer.Timeout = 10s
//	keep_alive: 0                      -> Net.KeepAlive = 0
//	(always)                           -> Producer.Return.Successes = true, Return.Errors = true
//	(not set by libbeat)               -> not idempotent, Net.MaxOpenRequests left at 5
//	partition.round_robin              -> sarama.NewRoundRobinPartitioner (Filebeat's default is
//	                                      partition.hash, which for keyless events picks a random
//	                                      partition; round-robin makes per-partition order checkable)
//
// Messages are built like libbeat's client: Key = ByteEncoder(nil) (a null key), Value = the
// encoded event, Timestamp = the event's @timestamp, no headers.

package kafkatest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log"
	"math"
	"math/rand"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// libbeat's makeBackoffFunc (backoff.init / backoff.max): exponential backoff with equal jitter.
func filebeatBackoffFunc(initial, max time.Duration) func(retries, maxRetries int) time.Duration {
	maxBackoffRetries := int(math.Ceil(math.Log2(float64(max) / float64(initial))))
	return func(retries, _ int) time.Duration {
		dur := max
		if retries < maxBackoffRetries {
			dur = time.Duration(uint64(initial) * uint64(1<<retries))
		}
		limit := int64(dur / 2)
		return time.Duration(limit + rand.Int63n(limit+1))
	}
}

func filebeatSaramaConfig() *sarama.Config {
	k := sarama.NewConfig()
	k.ClientID = "beats"
	k.Version = sarama.V2_1_0_0
	k.Net.DialTimeout = 30 * time.Second
	k.Net.ReadTimeout = 30 * time.Second
	k.Net.WriteTimeout = 30 * time.Second
	k.Net.KeepAlive = 0
	k.Producer.Timeout = 10 * time.Second
	k.Producer.CompressionLevel = 4
	k.Producer.Compression = sarama.CompressionGZIP
	k.Metadata.Retry.Max = 3
	k.Metadata.Retry.Backoff = 250 * time.Millisecond
	k.Metadata.RefreshFrequency = 10 * time.Minute
	k.Metadata.Full = false
	k.Producer.MaxMessageBytes = 1_000_000
	k.Producer.RequiredAcks = sarama.WaitForLocal
	k.Producer.Return.Successes = true
	k.Producer.Return.Errors = true
	k.Producer.Retry.Max = 3
	k.Producer.Retry.BackoffFunc = filebeatBackoffFunc(1*time.Second, 60*time.Second)
	k.ChannelBufferSize = 256
	k.Producer.Flush.MaxMessages = 2048
	k.Producer.Partitioner = sarama.NewRoundRobinPartitioner
	k.Producer.Idempotent = false
	return k
}

// filebeatEvents makes n JSON events shaped like Filebeat's output (JSON codec, one line each,
// ~300 bytes) for lines of /var/log/app.log; event.sequence is the line number, log.offset
// the byte offset of the line in the file. Deterministic except for the time base.
func filebeatEvents(n int, base time.Time) ([][]byte, []time.Time) {
	levels := []string{"INFO", "INFO", "INFO", "WARN", "DEBUG", "ERROR"}
	paths := []string{"/api/v1/orders", "/api/v1/users/me", "/healthz", "/api/v1/cart/items", "/static/app.js"}
	events := make([][]byte, n)
	stamps := make([]time.Time, n)
	var offset int64
	for i := 0; i < n; i++ {
		ts := base.Add(time.Duration(i) * time.Millisecond)
		stamps[i] = ts
		tss := ts.UTC().Format("2006-01-02T15:04:05.000Z")
		msg := fmt.Sprintf("%-5s %s %s %d %dms", levels[i%len(levels)], []string{"GET", "POST"}[i%2],
			paths[i%len(paths)], []int{200, 200, 201, 404, 500}[i%5], (i*31)%900)
		ev := fmt.Sprintf(`{"@timestamp":%q,"@metadata":{"beat":"filebeat","type":"_doc","version":"8.19.0"},`+
			`"log":{"offset":%d,"file":{"path":"/var/log/app.log"}},"message":%q,`+
			`"input":{"type":"filestream"},"host":{"name":"web-%02d"},"event":{"sequence":%d}}`,
			tss, offset, msg, i%4, i)
		offset += int64(len(msg)) + 1
		events[i] = []byte(ev)
	}
	return events, stamps
}

func TestFilebeatStyleProducer(t *testing.T) {
	const total = 200_000
	const parts = 6
	ctx, cancel := context.WithTimeout(context.Background(), 110*time.Second)
	defer cancel()
	// Sarama's own log (connections, retries, metadata refreshes) is kept and printed on failure
	var saramaLines saramaLog
	oldLogger := sarama.Logger
	sarama.Logger = log.New(&saramaLines, "[sarama] ", log.Ltime|log.Lmicroseconds)
	defer func() {
		sarama.Logger = oldLogger
		if t.Failed() || os.Getenv("KAFKA_TEST_SARAMA_LOG") == "1" {
			t.Logf("sarama's log (without its \"maximum request accumulated\" lines):\n%s", saramaLines.String())
		}
	}()

	adminCl, err := kgo.NewClient(kgo.SeedBrokers(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	defer adminCl.Close()
	adm := kadm.NewClient(adminCl)
	topic := uniq("filebeat")
	if _, err := adm.CreateTopic(ctx, parts, 1, nil, topic); err != nil {
		t.Fatalf("CreateTopics %s: %v", topic, err)
	}
	defer adm.DeleteTopics(context.Background(), topic)
	for ready := false; !ready; {
		if ctx.Err() != nil {
			t.Fatalf("topic %s never showed %d partitions with leaders", topic, parts)
		}
		td, err := adm.ListTopics(ctx, topic)
		if err == nil && td.Has(topic) && td[topic].Err == nil && len(td[topic].Partitions) == parts {
			ready = true
			for _, p := range td[topic].Partitions {
				if p.Leader < 0 || p.Err != nil {
					ready = false
				}
			}
		}
		if !ready {
			time.Sleep(100 * time.Millisecond)
		}
	}

	base := time.Now().Add(-10 * time.Minute).Truncate(time.Millisecond)
	events, stamps := filebeatEvents(total, base)
	var totalBytes int
	minLen, maxLen := math.MaxInt, 0
	for _, e := range events {
		totalBytes += len(e)
		minLen, maxLen = min(minLen, len(e)), max(maxLen, len(e))
	}
	t.Logf("topic %s: %d events, %d..%d bytes (avg %d), %.1f MB", topic, total, minLen, maxLen,
		totalBytes/total, float64(totalBytes)/1e6)

	// ---- produce: the async producer, fed as fast as it takes events
	prod, err := sarama.NewAsyncProducer([]string{bootstrap}, filebeatSaramaConfig())
	if err != nil {
		t.Fatalf("NewAsyncProducer: %v", err)
	}
	// where the producer says each event went (partition, offset); -1 = no success yet
	ackPart := make([]int32, total)
	ackOff := make([]int64, total)
	for i := range ackPart {
		ackPart[i] = -1
	}
	var mu sync.Mutex
	var nOK, nErr, nDupAck int
	var errSamples []string
	finished := make(chan struct{})
	var finishOnce sync.Once
	check := func() {
		if nOK+nErr >= total {
			finishOnce.Do(func() { close(finished) })
		}
	}
	var drain sync.WaitGroup
	drain.Add(2)
	go func() {
		defer drain.Done()
		for m := range prod.Successes() {
			i := m.Metadata.(int)
			mu.Lock()
			if ackPart[i] >= 0 {
				nDupAck++
			}
			ackPart[i], ackOff[i] = m.Partition, m.Offset
			nOK++
			check()
			mu.Unlock()
		}
	}()
	go func() {
		defer drain.Done()
		for e := range prod.Errors() {
			mu.Lock()
			nErr++
			if len(errSamples) < 10 {
				errSamples = append(errSamples, fmt.Sprintf("event %v (partition %d): %v",
					e.Msg.Metadata, e.Msg.Partition, e.Err))
			}
			check()
			mu.Unlock()
		}
	}()
	t0 := time.Now()
	sent := 0
send:
	for i := 0; i < total; i++ {
		msg := &sarama.ProducerMessage{
			Topic:     topic,
			Key:       sarama.ByteEncoder(nil),
			Value:     sarama.ByteEncoder(events[i]),
			Timestamp: stamps[i],
			Metadata:  i,
		}
		select {
		case prod.Input() <- msg:
			sent++
		case <-ctx.Done():
			break send
		}
	}
	tInput := time.Since(t0)
	select {
	case <-finished:
	case <-ctx.Done():
	}
	elapsed := time.Since(t0)
	prod.AsyncClose()
	drained := make(chan struct{})
	go func() { drain.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(15 * time.Second):
		t.Errorf("the producer did not shut down within 15 s")
	}
	mu.Lock()
	ok, nerr, dup := nOK, nErr, nDupAck
	samples := append([]string(nil), errSamples...)
	mu.Unlock()
	t.Logf("filebeat-style produced %d events (gzip level 4, acks=1, Produce v7) in %v: %.0f events/s, "+
		"%.1f MB/s uncompressed (all handed to Input() after %v); %d successes, %d errors",
		sent, elapsed.Round(time.Millisecond), float64(ok)/elapsed.Seconds(),
		float64(totalBytes)/1e6/elapsed.Seconds(), tInput.Round(time.Millisecond), ok, nerr)
	if ok != total || nerr != 0 || dup != 0 || sent != total {
		t.Fatalf("want %d successes and 0 errors: sent %d, %d successes, %d errors, %d duplicate acks "+
			"(timed out: %v); errors: %v", total, sent, ok, nerr, dup, ctx.Err() != nil, samples)
	}

	// ---- end offsets: right after the last acks=1 success, ListOffsets(latest) must cover every
	// acknowledged record (on a single broker the high watermark moves with the leader's append)
	ackEnd := map[int32]int64{} // per partition, 1 + the highest offset a success reported
	for i := range ackPart {
		ackEnd[ackPart[i]] = max(ackEnd[ackPart[i]], ackOff[i]+1)
	}
	var ackSum int64
	for _, e := range ackEnd {
		ackSum += e
	}
	if len(ackEnd) != parts || ackSum != total {
		t.Errorf("the successes reported offsets up to %v (sum %d), want %d partitions summing to %d",
			ackEnd, ackSum, parts, total)
	}
	listEnds := func() (map[int32]int64, int64) {
		ends, err := adm.ListEndOffsets(ctx, topic)
		if err != nil {
			t.Fatalf("ListEndOffsets: %v", err)
		}
		endOf := map[int32]int64{}
		var sum int64
		ends.Each(func(o kadm.ListedOffset) {
			if o.Err != nil {
				t.Errorf("ListEndOffsets partition %d: %v", o.Partition, o.Err)
			}
			endOf[o.Partition] = o.Offset
			sum += o.Offset
		})
		return endOf, sum
	}
	tAcked := t0.Add(elapsed) // when the last success (or error) came in
	endOf, sum := listEnds()
	// acks=1 answers once a record is written; a broker may show it to readers (the end
	// offset, the high watermark) only once it is safe: a replicated Kafka once followers
	// have it, tidewater once it is on disk (its next fsync, milliseconds later). So the end
	// offsets must reach every acknowledged record, but may take a moment to.
	for deadline := time.Now().Add(10 * time.Second); (len(endOf) != parts || sum != total) && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		endOf, sum = listEnds()
	}
	if len(endOf) != parts || sum != total {
		t.Errorf("end offsets %v (sum %d) %v after the last success, want %d partitions summing to %d "+
			"(the successes reported offsets up to %v)", endOf, sum, time.Since(tAcked).Round(100*time.Microsecond),
			parts, total, ackEnd)
	}
	starts, err := adm.ListStartOffsets(ctx, topic)
	if err != nil {
		t.Fatalf("ListStartOffsets: %v", err)
	}
	starts.Each(func(o kadm.ListedOffset) {
		if o.Err != nil || o.Offset != 0 {
			t.Errorf("partition %d: start offset %d (err %v), want 0", o.Partition, o.Offset, o.Err)
		}
	})

	// ---- read back with franz-go from the earliest offsets, up to the acknowledged ends
	t1 := time.Now()
	cons, err := kgo.NewClient(
		kgo.SeedBrokers(bootstrap),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer cons.Close()
	seen := make([]int32, total)
	lastSeq := map[int32]int{}
	lastOff := map[int32]int64{}
	for p := int32(0); p < parts; p++ {
		lastSeq[p], lastOff[p] = -1, -1
	}
	var bad []string
	nBad := 0
	fail := func(format string, args ...any) {
		nBad++
		if len(bad) < 20 {
			bad = append(bad, fmt.Sprintf(format, args...))
		}
	}
	got := 0
	caughtUp := func() bool {
		for p, e := range ackEnd {
			if lastOff[p] < e-1 {
				return false
			}
		}
		return true
	}
	lastProgress := time.Now()
	stalled := false
	for !caughtUp() && ctx.Err() == nil && nBad < 1000 {
		if time.Since(lastProgress) > 15*time.Second {
			stalled = true
			break
		}
		pctx, pcancel := context.WithTimeout(ctx, time.Second)
		fs := cons.PollFetches(pctx)
		pcancel()
		fs.EachError(func(tp string, p int32, err error) {
			if err != context.DeadlineExceeded && err != context.Canceled {
				fail("fetch error %s/%d: %v", tp, p, err)
			}
		})
		fs.EachRecord(func(r *kgo.Record) {
			got++
			lastProgress = time.Now()
			var ev struct {
				Event struct {
					Sequence *int `json:"sequence"`
				} `json:"event"`
			}
			if err := json.Unmarshal(r.Value, &ev); err != nil || ev.Event.Sequence == nil ||
				*ev.Event.Sequence < 0 || *ev.Event.Sequence >= total {
				fail("p%d@%d: not one of our events (%v): %.120q", r.Partition, r.Offset, err, r.Value)
				return
			}
			i := *ev.Event.Sequence
			p := r.Partition
			seen[i]++
			if seen[i] > 1 {
				fail("event %d seen %d times (now p%d@%d)", i, seen[i], p, r.Offset)
			}
			if !bytes.Equal(r.Value, events[i]) {
				fail("event %d at p%d@%d: value differs:\n got  %q\n want %q", i, p, r.Offset, r.Value, events[i])
			}
			if r.Key != nil {
				fail("event %d at p%d@%d: key %q, want null", i, p, r.Offset, r.Key)
			}
			if len(r.Headers) != 0 {
				fail("event %d at p%d@%d: headers %v, want none", i, p, r.Offset, r.Headers)
			}
			if r.Timestamp.UnixMilli() != stamps[i].UnixMilli() {
				fail("event %d at p%d@%d: timestamp %d, want %d", i, p, r.Offset,
					r.Timestamp.UnixMilli(), stamps[i].UnixMilli())
			}
			if ackPart[i] != p || ackOff[i] != r.Offset {
				fail("event %d read at p%d@%d, but the producer's success said p%d@%d", i, p, r.Offset,
					ackPart[i], ackOff[i])
			}
			if int32(i%parts) != p {
				fail("event %d in partition %d; round-robin over %d partitions puts it in %d", i, p, parts, i%parts)
			}
			if r.Offset != lastOff[p]+1 {
				fail("p%d: offset %d follows %d", p, r.Offset, lastOff[p])
			}
			if i <= lastSeq[p] {
				fail("p%d@%d: event %d follows event %d (per-partition order broken)", p, r.Offset, i, lastSeq[p])
			}
			lastOff[p], lastSeq[p] = r.Offset, i
		})
	}
	missing := 0
	firstMissing := -1
	for i, n := range seen {
		if n == 0 {
			missing++
			if firstMissing < 0 {
				firstMissing = i
			}
		}
	}
	t.Logf("filebeat-style consumed %d records in %v; %d missing, %d problems; last offsets %v, acked ends %v",
		got, time.Since(t1).Round(time.Millisecond), missing, nBad, lastOff, ackEnd)
	if nBad > 0 {
		t.Fatalf("%d problems reading back, first %d:\n  %s", nBad, len(bad), strings.Join(bad, "\n  "))
	}
	if stalled || ctx.Err() != nil {
		t.Fatalf("reading back stalled or timed out (nothing new for 15 s: %v): %d of %d records; "+
			"last offsets read %v, acked ends %v", stalled, got, total, lastOff, ackEnd)
	}
	if got != total || missing != 0 {
		t.Fatalf("read %d records, %d events missing (first %d), want exactly %d", got, missing, firstMissing, total)
	}
}

// saramaLog collects Sarama's log lines (it logs from many goroutines).
type saramaLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *saramaLog) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("maximum request accumulated")) {
		return len(p), nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.buf.Len() < 1<<20 {
		l.buf.Write(p)
	}
	return len(p), nil
}

func (l *saramaLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}
