"""Webhook hooks against a real tidewater, signed by the senders' own libraries: Standard
Webhooks (the `standardwebhooks` package, as Svix signs), Stripe (`stripe`'s signature
helper for tests), Slack (`slack_sdk`'s SignatureVerifier) and GitHub's documented example.
Each stored event is then checked downstream with the same library: the raw body and the
signature headers are kept byte for byte.

Run by scripts/edges-test (TIDEWATER_URL names the server)."""

import base64
import json
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests
import slack_sdk.signature
import standardwebhooks
import stripe

from tidewater_api import URL, api, fresh


def hook(target_queue, signature, **extra):
    name = fresh("hook")
    api("PUT", f"/v1/queues/{target_queue}", {})
    api("PUT", f"/v1/hooks/{name}", {"target": {"queue": target_queue}, "signature": signature, **extra})
    return name


def post(name, body, headers):
    return requests.post(f"{URL}/v1/hooks/{name}", data=body, headers=headers, timeout=30)


def stored(queue):
    """Every message of the queue, oldest first (peeked: left in place)."""
    reply = api("GET", f"/v1/queues/{queue}/messages?max=100&encoding=base64")
    out = []
    for m in reply["messages"]:
        body = base64.b64decode(m["body_base64"]) if "body_base64" in m else m["body"].encode()
        out.append((body, m["headers"], m["id"]))
    return out


def test_standard_webhooks_signed_by_the_reference_library():
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    queue = fresh("svix")
    name = hook(queue, {"preset": "standard_webhooks", "secrets": [secret]})
    sender = standardwebhooks.Webhook(secret)
    payload = json.dumps({"type": "invoice.paid", "data": {"id": 42, "note": "é ✓"}})
    msg_id = "msg_" + uuid.uuid4().hex
    now = datetime.now(tz=timezone.utc)
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": sender.sign(msg_id, now, payload),
        "content-type": "application/json",
    }
    first = post(name, payload.encode(), headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"id": msg_id, "duplicate": False}
    replay = post(name, payload.encode(), headers)
    assert replay.json() == {"id": msg_id, "duplicate": True}

    tampered = post(name, payload.replace("42", "43").encode(), headers)
    assert tampered.status_code == 401
    assert tampered.json()["code"] == "invalid_signature"
    old = now - timedelta(minutes=10)
    stale = dict(headers, **{
        "webhook-id": "msg_old",
        "webhook-timestamp": str(int(old.timestamp())),
        "webhook-signature": sender.sign("msg_old", old, payload),
    })
    refused = post(name, payload.encode(), stale)
    assert refused.status_code == 401 and "tolerance" in refused.json()["message"]

    [(body, kept, message_id)] = stored(queue)
    assert message_id == msg_id
    assert body == payload.encode()
    # Downstream, the reference library verifies the stored event as it arrived.
    assert sender.verify(body, kept) == json.loads(payload)


def test_stripe_signed_by_stripes_helper_and_rotated_secrets():
    old_secret, new_secret = "whsec_old_" + secrets.token_hex(8), "whsec_new_" + secrets.token_hex(8)
    queue = fresh("stripe")
    name = hook(queue, {"preset": "stripe", "secrets": [new_secret, old_secret]})
    event_id = "evt_" + uuid.uuid4().hex[:24]
    payload = json.dumps({"id": event_id, "object": "event", "type": "payment_intent.succeeded"})
    signed_old = stripe.WebhookSignature.generate_signature_header(payload, old_secret)
    answer = post(name, payload.encode(), {"Stripe-Signature": signed_old, "content-type": "application/json"})
    assert answer.json() == {"id": event_id, "duplicate": False}, answer.text
    # Stripe retries an event it got no 2xx for with the same id: stored once.
    signed_new = stripe.WebhookSignature.generate_signature_header(payload, new_secret)
    again = post(name, payload.encode(), {"Stripe-Signature": signed_new})
    assert again.json() == {"id": event_id, "duplicate": True}
    stale = stripe.WebhookSignature.generate_signature_header(payload, new_secret, timestamp=int(time.time()) - 600)
    assert post(name, payload.encode(), {"Stripe-Signature": stale}).status_code == 401

    # The old secret retired: refused from now on.
    api("PUT", f"/v1/hooks/{name}", {"signature": {"preset": "stripe", "secrets": [new_secret]}})
    other = json.dumps({"id": "evt_other", "object": "event"})
    refused = post(name, other.encode(), {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(other, old_secret)})
    assert refused.status_code == 401

    [(body, kept, _)] = stored(queue)
    event = stripe.Webhook.construct_event(body, kept["stripe-signature"], old_secret)
    assert event["id"] == event_id
    info = api("GET", f"/v1/hooks/{name}")
    assert info["stats"]["accepted"] == 1 and info["stats"]["duplicates"] == 1
    assert info["stats"]["signature_failures"] == 2
    assert old_secret not in json.dumps(info) and new_secret not in json.dumps(info)


