"""Enforcement policies against the real binary: a runaway agent publishing
over gRPC is detected and paused live, then resolved; `policies.simulate`
(official `mcp` SDK) over the same history reports the same firings;
`policies.create` is a write tool; bad policies are refused naming the
field; tenants never see each other's policies or firings; windows and
firings survive a restart; the bounds hold."""

from __future__ import annotations

import http.client
import json
import time
import uuid

import pytest

from conftest import RPC_TIMEOUT_S, start_broker
from test_grpc_client import Subscriber
from test_mcp import metric, publish, rest, run

WRITE = "events:publish events:subscribe enforcement:write"


def runaway_policy(policy_id: str = "runaway-agents", window: str = "4s", threshold: int = 5, **action) -> dict:
    return {
        "id": policy_id,
        "name": "Pause agents that loop",
        "match": {"types": ["agent.*"]},
        "subject": "agent_id",
        "condition": {"measure": "count", "window": window, "threshold": threshold},
        "action": {"kind": "pause", "cooldown": "10m", "resolve_after": "1s", **action},
    }


def events_until(watcher, stop, timeout=30.0):
    """Events (type, data, trace_id) until one of type `stop` arrives."""
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [e] = watcher.events(1, timeout=max(0.1, deadline - time.monotonic()))
        out.append((e.type, json.loads(e.data), e.trace_id))
        if e.type == stop:
            return out
    raise AssertionError(f"no {stop} within {timeout}s: {out}")


def test_a_runaway_agent_is_paused_live_resolved_and_simulate_agrees(broker, stub, pb, tenant):
    token = broker.token(tenant, scope=WRITE)
    status, body = rest(broker, "PUT", "/v1/policies/runaway-agents", token, runaway_policy())
    assert status == 201, body
    assert body["created_at"] and body["mode"] == "enforce"
    watcher = Subscriber(stub, pb, token, types=["runaway_loop.*", "action.*"])
    agents = Subscriber(stub, pb, token, types=["agent.*"])
    try:
        watcher.status()
        agents.status()
        # a1 loops: 8 health checks at once; a2 stays under the threshold.
        ids = publish(stub, pb, token, [("agent.health_check", {"agent_id": "a1", "n": i}) for i in range(8)])
        publish(stub, pb, token, [("agent.health_check", {"agent_id": "a2"}) for _ in range(2)])
        published = agents.events(10)
        assert [e.id for e in published[:8]] == ids
        seen = events_until(watcher, "runaway_loop.paused")
        kinds = [k for k, _, _ in seen]
        assert kinds == [
            "runaway_loop.detected",
            "action.queued",
            "action.executing",
            "action.completed",
            "runaway_loop.paused",
        ], kinds
        _, detected, trace = seen[0]
        assert detected["subject"] == "a1" and detected["policy_id"] == "runaway-agents"
        assert detected["value"] == 5 and detected["threshold"] == 5 and detected["window"] == "4s"
        assert detected["trigger_event_id"] == ids[4], "the fifth event reached the threshold"
        assert detected["generated_by"] == "policy"
        action_ids = {d["action_id"] for _, d, _ in seen[1:]}
        assert len(action_ids) == 1, seen
        # The triggering event's trace id on every event of the firing.
        assert trace == published[4].trace_id, (trace, published[4].trace_id)
        assert all(t == trace for _, _, t in seen), seen
        # Under the threshold for resolve_after once the window has passed.
        resolved = events_until(watcher, "runaway_loop.resolved", timeout=30)
        assert [k for k, _, _ in resolved] == ["runaway_loop.resolved"], resolved
        _, done, _ = resolved[0]
        assert done["subject"] == "a1" and done["detected_at"] == detected["detected_at"]
        # One firing only: a2 never, a1 not again.
        watcher.assert_quiet(1.0)
    finally:
        watcher.close()
        agents.close()

    reader = broker.token(tenant, scope="enforcement:read")

    async def body(session):
        by_id = await session.call_tool("policies.simulate", {"policy_id": "runaway-agents", "window": "10m"})
        inline = await session.call_tool("policies.simulate", {"policy": runaway_policy("trial", threshold=9), "window": "10m"})
        return by_id, inline

    by_id, inline = run(broker, reader, body)
    assert not by_id.is_error, by_id.content
    sim = by_id.structured_content
    assert sim["events"] >= 10
    assert [(f["subject"], f["at"], f["value"], f["action"], f["resolved_at"]) for f in sim["firings"]] == [
        ("a1", detected["detected_at"], 5.0, "pause", done["resolved_at"])
    ], sim
    assert sim["firings"][0]["event_id"] == ids[4]
    # A stricter trial policy would not have fired; nothing was published.
    assert not inline.is_error, inline.content
    assert inline.structured_content["firings"] == []


