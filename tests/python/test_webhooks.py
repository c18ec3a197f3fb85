"""Webhook deliveries checked with a receiver's own code: the official
`stripe` package verifies the X-TensorCost-Signature header (Stripe's
scheme), against real HTTP receivers and the real binary."""

from __future__ import annotations

import http.client
import json
import queue
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import stripe

from conftest import RPC_TIMEOUT_S, start_broker

WAIT_S = 10.0  # longest wait for one expected delivery
QUIET_S = 1.5  # how long "nothing more arrives" is watched for
TOLERANCE_S = 300
SCOPES = "integration:write integration:read events:publish"

SIGNATURE = re.compile(r"^t=(\d+)((?:,v1=[0-9a-f]{64})+)$")
# stripe >= 8 exposes the error at the top level; older ones only in stripe.error.
SignatureVerificationError = getattr(stripe, "SignatureVerificationError", None) or stripe.error.SignatureVerificationError


@pytest.fixture(scope="module")
def hooks_broker(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webhooks")
    extra = {
        "TC_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "TC_DATA_DIR": str(workdir / "data"),
        "TC_WEBHOOK_RETRY_SCHEDULE": "1s,1s,1s",
    }
    with start_broker(workdir, extra) as b:
        yield b


# ---- a receiver --------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST as
    (headers, raw body bytes) and answers 200."""

    def __init__(self):
        self.requests: queue.Queue = queue.Queue()
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                received.put((self.command, self.path, self.headers, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next(self, timeout=WAIT_S):
        """The next delivery as (headers, body bytes)."""
        try:
            method, path, headers, body = self.requests.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no delivery at {self.url} within {timeout}s") from None
        assert (method, path) == ("POST", "/hook"), f"unexpected request {method} {path}"
        return headers, body

    def drain(self, quiet=QUIET_S):
        """Every delivery arriving until none has for `quiet` seconds."""
        out = []
        while True:
            try:
                _, _, headers, body = self.requests.get(timeout=quiet)
            except queue.Empty:
                return out
            out.append((headers, body))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


# ---- REST helpers --------------------------------------------------------------


def call(broker, method, path, token, body=None, raw: str | None = None):
    """One request to the HTTP listener: (status, parsed JSON or None, raw text)."""
    conn = http.client.HTTPConnection(broker.http_addr, timeout=RPC_TIMEOUT_S)
    try:
        headers = {"authorization": f"Bearer {token}"}
        data = None
        if raw is not None:
            data = raw.encode()
        elif body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["content-type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        return resp.status, parsed, text
    finally:
        conn.close()


def expect(broker, status, method, path, token, body=None, raw=None):
    got, parsed, text = call(broker, method, path, token, body, raw)
    assert got == status, f"{method} {path} {body or raw or ''} -> {got} {text} (wanted {status})\n{broker.log()[-4000:]}"
    return parsed


def create_hook(broker, token, url, types=("cost.*",)):
    hook = expect(broker, 201, "POST", "/v1/webhooks", token, {"url": url, "types": list(types)})
    assert re.fullmatch(r"we_[0-9a-f]+", hook["id"]), hook
    assert hook["url"] == url and hook["types"] == list(types) and hook["enabled"] is True, hook
    assert hook["secret"].startswith("whsec_"), hook
    return hook


def publish_raw(broker, token, raw: str) -> str:
    """Publishes one event from a hand-written body (exact bytes of `data`); its id."""
    reply = expect(broker, 200, "POST", "/v1/events", token, raw=raw)
    results = reply["results"]
    assert len(results) == 1 and results[0]["duplicate"] is False, reply
    return results[0]["id"]


def publish(broker, token, event_type, data) -> str:
    return publish_raw(broker, token, json.dumps({"type": event_type, "data": data}, separators=(",", ":")))


def signature_parts(headers):
    header = headers.get("X-TensorCost-Signature")
    assert header, f"no X-TensorCost-Signature header: {dict(headers)}"
    m = SIGNATURE.fullmatch(header)
    assert m, f"signature header not t=<unix>,v1=<hex>[,v1=<hex>]: {header!r}"
    t = int(m.group(1))
    sigs = [s[len("v1=") :] for s in m.group(2).lstrip(",").split(",")]
    return header, t, sigs


def other_secret():
    return "whsec_" + uuid.uuid4().hex + uuid.uuid4().hex[:11]


# ---- tests -------------------------------------------------------------------------


def test_delivery_verifies_with_stripe_and_keeps_data_exact(hooks_broker, receiver, tenant):
    token = hooks_broker.token(tenant, SCOPES)
    hook = create_hook(hooks_broker, token, receiver.url)
    secret = hook["secret"]

    data = '{"usd":1.50,"tokens":123456789012345678901234567890,"model":"m-1","note":"caf\\u00e9 \\"q\\""}'
    event_id = publish_raw(hooks_broker, token, '{"type":"cost.updated","data":' + data + "}")

    headers, body = receiver.next()
    header, t, sigs = signature_parts(headers)
    assert len(sigs) == 1, f"one secret, one signature: {header}"
    assert abs(time.time() - t) < 60, f"signature timestamp {t} is not now"
    payload = body.decode("utf-8")
    assert stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=TOLERANCE_S) is True
    # bytes verify the same way (stripe decodes them as UTF-8)
    assert stripe.WebhookSignature.verify_header(body, header, secret, tolerance=TOLERANCE_S) is True

    with pytest.raises(SignatureVerificationError):
        stripe.WebhookSignature.verify_header(payload, header, other_secret(), tolerance=TOLERANCE_S)
    with pytest.raises(SignatureVerificationError):
        stripe.WebhookSignature.verify_header(payload.replace("1.50", "9.50"), header, secret, tolerance=TOLERANCE_S)
    with pytest.raises(SignatureVerificationError):
        # the same signature under another timestamp
        stripe.WebhookSignature.verify_header(payload, header.replace(f"t={t}", f"t={t + 1}"), secret, tolerance=TOLERANCE_S)

    assert headers.get("Content-Type", "").split(";")[0].strip() == "application/json", dict(headers)
    assert headers.get("User-Agent", "").startswith("tensorcost-events/"), dict(headers)
    assert headers.get("X-TensorCost-Event-Id") == event_id, dict(headers)

    envelope = json.loads(payload)
    assert envelope["id"] == event_id, envelope
    assert envelope["type"] == "cost.updated", envelope
    assert envelope["tenant_id"] == tenant, envelope
    assert {"id", "type", "tenant_id", "data", "timestamp", "trace_id"} <= set(envelope), envelope
    assert envelope["timestamp"] and envelope["trace_id"], envelope
    # data round-trips byte for byte: the decimal keeps its trailing zero,
    # the big integer every digit, the escapes as written
    assert '"data":' + data in payload, payload
    assert '"usd":1.50' in payload, payload
    assert envelope["data"]["tokens"] == 123456789012345678901234567890, envelope

    assert receiver.drain() == [], "one event, one delivery"


def test_rotation_signs_with_both_secrets_during_overlap(hooks_broker, receiver, tenant):
    token = hooks_broker.token(tenant, SCOPES)
    hook = create_hook(hooks_broker, token, receiver.url)
    old = hook["secret"]

    rotated = expect(hooks_broker, 200, "POST", f"/v1/webhooks/{hook['id']}/rotate-secret", token, {"overlap": "1h"})
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old, rotated
    assert rotated.get("previous_expires_at"), rotated

    event_id = publish(hooks_broker, token, "cost.updated", {"usd": 2})
    headers, body = receiver.next()
    header, t, sigs = signature_parts(headers)
    assert len(sigs) == 2, f"two v1 signatures during the overlap: {header}"
    assert sigs[0] != sigs[1], header
    payload = body.decode("utf-8")
    assert json.loads(payload)["id"] == event_id

    assert stripe.WebhookSignature.verify_header(payload, header, new, tolerance=TOLERANCE_S) is True
    assert stripe.WebhookSignature.verify_header(payload, header, old, tolerance=TOLERANCE_S) is True
    # the new secret's signature comes first
    first_only = f"t={t},v1={sigs[0]}"
    second_only = f"t={t},v1={sigs[1]}"
    assert stripe.WebhookSignature.verify_header(payload, first_only, new, tolerance=TOLERANCE_S) is True
    assert stripe.WebhookSignature.verify_header(payload, second_only, old, tolerance=TOLERANCE_S) is True
    with pytest.raises(SignatureVerificationError):
        stripe.WebhookSignature.verify_header(payload, first_only, old, tolerance=TOLERANCE_S)
    with pytest.raises(SignatureVerificationError):
        stripe.WebhookSignature.verify_header(payload, header, other_secret(), tolerance=TOLERANCE_S)


def test_unwanted_types_are_not_delivered(hooks_broker, receiver, tenant):
    token = hooks_broker.token(tenant, SCOPES)
    hook = create_hook(hooks_broker, token, receiver.url, types=("cost.*",))

    unwanted = publish(hooks_broker, token, "alert.created", {"n": 1})
    wanted = publish(hooks_broker, token, "cost.updated", {"n": 2})

    headers, body = receiver.next()
    deliveries = [(headers, body)] + receiver.drain()
    got = [json.loads(b) for _, b in deliveries]
    assert [(e["id"], e["type"]) for e in got] == [(wanted, "cost.updated")], (
        f"only the cost.updated event {wanted} was wanted (not alert.created {unwanted}): {got}"
    )
    header = deliveries[0][0]["X-TensorCost-Signature"]
    assert stripe.WebhookSignature.verify_header(deliveries[0][1], header, hook["secret"], tolerance=TOLERANCE_S)


def test_tenants_cannot_reach_each_others_webhooks(hooks_broker, receiver):
    tenant_a = f"py-a-{uuid.uuid4().hex[:10]}"
    tenant_b = f"py-b-{uuid.uuid4().hex[:10]}"
    token_a = hooks_broker.token(tenant_a, SCOPES)
    token_b = hooks_broker.token(tenant_b, SCOPES)
    hook = create_hook(hooks_broker, token_a, receiver.url, types=("cost.*",))
    wid = hook["id"]
    base = f"/v1/webhooks/{wid}"

    listed_a = expect(hooks_broker, 200, "GET", "/v1/webhooks", token_a)["webhooks"]
    assert [h["id"] for h in listed_a] == [wid], listed_a
    assert "secret" not in listed_a[0], f"a listing shows no secret: {listed_a}"
    assert expect(hooks_broker, 200, "GET", "/v1/webhooks", token_b) == {"webhooks": []}

    b_requests = [
        ("GET", base, None),
        ("PATCH", base, {"description": "taken over", "url": "http://127.0.0.1:9/elsewhere"}),
        ("DELETE", base, None),
        ("POST", f"{base}/test", None),
        ("GET", f"{base}/deliveries", None),
        ("POST", f"{base}/replay", {"since": "x"}),
        ("POST", f"{base}/rotate-secret", {"overlap": "1h"}),
    ]
    for method, path, body in b_requests:
        err = expect(hooks_broker, 404, method, path, token_b, body)
        assert err and err.get("code") == "not_found", f"{method} {path}: {err}"

    # B's event of a type A's endpoint wants goes nowhere near A
    b_event = publish(hooks_broker, token_b, "cost.updated", {"from": "b"})
    a_event = publish(hooks_broker, token_a, "cost.updated", {"from": "a"})
    headers, body = receiver.next()
    deliveries = [(headers, body)] + receiver.drain()
    got = [json.loads(b) for _, b in deliveries]
    assert [(e["id"], e["tenant_id"]) for e in got] == [(a_event, tenant_a)], (
        f"A's receiver got something other than A's event {a_event} (B's was {b_event}): {got}"
    )

    # A's endpoint is unchanged by B's attempts, and A can do all of the above
    seen = expect(hooks_broker, 200, "GET", base, token_a)
    assert seen["url"] == receiver.url and seen["description"] == "", seen
    expect(hooks_broker, 200, "GET", f"{base}/deliveries", token_a)
    attempt = expect(hooks_broker, 200, "POST", f"{base}/test", token_a)
    assert attempt["event_type"] == "system.webhook_test" and attempt["status"] == "succeeded", attempt
    headers, body = receiver.next()
    assert json.loads(body)["type"] == "system.webhook_test"
    assert stripe.WebhookSignature.verify_header(
        body, headers["X-TensorCost-Signature"], hook["secret"], tolerance=TOLERANCE_S
    )
    patched = expect(hooks_broker, 200, "PATCH", base, token_a, {"description": "mine"})
    assert patched["description"] == "mine", patched
    expect(hooks_broker, 204, "DELETE", base, token_a)
    expect(hooks_broker, 404, "GET", base, token_a)
