"""confluent-kafka (librdkafka) over SASL_SSL against tidewater with authentication and TLS on.

Run by scripts/kafka-clients-test (test `confluent-secure`, tidewater only), which starts a
tidewater with `[tls]` (a test CA made with openssl), `[auth] enabled = true` and an admin
key from TIDEWATER_ADMIN_KEY, and sets:
  TW_SECURE_BOOTSTRAP  its Kafka listener (host:port)
  TW_SECURE_HTTP       its HTTP listener (https://host:port)
  TW_SECURE_CA         the CA's PEM file
  TW_SECURE_ADMIN      the admin key's token (<key id>.<secret>)
  TW_SECURE_CLIENT_CERT, TW_SECURE_CLIENT_KEY  a client certificate (CN=cert-app) the CA signed
  TW_SECURE_IDP_KEY    an identity provider's ES256 signing key (tests/kafka/idp.py), whose
                       JWKS the server has as [auth.jwt] (issuer https://idp.tidewater.test,
                       audience tidewater)

What it shows: SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN over TLS with API keys; OAUTHBEARER
with the identity provider's JWTs, re-authenticating on the connection as tokens expire
(KIP-368), and tokens it did not sign refused; a wrong secret refused; a principal without the grant refused with Kafka's authorization errors; a
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


IDP_ISSUER, IDP_AUDIENCE = "https://idp.tidewater.test", "tidewater"


def idp_token(principal, lifetime_s=600, key_file=None, **claims):
    """A JWT the identity provider signs (ES256, key id idp-1): (token, expiry in epoch s)."""
    import jwt

    now = int(time.time())
    with open(key_file or os.environ["TW_SECURE_IDP_KEY"]) as f:
        pem = f.read()
    body = {"sub": principal, "iss": IDP_ISSUER, "aud": IDP_AUDIENCE, "iat": now,
            "exp": now + lifetime_s, **claims}
    return jwt.encode(body, pem, algorithm="ES256", headers={"kid": "idp-1"}), float(now + lifetime_s)


def bearer_conf(token, **extra):
    """SASL_SSL with OAUTHBEARER, the token from `token()` (librdkafka's oauth_cb, called
    again to refresh it before it expires)."""
    base = {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": CA,
        "sasl.mechanism": "OAUTHBEARER",
        "oauth_cb": lambda _config: token(),
    }
    base.update(extra)
    return base


def read_all(base, group, topic, n, seconds=90):
    """The distinct values a consumer in `group` reads of `topic` from the start, until it has
    `n` or `seconds` pass; commits them."""
    consumer = Consumer({**base, "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen = set()
    deadline = time.time() + seconds
    while len(seen) < n and time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None:
            assert msg.error() is None, msg.error()
            seen.add(msg.value())
    consumer.commit(asynchronous=False)
    consumer.close()
    return seen


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
    seen = read_all(conf(user, password, mechanism), group, topic, n)
    assert len(seen) == n, f"{mechanism}: read {len(seen)} of {n}"
    print(f"{mechanism}: produced and consumed {n} over SASL_SSL")


def test_oauthbearer_tokens_from_an_identity_provider_and_reauthentication():
    """The identity provider's JWTs over SASL/OAUTHBEARER: a principal granted by its `sub`
    produces and consumes. Its tokens live 6 s: the server gives the session that lifetime,
    and the client authenticates again on the same connection with a fresh token (KIP-368)
    rather than being disconnected when the first one expires."""
    if not os.environ.get("TW_SECURE_IDP_KEY"):
        pytest.skip("no identity provider key")
    topic, group = uniq("t"), uniq("g")
    make_topic(topic, 1)
    principal = uniq("idp-app")
    grant(principal, "stream", topic, ["produce", "consume"])
    grant(principal, "group", group, ["consume"])
    issued = []

    def token():
        made = idp_token(principal, lifetime_s=6)
        issued.append(made[1])
        return made

    stats = []
    producer = Producer(bearer_conf(token, **{
        "statistics.interval.ms": 1000, "stats_cb": lambda s: stats.append(json.loads(s)),
    }))
    delivered = []
    sent = 0
    deadline = time.time() + 15
    while time.time() < deadline:
        producer.produce(topic, value=f"v{sent}".encode(), on_delivery=lambda err, msg: delivered.append(err))
        sent += 1
        producer.poll(0.25)
    assert producer.flush(30) == 0
    assert delivered == [None] * sent, [e for e in delivered if e is not None][:3]
    assert len(issued) >= 2, f"the token was not refreshed: {issued}"
    brokers = [b for b in stats[-1]["brokers"].values() if b["nodeid"] >= 0]
    assert brokers, stats[-1]["brokers"].keys()
    assert sum(b["disconnects"] for b in brokers) == 0, [(b["name"], b["connects"], b["disconnects"]) for b in brokers]
    seen = read_all(bearer_conf(lambda: idp_token(principal)), group, topic, sent)
    assert len(seen) == sent, f"read {len(seen)} of {sent}"
    print(f"OAUTHBEARER: {sent} produced over {len(issued)} tokens of 6 s, no disconnect; consumed")


def test_oauthbearer_tokens_the_identity_provider_did_not_sign_are_refused(tmp_path):
    if not os.environ.get("TW_SECURE_IDP_KEY"):
        pytest.skip("no identity provider key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    forged_key = tmp_path / "forged.pem"
    forged_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # (An expired token librdkafka will not send: the server's own tests cover expiry.)
    for name, token in [
        ("another key", lambda: idp_token("mallory", key_file=forged_key)),
        ("another audience", lambda: idp_token("mallory", aud="elsewhere")),
        ("another issuer", lambda: idp_token("mallory", iss="https://evil.example")),
    ]:
        errors = []
        producer = Producer(bearer_conf(token, **{"error_cb": lambda e: errors.append(e)}))
        producer.produce(uniq("t"), value=b"x")
        # The first refusal is enough: the client would retry, each a failed attempt
        # counted against this address.
        deadline = time.time() + 10
        while not errors and time.time() < deadline:
            producer.poll(0.05)
        assert errors and errors[0].code() == KafkaError._AUTHENTICATION, (name, errors)
        assert "invalid token" in errors[0].str(), (name, errors[0])
        producer.purge()
        del producer
        print(f"OAUTHBEARER {name}: refused", errors[0])


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
