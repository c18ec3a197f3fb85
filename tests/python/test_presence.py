"""Agent presence: a caller whose token has an `agent_id` claim is
announced as `agent.connected` when its first gRPC stream opens and
`agent.disconnected` (with the reason) when its last one ends, into its own
tenant only; ordinary callers are not; `agent.cost` shows it."""

from __future__ import annotations

import json
import queue
import threading


from conftest import RPC_TIMEOUT_S, auth
from test_grpc_client import Subscriber
from test_mcp_stdio import call_until
from test_mcp import run


def presence_events(watcher, n):
    return [(e.type, json.loads(e.data)) for e in watcher.events(n)]


class PublishStream:
    """A PublishStream call whose requests this test sends one at a time."""

    def __init__(self, stub, pb, token):
        self.pb = pb
        self.requests: queue.Queue = queue.Queue()
        self.acks: queue.Queue = queue.Queue()
        self.call = stub.PublishStream(iter(self.requests.get, None), metadata=auth(token), timeout=60)
        self.thread = threading.Thread(target=lambda: [self.acks.put(a) for a in self.call], daemon=True)
        self.thread.start()

    def publish(self, event_type, data):
        self.requests.put(self.pb.PublishStreamRequest(event=self.pb.Event(type=event_type, data=json.dumps(data))))
        return self.acks.get(timeout=RPC_TIMEOUT_S)

    def end(self):
        self.requests.put(None)
        self.thread.join(timeout=RPC_TIMEOUT_S)
        assert not self.thread.is_alive(), "PublishStream did not end"


def test_an_agents_streams_are_announced_once_per_presence_in_its_tenant(broker, stub, pb, tenant):
    watcher = Subscriber(stub, pb, broker.token(tenant), types=["agent.*"])
    other = Subscriber(stub, pb, broker.token(f"other-{tenant}"), types=["agent.*"])
    try:
        watcher.status()
        other.status()
        agent = broker.token(tenant, scope="events:publish events:subscribe", agent_id="gpu-agent-7")

        listening = Subscriber(stub, pb, agent, types=["alert.*"])
        listening.status()
        [(kind, data)] = presence_events(watcher, 1)
        assert kind == "agent.connected"
        instance = data.pop("instance")
        assert len(instance) == 36, instance
        assert data == {"agent_id": "gpu-agent-7", "transport": "grpc", "stream": "subscribe"}

        # A second stream of the same agent: still one presence.
        publishing = PublishStream(stub, pb, agent)
        ack = publishing.publish("agent.health_check", {"agent_id": "gpu-agent-7", "status": "healthy"})
        assert ack.WhichOneof("outcome") == "accepted", ack
        [(kind, data)] = presence_events(watcher, 1)
        assert kind == "agent.health_check", "a second stream announced the agent again"

        listening.close()
        watcher.assert_quiet(0.5)
        publishing.end()
        [(kind, data)] = presence_events(watcher, 1)
        assert kind == "agent.disconnected"
        assert data["agent_id"] == "gpu-agent-7"
        assert data["reason"] == "closed"
        assert data["instance"] == instance
        assert data["connected_s"] >= 0 and data["connected_at"].endswith("Z")

        # Service callers (no agent_id) have no presence.
        service = Subscriber(stub, pb, broker.token(tenant))
        service.status()
        service.close()
        watcher.assert_quiet(0.5)
        # Another tenant never sees this tenant's agents.
        other.assert_quiet(0.1)
    finally:
        watcher.close()
        other.close()

    reader = broker.token(tenant, scope="agent:read")

    async def presence(session):
        return await call_until(
            session,
            "agent.cost",
            {"agent_id": "gpu-agent-7"},
            lambda s: s["presence"] and s["presence"][0]["status"] == "disconnected",
        )

    answer = run(broker, reader, presence)
    assert not answer.is_error, answer.content
    [agent_state] = answer.structured_content["presence"]
    assert agent_state["status"] == "disconnected"
    assert agent_state["disconnect_reason"] == "closed"
    assert agent_state["health"] == "healthy"
    assert answer.structured_content["connected"] == 0


def test_a_publish_stream_without_the_publish_scope_announces_nothing(broker, stub, pb, tenant):
    import grpc

    watcher = Subscriber(stub, pb, broker.token(tenant), types=["agent.*"])
    try:
        watcher.status()
        reader = broker.token(tenant, scope="events:subscribe", agent_id="reader-agent")
        stream = PublishStream(stub, pb, reader)
        ack = stream.publish("cost.updated", {"source": "aws", "amount_usd": 1})
        assert ack.WhichOneof("outcome") == "error" and "events:publish" in ack.error.message, ack
        stream.end()
        watcher.assert_quiet(0.5)
    finally:
        watcher.close()


def test_an_agent_id_that_is_not_an_identifier_is_refused(broker, stub, pb, tenant):
    import grpc
    import pytest

    agent = broker.token(tenant, agent_id="bad agent id")
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Subscribe(pb.SubscribeRequest(), metadata=auth(agent), timeout=RPC_TIMEOUT_S))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "agent_id" in refused.value.details()
