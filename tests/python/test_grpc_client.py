"""tensorcost-events through a client that is not ours: grpcio stubs generated
from proto/ at test time (see conftest.py), against the real binary."""

from __future__ import annotations

import queue
import re
import threading
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import BROKER_SERVICE, RPC_TIMEOUT_S, auth

STREAM_TIMEOUT_S = 15.0  # deadline of every streaming call
WAIT_S = 10.0  # longest wait for one expected message
QUIET_S = 0.5  # how long "nothing more arrives" is watched for

UUID_OR_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_END = object()


class Subscriber:
    """A Subscribe call read on its own thread; messages go to a queue."""

    def __init__(self, stub, pb, token, types=(), since_id="", tenant_id=""):
        self.messages: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        request = pb.SubscribeRequest(types=list(types), since_id=since_id, tenant_id=tenant_id)
        self.call = stub.Subscribe(request, metadata=auth(token), timeout=STREAM_TIMEOUT_S)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.messages.put(_END)

    def next(self, timeout=WAIT_S):
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no Subscribe message within {timeout}s") from None
        if message is _END:
            err = self.error
            detail = f"{err.code()}: {err.details()}" if err is not None else "stream ended"
            raise AssertionError(f"Subscribe stream ended early: {detail}")
        return message

    def status(self):
        message = self.next()
        assert message.WhichOneof("message") == "status", f"first message is not a status: {message}"
        return message.status

    def events(self, n, timeout=WAIT_S):
        out = []
        for _ in range(n):
            message = self.next(timeout)
            assert message.WhichOneof("message") == "event", f"expected an event, got {message}"
            out.append(message.event)
        return out

    def assert_quiet(self, seconds=QUIET_S):
        try:
            message = self.messages.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected Subscribe message: {message}")

    def close(self):
        self.call.cancel()
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "Subscribe reader thread did not stop"


@pytest.fixture
def subscribers():
    opened: list[Subscriber] = []
    yield opened
    for s in opened:
        s.close()


def publish(stub, pb, token, *events):
    request = pb.PublishRequest(events=[pb.Event(**e) for e in events])
    return stub.Publish(request, metadata=auth(token), timeout=RPC_TIMEOUT_S)


# 1. Publish, replay with since_id, live delivery


def test_publish_batch_then_replay_with_since_id(broker, stub, pb, tenant, subscribers):
    token = broker.token(tenant)
    first = publish(stub, pb, token, {"type": "cost.marker", "data": '{"i":0}'})
    assert len(first.results) == 1
    marker = first.results[0].id
    assert UUID_OR_ID.match(marker), marker

    batch = [{"type": "cost.updated", "data": f'{{"i":{i}}}'} for i in (1, 2, 3)]
    response = publish(stub, pb, token, *batch)
    ids = [r.id for r in response.results]
    assert len(ids) == 3 and len(set(ids)) == 3, ids
    assert not any(r.duplicate for r in response.results)
    assert marker not in ids

    sub = Subscriber(stub, pb, token, since_id=marker)
    subscribers.append(sub)
    status = sub.status()
    assert status.tenant_id == tenant
    assert status.resumed is True
    assert status.recovered is True
    assert status.replayed == 3
    events = sub.events(3)
    assert [e.id for e in events] == ids
    assert [e.data for e in events] == ['{"i":1}', '{"i":2}', '{"i":3}']
    for e in events:
        assert e.type == "cost.updated"
        assert e.tenant_id == tenant
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", e.timestamp), e.timestamp
        assert re.match(r"^[0-9a-f]{32}$", e.trace_id), e.trace_id
    sub.assert_quiet()