def test_policies_create_is_a_write_tool_and_takes_effect(broker, stub, pb, tenant):
    writer = broker.token(tenant, scope="enforcement:write")
    admin = broker.token(tenant, scope="settings:write")
    doc = runaway_policy("budget", window="1h", threshold=3)
    doc.update(
        {
            "match": {"types": ["cost.updated"], "where": {"source": "bedrock"}},
            "subject": "workflow_id",
            "condition": {"measure": "sum", "field": "cost_usd", "window": "1h", "threshold": 100},
            "action": {"kind": "alert", "severity": "critical"},
        }
    )

    async def create(session):
        return await session.call_tool("policies.create", {"policy": doc})

    off = run(broker, writer, create)
    assert off.is_error and "write_tools_enabled" in off.content[0].text, off.content
    status, _ = rest(broker, "PUT", "/v1/settings/mcp", admin, {"write_tools_enabled": True, "write_grants": []})
    assert status == 200
    ungranted = run(broker, writer, create)
    assert ungranted.is_error and "not granted" in ungranted.content[0].text, ungranted.content
    status, _ = rest(
        broker, "PUT", "/v1/settings/mcp", admin, {"write_tools_enabled": True, "write_grants": ["policies.create"]}
    )
    assert status == 200
    no_scope = run(broker, broker.token(tenant, scope="enforcement:read"), create)
    assert no_scope.is_error and "enforcement:write" in no_scope.content[0].text, no_scope.content

    token = broker.token(tenant)
    watcher = Subscriber(stub, pb, token, types=["policy.*", "alert.*", "runaway_loop.*"])
    try:
        watcher.status()
        created = run(broker, writer, create)
        assert not created.is_error, created.content
        assert created.structured_content["created"] is True
        [e] = watcher.events(1)
        assert e.type == "policy.created" and json.loads(e.data)["policy_id"] == "budget"
        # It counts from the next event: a workflow spending 120 USD on
        # Bedrock within the hour fires a critical alert.
        publish(
            stub,
            pb,
            token,
            [
                ("cost.updated", {"workflow_id": "etl", "source": "bedrock", "cost_usd": 70}),
                ("cost.updated", {"workflow_id": "etl", "source": "aws", "cost_usd": 500}),
                ("cost.updated", {"workflow_id": "etl", "source": "bedrock", "cost_usd": 50}),
            ],
        )
        seen = events_until(watcher, "alert.created")
        assert [k for k, _, _ in seen] == ["runaway_loop.detected", "alert.created"], seen
        assert seen[0][1]["value"] == 120 and seen[0][1]["measure"] == "sum"
        alert = seen[1][1]
        assert alert["severity"] == "critical" and alert["alert_id"].startswith("policy:budget:etl:")
        updated = run(broker, writer, create)
        assert updated.structured_content["created"] is False
        [e] = watcher.events(1)
        assert e.type == "policy.updated"
    finally:
        watcher.close()
    status, listed = rest(broker, "GET", "/v1/policies", broker.token(tenant, scope="enforcement:read"), None)
    assert status == 200 and [p["id"] for p in listed["policies"]] == ["budget"]