def test_slack_signed_by_slack_sdk_and_url_verification():
    signing_secret = secrets.token_hex(16)
    queue = fresh("slack")
    name = hook(queue, {"preset": "slack", "secrets": [signing_secret]})
    verifier = slack_sdk.signature.SignatureVerifier(signing_secret)

    def slack_headers(body):
        ts = str(int(time.time()))
        return {
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": verifier.generate_signature(timestamp=ts, body=body),
            "content-type": "application/json",
        }

    challenge = json.dumps({"type": "url_verification", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "token": "x"})
    answer = post(name, challenge.encode(), slack_headers(challenge))
    assert answer.json() == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}

    event = json.dumps({"type": "event_callback", "event_id": "Ev0PV52K21", "event": {"type": "app_mention"}})
    headers = slack_headers(event)
    assert post(name, event.encode(), headers).json() == {"id": "Ev0PV52K21", "duplicate": False}
    assert post(name, event.encode(), headers).json()["duplicate"] is True

    [(body, kept, _)] = stored(queue)
    assert verifier.is_valid(body=body, timestamp=kept["x-slack-request-timestamp"], signature=kept["x-slack-signature"])


def test_github_documented_example():
    # "Validating webhook deliveries": this secret and body give this signature.
    queue = fresh("github")
    name = hook(queue, {"preset": "github", "secrets": ["It's a Secret to Everybody"]})
    headers = {
        "X-Hub-Signature-256": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-GitHub-Event": "ping",
    }
    answer = post(name, b"Hello, World!", headers)
    assert answer.status_code == 200, answer.text
    assert post(name, b"Hello, World?", headers).status_code == 401
    [(body, kept, _)] = stored(queue)
    assert body == b"Hello, World!" and kept["x-github-event"] == "ping"


def test_refusals_say_when_to_retry_and_store_nothing():
    queue = fresh("full")
    name = hook(queue, {"preset": "github", "secrets": ["It's a Secret to Everybody"]}, max_body_bytes=64)
    api("PUT", f"/v1/queues/{queue}", {"max_messages": 1})
    sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert post(name, b"Hello, World!", {"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "a"}).status_code == 200
    full = post(name, b"Hello, World!", {"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "b"})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert full.json()["code"] == "queue_full"
    large = post(name, b"x" * 65, {"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "c"})
    assert large.status_code == 413
    api("DELETE", f"/v1/queues/{queue}")
    gone = post(name, b"Hello, World!", {"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "d"})
    assert gone.status_code == 503 and int(gone.headers["Retry-After"]) >= 1
    assert gone.json()["code"] == "target_unavailable"
    refused = api("GET", f"/v1/hooks/{name}")["stats"]["refused"]
    assert refused == {"queue_full": 1, "request_too_large": 1, "target_unavailable": 1}
    metrics = requests.get(f"{URL}/metrics", timeout=30).text
    assert f'tidewater_hook_refused_total{{hook="{name}",reason="queue_full"}} 1' in metrics


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-v"]))