def test_live_subscriber_receives_later_events(broker, stub, pb, tenant, subscribers):
    token = broker.token(tenant)
    sub = Subscriber(stub, pb, token)
    subscribers.append(sub)
    # The status is sent once the subscription exists: after it, nothing is missed.
    status = sub.status()
    assert status.tenant_id == tenant
    assert status.resumed is False
    assert status.replayed == 0

    response = publish(
        stub,
        pb,
        token,
        {"type": "alert.created", "data": '"one"'},
        {"type": "alert.created", "data": '"two"', "id": "producer-id:2"},
    )
    ids = [r.id for r in response.results]
    assert ids[1] == "producer-id:2"
    events = sub.events(2)
    assert [e.id for e in events] == ids
    assert [e.data for e in events] == ['"one"', '"two"']
    sub.assert_quiet()


# 2. Exact JSON round trip


def test_data_round_trips_byte_identical(broker, stub, pb, tenant, subscribers):
    token = broker.token(tenant)
    data = '{"n":42,"f":1.50,"big":123456789012345678901234567890,"s":"é"}'
    (marker,) = publish(stub, pb, token, {"type": "cost.marker", "data": "{}"}).results
    sub = Subscriber(stub, pb, token, types=["cost.updated"])
    subscribers.append(sub)
    sub.status()
    (result,) = publish(stub, pb, token, {"type": "cost.updated", "data": data}).results

    (live,) = sub.events(1)
    assert live.id == result.id
    assert live.data == data
    assert live.data.encode("utf-8") == data.encode("utf-8")
    assert "42.0" not in live.data

    # And the same from history.
    replay = Subscriber(stub, pb, token, since_id=marker.id)
    subscribers.append(replay)
    st = replay.status()
    assert st.resumed is True and st.recovered is True and st.replayed == 1
    (replayed,) = replay.events(1)
    assert replayed.id == result.id
    assert replayed.data == data


# 3. Prefix filters


def test_prefix_filter_sees_only_matching_types(broker, stub, pb, tenant, subscribers):
    token = broker.token(tenant)
    sub = Subscriber(stub, pb, token, types=["cost.*"])
    subscribers.append(sub)
    sub.status()
    all_sub = Subscriber(stub, pb, token)
    subscribers.append(all_sub)
    all_sub.status()

    types = ["alert.created", "cost.updated", "costs.updated", "cost.budget.exceeded", "budget.cost", "cost.deleted"]
    response = publish(stub, pb, token, *[{"type": t, "data": "{}"} for t in types])
    ids = dict(zip(types, (r.id for r in response.results)))

    # The unfiltered subscriber sees all six, in order ...
    assert [e.type for e in all_sub.events(6)] == types
    # ... the cost.* one only the cost.* ones (not "costs.updated").
    wanted = ["cost.updated", "cost.budget.exceeded", "cost.deleted"]
    got = sub.events(3)
    assert [e.type for e in got] == wanted
    assert [e.id for e in got] == [ids[t] for t in wanted]
    sub.assert_quiet()


# 4. PublishStream


def test_publish_stream_acks_in_order_with_per_event_errors(broker, stub, pb, tenant, subscribers):
    token = broker.token(tenant)
    sub = Subscriber(stub, pb, token)
    subscribers.append(sub)
    sub.status()

    types = ["cost.updated", "cost.updated", "Not A Type", "cost.updated", "alert.created"]
    requests = [pb.PublishStreamRequest(event=pb.Event(type=t, data=f'{{"seq":{i}}}')) for i, t in enumerate(types)]
    acks = list(stub.PublishStream(iter(requests), metadata=auth(token), timeout=STREAM_TIMEOUT_S))

    assert [a.sequence for a in acks] == [0, 1, 2, 3, 4]
    bad = acks[2]
    assert bad.WhichOneof("outcome") == "error"
    assert bad.error.code == "invalid_argument"
    assert "type" in bad.error.message
    accepted = [a for i, a in enumerate(acks) if i != 2]
    for a in accepted:
        assert a.WhichOneof("outcome") == "accepted", a
        assert UUID_OR_ID.match(a.accepted.id), a
        assert a.accepted.duplicate is False
    assert len({a.accepted.id for a in accepted}) == 4

    # The four accepted events are delivered, in order; the refused one is not.
    events = sub.events(4)
    assert [e.id for e in events] == [a.accepted.id for a in accepted]
    assert [e.data for e in events] == ['{"seq":0}', '{"seq":1}', '{"seq":3}', '{"seq":4}']
    sub.assert_quiet()


