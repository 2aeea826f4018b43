"""The web console in headless Chromium: what an operator does with it, against a real
server. Screenshots of each step go to $ARTIFACTS."""

import re

import pytest
from playwright.sync_api import expect

from conftest import Server, fresh, shot

# Forecast samples every 200 ms, so charts and rates show within the test.
CONFIG = "[forecast]\nsample_interval_ms = 200\nrate_window_ms = 2000\n"


@pytest.fixture(scope="module")
def server():
    server = Server(CONFIG)
    yield server
    server.stop()


def only_from(page, server):
    """Fails the test if the page asks anything of another origin (the console works
    offline: everything it needs is in the binary)."""
    elsewhere = []
    page.on("request", lambda r: r.url.startswith(server.url) or r.url.startswith("data:") or elsewhere.append(r.url))
    return elsewhere


def stat(page, key):
    return page.locator(f'[data-stat="{key}"] .value')


def test_a_queue_from_creation_to_redrive(page, server):
    elsewhere = only_from(page, server)
    queue = fresh("orders")
    page.goto(server.url + "/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator("#who")).to_contain_text("authentication off")

    # Create a queue whose messages go to its DLQ at the first nack.
    page.fill('#create-queue input[name="queue"]', queue)
    page.fill('#create-queue input[name="config"]', '{"max_deliveries": 1}')
    page.click('#create-queue button[type="submit"]')
    expect(page.get_by_role("heading", name=f"Queue {queue}")).to_be_visible()
    expect(stat(page, "depth")).to_have_text("0")

    # Publish: the depth changes.
    page.fill('#publish textarea[name="body"]', "order 1001")
    page.fill('#publish input[name="key"]', "customer-7")
    page.click('#publish button[type="submit"]')
    expect(page.locator("#publish .notice")).to_contain_text("Published")
    expect(stat(page, "depth")).to_have_text("1")
    expect(page.locator("#messages")).to_contain_text("order 1001")
    shot(page, "01-queue-published")

    # Receive it and nack it: with max_deliveries 1 it goes to the dead-letter queue.
    page.click('#consume button[type="submit"]')
    expect(page.locator("#leased")).to_contain_text("order 1001")
    page.locator("#leased").get_by_role("button", name="Nack").click()
    expect(page.locator("#leased")).to_contain_text("nacked")
    expect(stat(page, "depth")).to_have_text("0")
    expect(stat(page, "dead_lettered")).to_have_text("1")

    # The overview shows the queue and its DLQ depth.
    page.goto(server.url + "/#/")
    row = page.locator(f'tr[data-queue="{queue}"]')
    expect(row.locator("td.dlq")).to_have_text("1")
    shot(page, "02-overview")

    # The DLQ page: the message with its history; redrive the selected one.
    row.locator("td.dlq a").click()
    expect(page.get_by_role("heading", name=f"Queue {queue}-dlq")).to_be_visible()
    message = page.locator("#messages tr[data-message]")
    expect(message).to_have_count(1)
    expect(message.locator(".history")).to_contain_text(f"source-queue: {queue}")
    expect(message.locator(".history")).to_contain_text("nacked from the console")
    shot(page, "03-dead-letters")
    message.locator("input.pick").check()
    page.click("#redrive-selected")
    expect(page.locator("#redrive-status")).to_have_attribute("data-state", "done", timeout=15_000)
    expect(page.locator("#redrive-status")).to_contain_text("moved 1")
    expect(page.locator("#messages")).to_contain_text("No waiting messages")
    shot(page, "04-redriven")

    # Back in its queue.
    page.goto(f"{server.url}/#/queues/{queue}")
    expect(stat(page, "depth")).to_have_text("1")
    expect(page.locator("#messages")).to_contain_text("order 1001")

    # Edit a policy: the server refuses an invalid one with the API's error, takes a valid one.
    config = page.locator('#config textarea[name="config"]')
    text = config.input_value()
    config.fill(re.sub(r'"lease_ms": \d+', '"lease_ms": -5', text))
    page.click('#config button[type="submit"]')
    expect(page.locator("#config-result .error")).to_contain_text("invalid_config")
    shot(page, "05-config-refused")
    config.fill(re.sub(r'"lease_ms": \d+', '"lease_ms": 15000', text))
    page.click('#config button[type="submit"]')
    expect(page.locator("#config-result .notice")).to_have_text("Saved.")
    assert server.api("GET", f"/v1/queues/{queue}")["config"]["lease_ms"] == 15000

    # Charts and the forecast, drawn from the server's samples.
    expect(page.locator("svg.chart polyline").first).to_be_attached(timeout=10_000)
    expect(page.locator("#forecast")).to_be_visible()
    shot(page, "06-queue")
    assert elsewhere == [], elsewhere
    assert page.console_errors == [], page.console_errors


def test_a_queue_held_by_its_own_limit_says_so(page, server):
    """Every lease max_in_flight allows is held and messages wait: the forecast says more
    consumers would not help, and asks for none beyond the one there is."""
    queue = fresh("capped")
    server.api("PUT", f"/v1/queues/{queue}", {"max_in_flight": 1})
    server.api("POST", f"/v1/queues/{queue}/messages", {"messages": [{"body": f"job {i}"} for i in range(3)]})
    assert len(server.api("POST", f"/v1/queues/{queue}/receive", {"max": 5, "consumer": "w1"})["messages"]) == 1
    page.goto(f"{server.url}/#/queues/{queue}")
    expect(stat(page, "limited_by")).to_have_text("max in flight")
    expect(stat(page, "consumers_needed")).to_have_text("1")
    shot(page, "07-limited")
    assert page.console_errors == [], page.console_errors


def test_a_queue_shows_where_its_messages_wait_by_key_and_by_tenant(page, server):
    """With key_concurrency and fairness, the queue page lists the busiest keys and the
    tenants with the most messages waiting."""
    queue = fresh("keyed")
    server.api("PUT", f"/v1/queues/{queue}", {"key_concurrency": 1, "fairness": {"by": "tenant", "weights": {"acme": 2}}})
    server.api("POST", f"/v1/queues/{queue}/messages", {"tenant": "acme", "messages": [{"body": f"a{i}", "key": "customer-7"} for i in range(4)]})
    server.api("POST", f"/v1/queues/{queue}/messages", {"tenant": "globex", "messages": [{"body": "g", "key": "customer-9"}]})
    assert len(server.api("POST", f"/v1/queues/{queue}/receive", {"max": 10})["messages"]) == 2
    page.goto(f"{server.url}/#/queues/{queue}")
    hot = page.locator('#busiest-keys tr[data-key="Y3VzdG9tZXItNw=="]')
    expect(hot).to_contain_text("customer-7")
    expect(hot.locator("td").nth(2)).to_have_text("3")
    expect(page.locator("#busiest-flows")).to_contain_text("Waiting by tenant")
    shot(page, "08-busiest")
    assert page.console_errors == [], page.console_errors


def test_dead_letters_redrive_all_and_purge_with_confirmation(page, server):
    queue = fresh("jobs")
    server.api("PUT", f"/v1/queues/{queue}", {"max_deliveries": 1})
    server.api("POST", f"/v1/queues/{queue}/messages", {"messages": [{"body": f"job {i}"} for i in range(5)]})
    got = server.api("POST", f"/v1/queues/{queue}/receive", {"max": 5})["messages"]
    server.api("POST", f"/v1/queues/{queue}/nack", {"receipts": [m["receipt"] for m in got], "error": "timeout calling the API"})
    page.goto(f"{server.url}/#/queues/{queue}-dlq")
    expect(page.locator("#messages tr[data-message]")).to_have_count(5)

    # Redrive all, at a rate, with progress.
    page.fill('#dlq input[name="rate"]', "50")
    page.click("#redrive-all")
    expect(page.locator("#redrive-status")).to_have_attribute("data-state", "done", timeout=15_000)
    expect(page.locator("#redrive-status")).to_contain_text("moved 5")
    assert server.api("GET", f"/v1/queues/{queue}")["stats"]["depth"] == 5

    # Back to the DLQ, then purge: only after typing the queue's name.
    got = server.api("POST", f"/v1/queues/{queue}/receive", {"max": 5})["messages"]
    server.api("POST", f"/v1/queues/{queue}/nack", {"receipts": [m["receipt"] for m in got]})
    page.reload()
    expect(page.locator("#messages tr[data-message]")).to_have_count(5)
    page.click("#purge")
    dialog = page.locator("#purge-confirm")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    assert server.api("GET", f"/v1/queues/{queue}-dlq")["stats"]["total"] == 5
    page.click("#purge")
    dialog.locator('input[name="confirm"]').fill("not the name")
    dialog.get_by_role("button", name="Purge").click()
    expect(dialog).to_be_visible()
    assert server.api("GET", f"/v1/queues/{queue}-dlq")["stats"]["total"] == 5
    dialog.locator('input[name="confirm"]').fill(f"{queue}-dlq")
    dialog.get_by_role("button", name="Purge").click()
    expect(page.locator("#dlq .notice")).to_contain_text("Purged 5")
    assert server.api("GET", f"/v1/queues/{queue}-dlq")["stats"]["total"] == 0


def test_streams_groups_and_offset_resets(page, server):
    stream, group = fresh("events"), fresh("readers")
    server.api("PUT", f"/v1/streams/{stream}", {"partitions": 2})
    server.api("PUT", f"/v1/streams/{stream}/subscriptions/billing", {})
    server.api("POST", f"/v1/streams/{stream}/records", {"records": [{"key": f"k{i}", "value": f"v{i}"} for i in range(20)]})
    member = server.api("POST", f"/v1/groups/{group}/consumers", {"streams": [stream]})["member"]
    server.api("GET", f"/v1/groups/{group}/consumers/{member}/records")
    server.api("POST", f"/v1/groups/{group}/consumers/{member}/commit", {})
    server.api("DELETE", f"/v1/groups/{group}/consumers/{member}")

    page.goto(server.url + "/")
    page.locator(f'tr[data-stream="{stream}"] a').click()
    expect(page.locator('[data-partition="0"]')).to_be_visible()
    expect(page.locator("#stream-subs")).to_contain_text("billing")
    shot(page, "07-stream")

    page.goto(f"{server.url}/#/groups/{group}")
    expect(page.locator(f'[data-partition="{stream}/0"]')).to_be_visible()
    expect(page.locator(".lag").first).to_have_text("0")
    page.select_option('#reset select[name="to"]', "earliest")
    page.get_by_role("button", name="Dry run").click()
    expect(page.locator("#reset-result")).to_contain_text("Dry run")
    page.get_by_role("button", name="Reset").click()
    expect(page.locator("#reset-result")).to_contain_text("Offsets reset")
    total_lag = sum(o["lag"] for o in server.api("GET", f"/v1/groups/{group}")["offsets"])
    assert total_lag == 20
    shot(page, "08-group")

    page.goto(f"{server.url}/#/subscriptions/{stream}/billing")
    expect(stat(page, "backlog")).to_have_text("20")


def test_signed_in_principals_see_only_what_they_may(page):
    admin = "twadmin." + "a1" * 24
    server = Server("[auth]\nenabled = true\n", env={"TIDEWATER_ADMIN_KEY": admin})
    try:
        for name in ("pub-orders", "secret-payroll"):
            server.api("PUT", f"/v1/queues/{name}", {}, token=admin)
        viewer = server.api("POST", "/v1/auth/keys", {"principal": "viewer"}, token=admin)["token"]
        server.api("POST", "/v1/auth/acls", {"principal": "viewer", "resource": "queue", "name": "pub-",
                                             "match": "prefix", "operations": ["describe"]}, token=admin)

        # Without a key: the sign-in form, and no data.
        page.goto(server.url + "/")
        expect(page.locator("#signin")).to_be_visible()
        page.fill('#signin input[name="token"]', "twbogus.0000")
        page.click('#signin button[type="submit"]')
        expect(page.locator("#signin .error")).to_be_visible()

        # The viewer sees its queue and not the other.
        page.fill('#signin input[name="token"]', viewer)
        page.click('#signin button[type="submit"]')
        expect(page.locator('[data-principal="viewer"]')).to_be_visible()
        expect(page.locator('tr[data-queue="pub-orders"]')).to_be_visible()
        expect(page.locator('tr[data-queue="secret-payroll"]')).to_have_count(0)
        shot(page, "09-signed-in")
        # Describe only: publishing is refused, with the server's reason.
        page.locator('tr[data-queue="pub-orders"] a').click()
        page.fill('#publish textarea[name="body"]', "x")
        page.click('#publish button[type="submit"]')
        expect(page.locator("#publish .error")).to_contain_text("forbidden")
        # The other queue's page is refused too.
        page.goto(server.url + "/#/queues/secret-payroll")
        expect(page.locator("main .error")).to_contain_text("forbidden")

        # Signing out forgets the key.
        page.get_by_role("button", name="Sign out").click()
        expect(page.locator("#signin")).to_be_visible()
    finally:
        server.stop()


def test_the_overview_of_a_busy_broker(page):
    """Queues filling and draining, a stream with a subscription and a group: the overview
    shows their rates, forecasts and last samples (its screenshot is the README's)."""
    server = Server(CONFIG)
    try:
        busy_overview(page, server)
    finally:
        server.stop()


def busy_overview(page, server):
    import threading
    import time

    names = {"payments": 400, "emails": 4000, "thumbnails": 50}
    for name, backlog in names.items():
        server.api("PUT", f"/v1/queues/{name}", {"max_deliveries": 3})
        server.api("POST", f"/v1/queues/{name}/messages", {"messages": [{"body": f"{name} {i}"} for i in range(backlog)]})
    server.api("PUT", "/v1/streams/clicks", {"partitions": 4})
    server.api("PUT", "/v1/streams/clicks/subscriptions/analytics", {})
    server.api("POST", "/v1/streams/clicks/records", {"records": [{"key": f"u{i}", "value": "click"} for i in range(300)]})
    member = server.api("POST", "/v1/groups/sessions/consumers", {"streams": ["clicks"]})["member"]
    server.api("GET", f"/v1/groups/sessions/consumers/{member}/records?max_bytes=2000")
    server.api("POST", f"/v1/groups/sessions/consumers/{member}/commit", {})

    stop = threading.Event()

    def work():
        # emails drain (two workers), payments grow, thumbnails trickle in and out.
        while not stop.is_set():
            server.api("POST", "/v1/queues/payments/messages", {"messages": [{"body": "p"}] * 5})
            for worker in ("w1", "w2"):
                got = server.api("POST", "/v1/queues/emails/receive", {"max": 10, "consumer": worker})["messages"]
                if got:
                    server.api("POST", "/v1/queues/emails/ack", {"receipts": [m["receipt"] for m in got]})
            time.sleep(0.05)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        page.goto(server.url + "/")
        for name in names:
            expect(page.locator(f'tr[data-queue="{name}"] [data-trend]')).to_be_visible()
        expect(page.locator('tr[data-stream="clicks"]')).to_be_visible()
        expect(page.locator('tr[data-subscription="clicks/analytics"]')).to_be_visible()
        expect(page.locator('tr[data-group="sessions"]')).to_be_visible()
        # A few seconds of samples for the rates and the sparklines.
        expect(page.locator('tr[data-queue="emails"] [data-trend="draining"]')).to_be_visible(timeout=20_000)
        expect(page.locator('tr[data-queue="emails"] svg.spark polyline')).to_be_attached()
        time.sleep(2)
        shot(page, "00-overview")
    finally:
        stop.set()
        thread.join()
