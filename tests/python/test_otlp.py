"""OpenTelemetry export over OTLP/gRPC (TC_OTLP_ENDPOINT), checked by a real
OTLP/gRPC receiver: a grpcio server with the official `opentelemetry-proto`
package's TraceService, started by the test. The broker's spans are decoded
by that package, not by the broker's own (vendored) copy of the protocol.

Deliveries come from real subscribers: a grpcio Subscribe stream, a
`socket.io-client` socket (Node, tests/js/node_modules) and an HTTP webhook
receiver."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import REPO, RPC_TIMEOUT_S, auth, start_broker
from test_webhooks import Receiver

WAIT_S = 15.0
TRACE = "4bf92f3577b34da61111929d0e0e4736"  # sampled at ratio 0.5 (last 8 bytes < 2^63)
UNSAMPLED = "0af7651916cd43ddf448eb211c80319c"  # not sampled at 0.5
PARENT = "00f067aa0ba902b7"


class Collector:
    """An OTLP/gRPC trace receiver: records every span with its resource,
    and the metadata of each export request."""

    def __init__(self):
        self.spans: list[tuple[dict, object]] = []
        self.metadata: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with outer.lock:
                    outer.metadata.append(dict(context.invocation_metadata()))
                    for rs in request.resource_spans:
                        resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                outer.spans.append((resource, span))
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_for(self, what, predicate, timeout=WAIT_S):
        """The spans (with resources) matching `predicate`, once there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [(r, s) for r, s in self.spans if predicate(s)]
            if found:
                return found
            time.sleep(0.1)
        with self.lock:
            names = [(s.name, s.trace_id.hex()) for _, s in self.spans]
        raise AssertionError(f"no span {what} within {timeout}s; received {names}")

    def stop(self):
        self.server.stop(grace=None)


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else (
            v.int_value if v.HasField("int_value") else v.bool_value
        )
    return out


