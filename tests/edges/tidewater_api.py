"""What the edge tests share: the server under test (TIDEWATER_URL) and calls to its API."""

import os
import uuid

import requests

URL = os.environ.get("TIDEWATER_URL", "http://127.0.0.1:7070")


def api(method, path, body=None, expect=(200, 201, 204)):
    """A JSON call that must answer one of `expect`; its JSON reply, or None."""
    response = requests.request(method, URL + path, json=body, timeout=30)
    assert response.status_code in expect, f"{method} {path}: {response.status_code} {response.text}"
    return response.json() if response.content else None


def fresh(name):
    """A name no other test uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"
