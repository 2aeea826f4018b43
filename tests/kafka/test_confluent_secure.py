"""confluent-kafka (librdkafka) over SASL_SSL against tidewater with authentication and TLS on.

Run by scripts/kafka-clients-test (test `confluent-secure`, tidewater only), which starts a
tidewater with `[tls]` (a test CA made with openssl), `[auth] enabled = true` and an admin
key from TIDEWATER_ADMIN_KEY, and sets:
  TW_SECURE_BOOTSTRAP  its Kafka listener (host:port)
  TW_SECURE_HTTP       its HTTP listener (https://host:port)
  TW_SECURE_CA         the CA's PEM file
  TW_SECURE_ADMIN      the admin key's token (<key id>.<secret>)
  TW_SECURE_CLIENT_CERT, TW_SECURE_CLIENT_KEY  a client certificate (CN=cert-app) the CA signed

What it shows: SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN over TLS with API keys; a wrong
secret refused; a principal without the grant refused with Kafka's authorization errors; a
consumer group of an authorized principal reads everything produced and commits.
"""

import json
import os
import ssl
import time
import urllib.request
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP = os.environ.get("TW_SECURE_BOOTSTRAP")
HTTP = os.environ.get("TW_SECURE_HTTP")
CA = os.environ.get("TW_SECURE_CA")
ADMIN = os.environ.get("TW_SECURE_ADMIN")

pytestmark = pytest.mark.skipif(
    not (BOOTSTRAP and HTTP and CA and ADMIN),
    reason="needs a secured tidewater (scripts/kafka-clients-test --only confluent-secure)",
)


def api(method, path, body=None):
    """Calls tidewater's HTTP API over TLS as the admin."""
    context = ssl.create_default_context(cafile=CA)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        HTTP + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        return json.loads(reply.read() or b"null")


def key(principal):
    made = api("POST", "/v1/auth/keys", {"principal": principal})
    return made["key"]["id"], made["secret"]


def grant(principal, resource, name, ops):
    api("POST", "/v1/auth/acls", {"principal": principal, "resource": resource, "name": name, "operations": ops})


def conf(user, password, mechanism, **extra):
    base = {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": CA,
        "sasl.mechanism": mechanism,
        "sasl.username": user,
        "sasl.password": password,
    }
    base.update(extra)
    return base


def uniq(name):
    return f"tw-sec-{name}-{uuid.uuid4().hex[:8]}"


def make_topic(topic, partitions=3):
    admin = AdminClient(conf(*ADMIN.split(".", 1), "SCRAM-SHA-256"))
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_a_granted_principal_produces_and_its_group_consumes(mechanism):
    topic, group = uniq("t"), uniq("g")
    make_topic(topic)
    principal = uniq("app")
    user, password = key(principal)
    grant(principal, "stream", topic, ["produce", "consume"])
    grant(principal, "group", group, ["consume"])
    producer = Producer(conf(user, password, mechanism, **{"enable.idempotence": True}))
    n = 3000
    for i in range(n):
        producer.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
        if i % 500 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    consumer = Consumer(conf(user, password, mechanism, **{
        "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False,
    }))
    consumer.subscribe([topic])
    seen = set()
    deadline = time.time() + 90
    while len(seen) < n and time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        seen.add(msg.value())
    consumer.commit(asynchronous=False)
    consumer.close()
    assert len(seen) == n, f"{mechanism}: read {len(seen)} of {n}"
    print(f"{mechanism}: produced and consumed {n} over SASL_SSL")


def test_a_wrong_secret_is_refused():
    user, _ = key(uniq("app"))
    errors = []
    producer = Producer(conf(user, "not-the-secret-at-all", "SCRAM-SHA-512", **{
        "error_cb": lambda e: errors.append(e),
    }))
    producer.produce(uniq("t"), value=b"x")
    producer.flush(10)
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    print("wrong secret: refused", errors[0])


def test_without_the_grant_requests_are_refused_with_kafkas_authorization_errors():
    topic = uniq("t")
    make_topic(topic, 1)
    principal = uniq("reader")
    user, password = key(principal)
    grant(principal, "stream", topic, ["consume"])  # may read, may not write
    producer = Producer(conf(user, password, "SCRAM-SHA-256"))
    failures = []
    producer.produce(topic, value=b"x", on_delivery=lambda err, msg: failures.append(err))
    producer.flush(30)
    assert failures and failures[0] is not None, failures
    assert failures[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, failures[0]
    # No grant on the group: joining it is refused.
    consumer = Consumer(conf(user, password, "SCRAM-SHA-256", **{
        "group.id": uniq("g"), "auto.offset.reset": "earliest",
    }))
    consumer.subscribe([topic])
    error = None
    deadline = time.time() + 30
    while error is None and time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is not None:
            error = msg.error()
    consumer.close()
    assert error is not None and error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED, error
    print("without the grant: produce", failures[0].name(), "and join", error.name())


def test_a_client_certificate_authenticates_over_ssl_without_sasl():
    cert, key_file = os.environ.get("TW_SECURE_CLIENT_CERT"), os.environ.get("TW_SECURE_CLIENT_KEY")
    if not (cert and key_file):
        pytest.skip("no client certificate")
    topic = uniq("t")
    make_topic(topic, 1)
    ssl_conf = {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": "SSL",
        "ssl.ca.location": CA,
        "ssl.certificate.location": cert,
        "ssl.key.location": key_file,
    }
    # May see the topic, may not write to it yet.
    grant("cert-app", "stream", topic, ["describe"])
    failures = []
    producer = Producer(dict(ssl_conf, on_delivery=lambda err, msg: failures.append(err)))
    producer.produce(topic, value=b"before the grant")
    producer.flush(30)
    assert failures and failures[0] is not None and failures[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, failures
    grant("cert-app", "stream", topic, ["produce"])
    failures.clear()
    # A new producer (librdkafka remembers the topic's authorization error until its next
    # metadata refresh).
    producer = Producer(dict(ssl_conf, on_delivery=lambda err, msg: failures.append(err)))
    producer.produce(topic, value=b"after the grant")
    producer.flush(30)
    assert failures == [None], failures
    print("client certificate CN=cert-app over SSL: refused, then produced once granted")