def rest(broker, method, path, token, body=None):
    req = urllib.request.Request(
        f"http://{broker.http_addr}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=RPC_TIMEOUT_S) as resp:
        return json.loads(resp.read() or b"null")


SOCKETIO_LISTENER = r"""
const { io } = require(process.env.SIO_CLIENT);
const socket = io(process.env.URL, { path: '/ws', transports: ['websocket'], auth: { token: process.env.TOKEN } });
socket.on('session', () => console.log('ready'));
socket.on('event', (e) => { console.log(JSON.stringify(e)); });
socket.on('connect_error', (e) => { console.log('error ' + e.message); process.exit(1); });
setTimeout(() => process.exit(0), 30000);
"""


def socketio_listener(broker, token):
    """A Node socket.io-client socket on /ws; its stdout has 'ready' once the
    session began, then one JSON event per line."""
    client = REPO / "tests" / "js" / "node_modules" / "socket.io-client"
    if shutil.which("node") is None or not client.is_dir():
        pytest.fail(f"node and {client} are needed (scripts/test installs them with npm ci)", pytrace=False)
    proc = subprocess.Popen(
        ["node", "-e", SOCKETIO_LISTENER],
        env={**os.environ, "SIO_CLIENT": str(client), "URL": f"http://{broker.http_addr}", "TOKEN": token},
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line == "ready", f"socket.io-client did not connect: {line!r}"
    return proc


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


def test_publish_and_each_delivery_are_spans_of_the_producers_trace(tmp_path, collector, pb, tenant):
    from tensorcost.events.v1 import events_pb2_grpc

    hook = Receiver()
    extra = {
        "TC_OTLP_ENDPOINT": collector.url,
        "TC_OTLP_HEADERS": "x-api-key=k-123",
        "TC_OTLP_SERVICE_NAME": "broker-under-test",
        "TC_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    }
    with start_broker(tmp_path, extra) as broker:
        token = broker.token(tenant, scope="events:publish events:subscribe integration:write")
        rest(broker, "POST", "/v1/webhooks", token, {"url": hook.url, "types": ["cost.*"]})
        channel = grpc.insecure_channel(broker.grpc_addr)
        stub = events_pb2_grpc.EventBrokerStub(channel)
        stream = stub.Subscribe(pb.SubscribeRequest(types=["cost.*"]), metadata=auth(token))
        assert next(stream).WhichOneof("message") == "status"
        sio = socketio_listener(broker, token)
        try:
            traceparent = f"00-{TRACE}-{PARENT}-01"
            reply = stub.Publish(
                pb.PublishRequest(events=[pb.Event(type="cost.updated", data='{"usd":1}')]),
                metadata=(*auth(token), ("traceparent", traceparent)),
                timeout=RPC_TIMEOUT_S,
            )
            event_id = reply.results[0].id
            # The subscribers got it, in the producer's trace.
            got = next(stream)
            assert got.event.id == event_id and got.event.trace_id == TRACE, got
            line = json.loads(sio.stdout.readline())
            assert line["id"] == event_id and line["trace_id"] == TRACE, line
            headers, _ = hook.next()

            (resource, publish), = collector.wait_for(
                "publish", lambda s: s.name == "publish" and s.trace_id.hex() == TRACE
            )
            assert resource["service.name"] == "broker-under-test", resource
            assert resource["service.instance.id"], resource
            assert publish.parent_span_id.hex() == PARENT, publish
            a = attrs(publish)
            assert a["messaging.message.id"] == event_id and a["tc.tenant"] == tenant, a
            assert a["messaging.destination.name"] == "cost.updated", a
            assert publish.end_time_unix_nano >= publish.start_time_unix_nano > 0

            for transport in ("grpc", "socketio", "webhook"):
                # (The trace also holds the deliveries of the broker's own
                # `notification.sent` about the webhook: other message ids.)
                found = collector.wait_for(
                    f"deliver {transport}",
                    lambda s, t=transport: s.name == f"deliver {t}"
                    and s.trace_id.hex() == TRACE
                    and attrs(s)["messaging.message.id"] == event_id,
                )
                assert len(found) == 1, [(s, attrs(s)) for _, s in found]
                (_, span), = found
                assert span.parent_span_id == publish.span_id, (transport, span)
                a = attrs(span)
                assert a["tc.transport"] == transport and a["messaging.message.id"] == event_id, a
                assert a["tc.tenant"] == tenant, a
                if transport == "socketio":
                    assert a["tc.recipients"] == 1, a
                if transport == "webhook":
                    assert a["http.response.status_code"] == 200, a
                    # The receiver can continue the trace under the attempt.
                    assert headers["traceparent"] == f"00-{TRACE}-{span.span_id.hex()}-01", dict(headers)

            # Without a traceparent: the broker's own trace id is a real trace.
            reply = stub.Publish(
                pb.PublishRequest(events=[pb.Event(type="cost.updated", data="{}")]),
                metadata=auth(token),
                timeout=RPC_TIMEOUT_S,
            )
            got = next(stream)
            assert got.event.id == reply.results[0].id
            (_, root), = collector.wait_for(
                "publish of the second event", lambda s: s.name == "publish" and s.trace_id.hex() == got.event.trace_id
            )
            assert root.parent_span_id == b"", root
            # A delivery span of the second event, in its trace.
            collector.wait_for(
                "deliver grpc of the second event",
                lambda s: s.name == "deliver grpc" and s.parent_span_id == root.span_id,
            )
            with collector.lock:
                assert all(m.get("x-api-key") == "k-123" for m in collector.metadata), collector.metadata
        finally:
            sio.kill()
            sio.wait()
            stream.cancel()
            channel.close()
            hook.close()


def test_sampling_keeps_or_skips_a_trace_whole(tmp_path, collector, pb, tenant):
    from tensorcost.events.v1 import events_pb2_grpc

    extra = {"TC_OTLP_ENDPOINT": collector.url, "TC_OTLP_SAMPLE_RATIO": "0.5"}
    with start_broker(tmp_path, extra) as broker:
        token = broker.token(tenant)
        with grpc.insecure_channel(broker.grpc_addr) as channel:
            stub = events_pb2_grpc.EventBrokerStub(channel)
            stream = stub.Subscribe(pb.SubscribeRequest(), metadata=auth(token))
            assert next(stream).WhichOneof("message") == "status"
            for trace in (UNSAMPLED, TRACE):
                stub.Publish(
                    pb.PublishRequest(events=[pb.Event(type="cost.updated", data="{}")]),
                    metadata=(*auth(token), ("traceparent", f"00-{trace}-{PARENT}-01")),
                    timeout=RPC_TIMEOUT_S,
                )
                assert next(stream).event.trace_id == trace
            collector.wait_for("deliver grpc", lambda s: s.name == "deliver grpc" and s.trace_id.hex() == TRACE)
            # Exported in order: the unsampled trace's spans would be there by now.
            time.sleep(1.5)
            with collector.lock:
                traces = {s.trace_id.hex() for _, s in collector.spans}
            assert traces == {TRACE}, traces
            stream.cancel()


def metric(broker, name: str) -> float:
    with urllib.request.urlopen(f"http://{broker.http_addr}/metrics", timeout=RPC_TIMEOUT_S) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_collector_that_never_answers_costs_only_spans(tmp_path, pb, tenant):
    """A collector that accepts connections and never answers: publishing
    and delivering go on at full speed, spans beyond the small queue are
    dropped and counted, export failures are counted and logged once."""
    from tensorcost.events.v1 import events_pb2_grpc

    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)  # never accepted, never read
    extra = {
        "TC_OTLP_ENDPOINT": f"http://127.0.0.1:{blackhole.getsockname()[1]}",
        "TC_OTLP_QUEUE_BYTES": "16384",
        "TC_OTLP_TIMEOUT": "1s",
    }
    try:
        with start_broker(tmp_path, extra) as broker:
            token = broker.token(tenant)
            with grpc.insecure_channel(broker.grpc_addr) as channel:
                stub = events_pb2_grpc.EventBrokerStub(channel)
                stream = stub.Subscribe(pb.SubscribeRequest(max_batch=1), metadata=auth(token))
                assert next(stream).WhichOneof("message") == "status"
                n = 2000
                ids = []
                for i in range(0, n, 100):
                    reply = stub.Publish(
                        pb.PublishRequest(
                            events=[pb.Event(type="cost.updated", data=f'{{"i":{i + k}}}') for k in range(100)]
                        ),
                        metadata=auth(token),
                        timeout=RPC_TIMEOUT_S,
                    )
                    ids += [r.id for r in reply.results]
                got = [next(stream).event.id for _ in range(n)]
                assert got == ids, "every event delivered in order"
                stream.cancel()
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and metric(broker, "tc_otlp_export_failures_total") < 1:
                time.sleep(0.2)
            assert metric(broker, "tc_otlp_export_failures_total") >= 1, broker.log()[-3000:]
            # 4,000 spans do not fit in 16 KiB: most were dropped, none exported.
            assert metric(broker, 'tc_otlp_spans_total{outcome="dropped"}') > 1000
            assert metric(broker, 'tc_otlp_spans_total{outcome="exported"}') == 0
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and "OTLP export failed" not in broker.log():
                time.sleep(0.2)
            log = broker.log()
            assert log.count("OTLP export failed") == 1, log[-3000:]
    finally:
        blackhole.close()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TC_OTLP_ENDPOINT": "collector:4317"}, "give a URL like http://collector:4317"),
        ({"TC_OTLP_ENDPOINT": "http://127.0.0.1:4317", "TC_OTLP_HEADERS": "x-key"}, "TC_OTLP_HEADERS: pair 1: not key=value"),
        ({"TC_OTLP_ENDPOINT": "http://127.0.0.1:4317", "TC_OTLP_SAMPLE_RATIO": "2"}, "a number from 0 to 1"),
        (
            {"TC_OTLP_ENDPOINT": "https://127.0.0.1:4317", "TC_OTLP_CA_FILE": "/nonexistent/ca.pem"},
            "TC_OTLP_CA_FILE /nonexistent/ca.pem: cannot read it",
        ),
    ],
)
def test_bad_settings_are_refused_at_start_naming_the_setting(tmp_path, env, message):
    from conftest import _env, binary_path

    proc = subprocess.run(
        [str(binary_path()), "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        env={**_env(), "TC_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "panicked" not in proc.stderr, proc.stderr