# 5. Tenant isolation


def test_tenant_isolation(broker, stub, pb, subscribers):
    tenant_a = f"py-a-{uuid.uuid4().hex[:10]}"
    tenant_b = f"py-b-{uuid.uuid4().hex[:10]}"
    token_a, token_b = broker.token(tenant_a), broker.token(tenant_b)

    sub_a = Subscriber(stub, pb, token_a)
    sub_b = Subscriber(stub, pb, token_b)
    subscribers.extend([sub_a, sub_b])
    assert sub_a.status().tenant_id == tenant_a
    assert sub_b.status().tenant_id == tenant_b

    # A names B as the tenant: refused, not published anywhere.
    with pytest.raises(grpc.RpcError) as denied:
        publish(stub, pb, token_a, {"type": "cost.updated", "data": "{}", "tenant_id": tenant_b})
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    a_ids = [r.id for r in publish(stub, pb, token_a, *[{"type": "cost.updated", "data": '"a"'}] * 3).results]
    assert [e.id for e in sub_a.events(3)] == a_ids

    (b_result,) = publish(stub, pb, token_b, {"type": "cost.updated", "data": '"b"'}).results
    (b_event,) = sub_b.events(1)  # B's first event is its own, not one of A's
    assert b_event.id == b_result.id and b_event.tenant_id == tenant_b and b_event.data == '"b"'
    sub_b.assert_quiet()
    sub_a.assert_quiet()

    # B cannot follow A, nor replay A's history by naming A's event id.
    with pytest.raises(grpc.RpcError) as follow:
        list(stub.Subscribe(pb.SubscribeRequest(tenant_id=tenant_a), metadata=auth(token_b), timeout=RPC_TIMEOUT_S))
    assert follow.value.code() == grpc.StatusCode.PERMISSION_DENIED

    resumed = Subscriber(stub, pb, token_b, since_id=a_ids[0])
    subscribers.append(resumed)
    st = resumed.status()
    assert st.tenant_id == tenant_b
    assert st.recovered is False
    for e in resumed.events(st.replayed):
        assert e.tenant_id == tenant_b and e.id not in a_ids
    resumed.assert_quiet()


# 6. Refusals


def test_no_token_is_unauthenticated(stub, pb):
    with pytest.raises(grpc.RpcError) as err:
        stub.Publish(pb.PublishRequest(events=[pb.Event(type="cost.updated", data="{}")]), timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing token" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        list(stub.Subscribe(pb.SubscribeRequest(), timeout=RPC_TIMEOUT_S))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing token" in err.value.details()


def test_bad_token_is_unauthenticated(broker, stub, pb):
    with pytest.raises(grpc.RpcError) as err:
        publish(stub, pb, "not.a.jwt", {"type": "cost.updated", "data": "{}"})
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_type_is_invalid_argument(broker, stub, pb, tenant, subscribers):
    token = broker.token(tenant)
    sub = Subscriber(stub, pb, token)
    subscribers.append(sub)
    sub.status()
    with pytest.raises(grpc.RpcError) as err:
        publish(
            stub,
            pb,
            token,
            {"type": "cost.updated", "data": "{}"},
            {"type": "Cost Updated", "data": "{}"},
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "type" in err.value.details()
    # A batch is refused whole: the valid first event was not delivered either.
    sub.assert_quiet()


def test_subscribe_only_token_cannot_publish(broker, stub, pb, tenant):
    token = broker.token(tenant, scope="events:subscribe")
    with pytest.raises(grpc.RpcError) as err:
        publish(stub, pb, token, {"type": "cost.updated", "data": "{}"})
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "events:publish" in err.value.details()


# 7. Health


@pytest.mark.parametrize("service", ["", BROKER_SERVICE])
def test_health_serving(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service_not_found(channel):
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