@pytest.mark.parametrize(
    "change, names",
    [
        ({"surprise": 1}, "surprise: unknown field"),
        ({"condition": {"measure": "count", "window": "-5m", "threshold": 5}}, "condition.window"),
        ({"condition": {"measure": "count", "window": "5m", "threshold": "fifty"}}, "condition.threshold"),
        ({"condition": {"measure": "sum", "window": "5m", "threshold": 5}}, "condition.field"),
        ({"match": {"types": ["Agent.Loop"]}}, "match.types[0]"),
        ({"match": {"types": ["agent.*"], "where": {"tags": {"a": 1}}}}, "match.where.tags"),
        ({"action": {"kind": "explode"}}, "action.kind"),
        ({"action": {"kind": "pause", "severity": "high"}}, "action.severity"),
        ({"subject": "agent id"}, "subject"),
        ({"id": "other"}, "id:"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(broker, tenant, change, names):
    token = broker.token(tenant, scope="enforcement:write")
    doc = {**runaway_policy("p1"), **change}
    status, body = rest(broker, "PUT", "/v1/policies/p1", token, doc)
    assert status == 400, body
    assert body["code"] == "invalid_argument" and names in body["message"], body
    if names != "id:":
        # The same check on the dry run.
        status, body = rest(broker, "POST", "/v1/policy-simulations", token, {"policy": doc})
        assert status == 400 and names in body["message"], body
    status, body = rest(broker, "GET", "/v1/policies/p1", token, None)
    assert status == 404, "nothing was stored"


def test_policy_routes_need_their_scopes(broker, tenant):
    status, body = rest(broker, "GET", "/v1/policies", None, None)
    assert status == 401, body
    status, body = rest(broker, "PUT", "/v1/policies/p", broker.token(tenant, scope="enforcement:read"), runaway_policy("p"))
    assert status == 403 and "enforcement:write" in body["message"], body
    status, body = rest(broker, "GET", "/v1/policies", broker.token(tenant), None)
    assert status == 403 and "enforcement:read" in body["message"], body
    status, body = rest(
        broker, "POST", "/v1/policy-simulations", broker.token(tenant, scope="enforcement:read"), {"policy_id": "x", "policy": {}}
    )
    assert status == 400 and "either policy" in body["message"], body
    # A body past 64 KiB is refused, naming the limit.
    huge = {**runaway_policy("p"), "name": "x" * 70_000}
    status, body = rest(broker, "PUT", "/v1/policies/p", broker.token(tenant, scope="enforcement:write"), huge)
    assert status == 400 and "65536" in body["message"], body


def test_tenants_never_see_each_others_policies_or_firings(broker, stub, pb, tenant):
    other = f"other-{uuid.uuid4().hex[:8]}"
    a = broker.token(tenant, scope=WRITE)
    b = broker.token(other, scope=WRITE)
    status, _ = rest(broker, "PUT", "/v1/policies/iso", a, runaway_policy("iso", threshold=3))
    assert status == 201
    for method in ("GET", "DELETE"):
        status, body = rest(broker, method, "/v1/policies/iso", b, None)
        assert status == 404, (method, body)
    status, listed = rest(broker, "GET", "/v1/policies", b, None)
    assert listed["policies"] == []
    watch_a = Subscriber(stub, pb, a, types=["runaway_loop.*"])
    watch_b = Subscriber(stub, pb, b, types=["runaway_loop.*"])
    try:
        watch_a.status()
        watch_b.status()
        # B's events never count for A's policy.
        publish(stub, pb, b, [("agent.error", {"agent_id": "x"}) for _ in range(5)])
        watch_a.assert_quiet(1.5)
        # A's firing stays in A.
        publish(stub, pb, a, [("agent.error", {"agent_id": "x"}) for _ in range(3)])
        [e] = watch_a.events(1)
        assert e.type == "runaway_loop.detected" and e.tenant_id == tenant
        watch_b.assert_quiet(1.0)
    finally:
        watch_a.close()
        watch_b.close()
    # B's simulation of A's policy id finds nothing of A's.
    status, body = rest(broker, "POST", "/v1/policy-simulations", b, {"policy_id": "iso"})
    assert status == 404, body


def test_windows_and_firings_survive_restarts(tmp_path, pb):
    import grpc
    from tensorcost.events.v1 import events_pb2_grpc

    tenant = f"py-{uuid.uuid4().hex[:12]}"
    data_dir = tmp_path / "data"
    runs = iter(range(10))

    def with_broker(body, kill=False):
        workdir = tmp_path / f"run{next(runs)}"
        workdir.mkdir()
        with start_broker(workdir, {"TC_DATA_DIR": str(data_dir)}) as b:
            ch = grpc.insecure_channel(b.grpc_addr)
            try:
                result = body(b, events_pb2_grpc.EventBrokerStub(ch))
                if kill:
                    b.kill()
                return result
            finally:
                ch.close()

    def first(b, stub):
        token = b.token(tenant, scope=WRITE)
        status, _ = rest(b, "PUT", "/v1/policies/slow", token, runaway_policy("slow", window="10m", threshold=6))
        assert status == 201
        publish(stub, pb, token, [("agent.error", {"agent_id": "a"}) for _ in range(4)])

    # A graceful stop saves the four events counted.
    with_broker(first)

    def second(b, stub):
        token = b.token(tenant, scope=WRITE)
        watcher = Subscriber(stub, pb, token, types=["runaway_loop.detected"])
        try:
            watcher.status()
            publish(stub, pb, token, [("agent.error", {"agent_id": "a"}) for _ in range(2)])
            [e] = watcher.events(1)
            assert json.loads(e.data)["value"] == 6, "the window resumed at four"
        finally:
            watcher.close()
        # The firing was saved at once (not at the 10 s periodic save);
        # give the store a moment to make it durable, then kill -9.
        time.sleep(1)

    with_broker(second, kill=True)

    def third(b, stub):
        token = b.token(tenant, scope=WRITE)
        watcher = Subscriber(stub, pb, token, types=["runaway_loop.detected"])
        try:
            watcher.status()
            publish(stub, pb, token, [("agent.error", {"agent_id": "a"}) for _ in range(6)])
            watcher.assert_quiet(2.0)  # already firing, and in its cooldown
        finally:
            watcher.close()

    with_broker(third)


def test_the_bounds_hold(tmp_path, pb):
    import grpc
    from tensorcost.events.v1 import events_pb2_grpc

    tenant = f"py-{uuid.uuid4().hex[:12]}"
    env = {"TC_POLICY_MAX_PER_TENANT": "2", "TC_POLICY_MAX_SUBJECTS": "2"}
    with start_broker(tmp_path, env) as b:
        token = b.token(tenant, scope=WRITE)
        for i in range(2):
            status, body = rest(b, "PUT", f"/v1/policies/p{i}", token, runaway_policy(f"p{i}", threshold=2))
            assert status == 201, body
        status, body = rest(b, "PUT", "/v1/policies/p2", token, runaway_policy("p2"))
        assert status == 429 and "TC_POLICY_MAX_PER_TENANT" in body["message"], body
        # Replacing one is not a new one.
        status, _ = rest(b, "PUT", "/v1/policies/p1", token, runaway_policy("p1", threshold=2))
        assert status == 200
        status, body = rest(b, "DELETE", "/v1/policies/p0", token, None)
        assert status == 204, body
        ch = grpc.insecure_channel(b.grpc_addr)
        try:
            stub = events_pb2_grpc.EventBrokerStub(ch)
            watcher = Subscriber(stub, pb, token, types=["runaway_loop.detected"])
            watcher.status()
            # Two subjects are followed; the third is not (counted).
            publish(stub, pb, token, [("agent.error", {"agent_id": a}) for a in ("a", "b", "c", "c", "c")])
            watcher.assert_quiet(1.5)
            publish(stub, pb, token, [("agent.error", {"agent_id": "a"})])
            [e] = watcher.events(1)
            assert json.loads(e.data)["subject"] == "a"
            watcher.close()
        finally:
            ch.close()
        assert metric(b, "tc_policy_refused_subjects_total") >= 3


def test_a_full_policy_queue_drops_evaluation_not_events(tmp_path, pb):
    """TC_POLICY_QUEUE=1: a burst overflows the evaluation queue; what
    overflows is counted, and every event is still accepted and delivered."""
    import grpc
    from tensorcost.events.v1 import events_pb2_grpc

    tenant = f"py-{uuid.uuid4().hex[:12]}"
    with start_broker(tmp_path, {"TC_POLICY_QUEUE": "1"}) as b:
        token = b.token(tenant, scope=WRITE)
        status, body = rest(b, "PUT", "/v1/policies/p", token, runaway_policy("p", threshold=1_000_000))
        assert status == 201, body
        ch = grpc.insecure_channel(b.grpc_addr)
        try:
            stub = events_pb2_grpc.EventBrokerStub(ch)
            watcher = Subscriber(stub, pb, token, types=["agent.error"])
            watcher.status()
            ids = []
            for _ in range(8):  # batches of 250 (TC_MAX_BATCH is 256)
                ids += publish(stub, pb, token, [("agent.error", {"agent_id": f"a{i % 10}"}) for i in range(250)])
            assert len(ids) == 2000 and all(ids)
            assert [e.id for e in watcher.events(2000)] == ids
            watcher.close()
        finally:
            ch.close()
        dropped = metric(b, "tc_policy_dropped_events_total")
        evaluated = metric(b, "tc_policy_evaluated_events_total")
        assert dropped > 0, "a queue of one must overflow in a burst of 2000"
        assert dropped + evaluated >= 2000, (dropped, evaluated)
