"""The MCP server at /mcp, driven by the official Python `mcp` SDK over
Streamable HTTP against the real binary: tools and their schemas, the
bearer token on every request, scopes, tenant isolation, and malformed or
oversized requests."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import grpc
import httpx2
import jsonschema
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from conftest import RPC_TIMEOUT_S, auth, start_broker


def mcp_url(broker) -> str:
    return f"http://{broker.http_addr}/mcp"


async def _with_session(broker, token: str, body):
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=RPC_TIMEOUT_S) as client:
        async with streamable_http_client(mcp_url(broker), http_client=client) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await body(session)


def run(broker, token: str, body):
    """Runs `body(session)` in an initialized MCP session with `token`."""
    return anyio.run(_with_session, broker, token, body)


def publish(stub, pb, token: str, events: list[tuple[str, dict]]) -> list[str]:
    reply = stub.Publish(
        pb.PublishRequest(
            events=[pb.Event(type=t, data=json.dumps(d)) for t, d in events]
        ),
        metadata=auth(token),
        timeout=RPC_TIMEOUT_S,
    )
    return [r.id for r in reply.results]


def raw_post(broker, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    host, port = broker.http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT_S)
    try:
        conn.request("POST", "/mcp", body=body, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


MCP_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
}
INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
).encode()


def test_lists_tools_with_their_schemas_and_scopes(broker, tenant):
    token = broker.token(tenant)

    async def body(session):
        return await session.list_tools()

    tools = {t.name: t for t in run(broker, token, body).tools}
    recent = tools.get("events.recent")
    assert recent is not None, f"events.recent not listed: {sorted(tools)}"
    assert "events:subscribe" in recent.description
    props = recent.input_schema["properties"]
    assert set(props) >= {"types", "since", "limit"}, props
    assert recent.output_schema is not None
    assert set(recent.output_schema["properties"]) >= {"events", "recovered", "more"}


def test_events_recent_returns_the_tenants_events_filtered_and_paged(broker, stub, pb, tenant):
    token = broker.token(tenant)
    ids = publish(
        stub,
        pb,
        token,
        [
            ("cost.updated", {"cost_usd": 1.5}),
            ("alert.created", {"alert_id": "a1"}),
            ("cost.updated", {"cost_usd": 2.5}),
            ("cost.threshold_exceeded", {"threshold_usd": 3}),
        ],
    )

    async def body(session):
        every = await session.call_tool("events.recent", {})
        costs = await session.call_tool("events.recent", {"types": ["cost.*"], "limit": 2})
        after = await session.call_tool("events.recent", {"types": ["cost.*"], "since": ids[0], "limit": 1})
        return every, costs, after

    every, costs, after = run(broker, token, body)
    assert not every.is_error, every.content
    assert [e["id"] for e in every.structured_content["events"]] == ids
    assert {e["tenant_id"] for e in every.structured_content["events"]} == {tenant}
    assert every.structured_content["events"][0]["data"] == {"cost_usd": 1.5}
    # The newest two cost events, oldest first.
    assert [e["id"] for e in costs.structured_content["events"]] == [ids[2], ids[3]]
    # One page after the first: the next cost event, and more after it.
    assert [e["id"] for e in after.structured_content["events"]] == [ids[2]]
    assert after.structured_content["more"] is True
    assert after.structured_content["recovered"] is True
    # Clients that show only text get the figures too.
    assert ids[2] in after.content[0].text


def test_another_tenants_events_are_never_returned(broker, stub, pb):
    a, b = f"py-{uuid.uuid4().hex[:12]}", f"py-{uuid.uuid4().hex[:12]}"
    a_ids = publish(stub, pb, broker.token(a), [("cost.updated", {"cost_usd": 9})])
    b_token = broker.token(b)

    async def body(session):
        listed = await session.call_tool("events.recent", {})
        resumed = await session.call_tool("events.recent", {"since": a_ids[0]})
        return listed, resumed

    listed, resumed = run(broker, b_token, body)
    assert listed.structured_content["events"] == []
    # A's id is unknown in B's history: nothing of A's comes after it.
    assert resumed.structured_content["events"] == []
    assert resumed.structured_content["recovered"] is False


def test_a_missing_scope_is_a_tool_error_naming_the_scope(broker, tenant):
    token = broker.token(tenant, scope="events:publish")

    async def body(session):
        return await session.call_tool("events.recent", {})

    result = run(broker, token, body)
    assert result.is_error
    assert "events:subscribe" in result.content[0].text


def test_bad_arguments_are_tool_errors_that_name_them(broker, tenant):
    token = broker.token(tenant)

    async def body(session):
        bad_limit = await session.call_tool("events.recent", {"limit": 5000})
        bad_type = await session.call_tool("events.recent", {"types": ["cost.*.x"]})
        unknown_tool = None
        try:
            unknown_tool = await session.call_tool("no.such_tool", {})
        except Exception as e:  # a protocol error is raised by the SDK
            unknown_tool = e
        return bad_limit, bad_type, unknown_tool

    bad_limit, bad_type, unknown_tool = run(broker, token, body)
    assert bad_limit.is_error and "limit" in bad_limit.content[0].text
    assert bad_type.is_error and "cost.*.x" in bad_type.content[0].text
    # A protocol error (the SDK raises it), not a tool result.
    assert isinstance(unknown_tool, Exception), unknown_tool
    assert "not found" in str(unknown_tool)


def test_no_token_or_a_bad_one_is_401_before_anything_is_read(broker):
    status, headers, _ = raw_post(broker, INITIALIZE, MCP_HEADERS)
    assert status == 401
    assert headers.get("www-authenticate") == "Bearer"
    status, headers, body = raw_post(broker, INITIALIZE, {**MCP_HEADERS, "Authorization": "Bearer not.a.token"})
    assert status == 401, body
    assert headers.get("www-authenticate") == "Bearer"
    assert b"not.a.token" not in body


def test_malformed_and_oversized_requests_get_protocol_errors(broker, tenant):
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {broker.token(tenant)}"}
    status, _, body = raw_post(broker, b"{not json", headers)
    assert 400 <= status < 500, (status, body)
    status, _, body = raw_post(broker, b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"x":"' + b"a" * (300 * 1024) + b'"}}', headers)
    assert status == 413, (status, body[:200])
    # The broker still answers.
    status, _, body = raw_post(broker, INITIALIZE, headers)
    assert status == 200, body


def test_rest_events_reads_the_same_history(broker, stub, pb, tenant):
    token = broker.token(tenant)
    ids = publish(stub, pb, token, [("instance.created", {"instance_id": "i-1"}), ("cost.updated", {"cost_usd": 1})])
    host, port = broker.http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT_S)
    try:
        conn.request("GET", "/v1/events?types=instance.*&limit=10", headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        page = json.loads(r.read())
        assert r.status == 200, page
        assert [e["id"] for e in page["events"]] == [ids[0]]
        assert page["recovered"] is True and page["more"] is False
        conn.request("GET", "/v1/events?limit=0", headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        error = json.loads(r.read())
        assert r.status == 400 and "limit" in error["message"], error
        conn.request("GET", "/v1/events")
        r = conn.getresponse()
        r.read()
        assert r.status == 401
    finally:
        conn.close()


# ---- cost.summary ---------------------------------------------------------------

SCHEMAS = Path(__file__).resolve().parent.parent.parent / "docs" / "schemas"


def hours_ago(n: float) -> str:
    at = datetime.now(timezone.utc) - timedelta(hours=n)
    return at.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def cost_summary_when(broker, token, args, ready):
    """cost.summary with `args`, asked again until `ready(answer)` (the
    projections apply events a moment after they are accepted)."""

    async def body(session):
        deadline = anyio.current_time() + 10
        while True:
            result = await session.call_tool("cost.summary", args)
            if result.is_error or ready(result.structured_content) or anyio.current_time() > deadline:
                return result
            await anyio.sleep(0.05)

    return run(broker, token, body)


COSTS = [
    ("cost.updated", {"source": "bedrock", "amount_usd": 12.25, "period_start": None, "tags": {"team": "ml", "environment": "prod"}}),
    ("cost.updated", {"source": "bedrock", "amount_usd": 7.5, "period_start": None, "tags": {"team": "ml"}}),
    ("cost.updated", {"source": "aws", "amount_usd": 3.125, "period_start": None, "tags": {"team": "web"}, "service": "EC2"}),
    ("cost.updated", {"source": "azure_openai", "amount_usd": 0.5, "period_start": None}),
]


def cost_events(hours: list[float]):
    out = []
    for (t, d), h in zip(COSTS, hours):
        d = dict(d)
        d["period_start"] = hours_ago(h)
        out.append((t, d))
    return out


def test_the_cost_updated_examples_follow_the_schema():
    schema = json.loads((SCHEMAS / "cost.updated.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for _, data in cost_events([1, 2, 3, 4]):
        jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"source": "aws"}, schema)


def test_cost_summary_sums_by_source_and_tag_over_the_window(broker, stub, pb, tenant):
    publisher = broker.token(tenant)
    # Three within the last day; one ten days back, outside the default week.
    events = cost_events([2, 5, 20, 24 * 10])
    publish(stub, pb, publisher, events)
    reader = broker.token(tenant, scope="cost:read")
    week = cost_summary_when(broker, reader, {}, lambda s: s["total_usd"] >= 22.875)
    assert not week.is_error, week.content
    s = week.structured_content
    assert s["total_usd"] == 22.875, s
    assert s["events"] == 3
    assert s["currency"] == "USD"
    assert [(a["source"], a["usd"]) for a in s["by_source"]] == [("bedrock", 19.75), ("aws", 3.125)]
    tags = {(t["tag"], t["value"]): t["usd"] for t in s["by_tag"]}
    assert tags == {("team", "ml"): 19.75, ("environment", "prod"): 12.25, ("team", "web"): 3.125}
    assert "22.88 USD" in week.content[0].text

    month = cost_summary_when(broker, reader, {"window": "30d"}, lambda s: s["total_usd"] >= 23.375)
    assert month.structured_content["total_usd"] == 23.375
    bedrock = cost_summary_when(broker, reader, {"window": "30d", "source": "bedrock"}, lambda s: True)
    assert bedrock.structured_content["total_usd"] == 19.75
    assert [a["source"] for a in bedrock.structured_content["by_source"]] == ["bedrock"]
    # A window ending 12 hours ago holds the two older costs of the day.
    earlier = cost_summary_when(broker, reader, {"window": "24h", "until": hours_ago(12)}, lambda s: True)
    assert earlier.structured_content["total_usd"] == 3.125


def test_cost_summary_needs_cost_read_and_checks_its_arguments(broker, tenant):
    no_scope = broker.token(tenant, scope="events:subscribe")

    async def refused(session):
        return await session.call_tool("cost.summary", {})

    result = run(broker, no_scope, refused)
    assert result.is_error and "cost:read" in result.content[0].text

    reader = broker.token(tenant, scope="cost:read")

    async def bad(session):
        return [
            await session.call_tool("cost.summary", {"window": "a while"}),
            await session.call_tool("cost.summary", {"window": "200d"}),
            await session.call_tool("cost.summary", {"until": "yesterday"}),
            await session.call_tool("cost.summary", {"top": 0}),
        ]

    window, too_long, until, top = run(broker, reader, bad)
    assert window.is_error and "window" in window.content[0].text
    assert too_long.is_error and "90d" in too_long.content[0].text
    assert until.is_error and "until" in until.content[0].text
    assert top.is_error and "top" in top.content[0].text


def test_cost_summary_never_counts_another_tenants_costs(broker, stub, pb):
    a, b = f"py-{uuid.uuid4().hex[:12]}", f"py-{uuid.uuid4().hex[:12]}"
    publish(stub, pb, broker.token(a), cost_events([1]))
    publish(stub, pb, broker.token(b), [("cost.updated", {"source": "gcp", "amount_usd": 1.0})])
    # Wait for A's cost to be applied, then read B's.
    cost_summary_when(broker, broker.token(a, scope="cost:read"), {}, lambda s: s["total_usd"] > 0)
    b_view = cost_summary_when(broker, broker.token(b, scope="cost:read"), {}, lambda s: s["total_usd"] > 0)
    s = b_view.structured_content
    assert s["total_usd"] == 1.0, s
    assert [x["source"] for x in s["by_source"]] == ["gcp"]


def tool_when(broker, token, name, args, ready):
    """`name` with `args`, asked again until `ready(answer)`."""

    async def body(session):
        deadline = anyio.current_time() + 10
        while True:
            result = await session.call_tool(name, args)
            if result.is_error or ready(result.structured_content) or anyio.current_time() > deadline:
                return result
            await anyio.sleep(0.05)

    return run(broker, token, body)


def test_workload_and_agent_costs_break_the_same_costs_down(broker, stub, pb, tenant):
    publish(
        stub,
        pb,
        broker.token(tenant),
        [
            ("cost.updated", {"source": "bedrock", "amount_usd": 4.5, "tags": {"application": "chat", "team": "ml", "environment": "prod"}, "agent_id": "triage-bot", "workflow_id": "ticket-triage"}),
            ("cost.updated", {"source": "bedrock", "amount_usd": 1.25, "tags": {"application": "chat", "environment": "staging"}, "agent_id": "triage-bot", "workflow_id": "summarize"}),
            ("cost.updated", {"source": "aws", "amount_usd": 10.0, "tags": {"application": "search", "team": "web"}}),
            ("cost.updated", {"source": "azure_openai", "amount_usd": 0.75, "agent_id": "sql-agent", "workflow_id": "ticket-triage"}),
        ],
    )
    token = broker.token(tenant, scope="workload:read agent:read")
    w = tool_when(broker, token, "workload.cost", {}, lambda s: s["total_usd"] >= 16.5)
    assert not w.is_error, w.content
    s = w.structured_content
    assert s["total_usd"] == 16.5
    names = lambda b: [(v["name"], v["usd"]) for v in b["values"]]  # noqa: E731
    assert names(s["application"]) == [("search", 10.0), ("chat", 5.75)]
    assert s["application"]["untagged_usd"] == 0.75
    assert names(s["team"]) == [("web", 10.0), ("ml", 4.5)]
    assert s["team"]["untagged_usd"] == 2.0
    assert names(s["environment"]) == [("prod", 4.5), ("staging", 1.25)]

    a = tool_when(broker, token, "agent.cost", {}, lambda s: s["agents_usd"] >= 6.5)
    s = a.structured_content
    assert s["agents_usd"] == 6.5
    assert [(x["name"], x["usd"]) for x in s["by_agent"]] == [("triage-bot", 5.75), ("sql-agent", 0.75)]
    assert [(x["name"], x["usd"]) for x in s["by_workflow"]] == [("ticket-triage", 5.25), ("summarize", 1.25)]
    one = tool_when(broker, token, "agent.cost", {"agent_id": "sql-agent"}, lambda s: True)
    assert [(x["name"], x["usd"]) for x in one.structured_content["by_agent"]] == [("sql-agent", 0.75)]

    # Each tool needs its own scope.
    only_workload = broker.token(tenant, scope="workload:read")

    async def refused(session):
        return await session.call_tool("agent.cost", {})

    result = run(broker, only_workload, refused)
    assert result.is_error and "agent:read" in result.content[0].text


@pytest.mark.parametrize("stop", ["graceful", "kill -9"])
def test_cost_figures_survive_a_restart_with_the_embedded_store(tmp_path, stop):
    tenant = f"py-{uuid.uuid4().hex[:12]}"
    events = cost_events([1, 2, 3])
    expected = 22.875

    def entities(b):
        token = b.token(tenant, scope="alert:read ai:read")
        alerts = tool_when(b, token, "alerts.recent", {}, lambda s: len(s["alerts"]) == 2)
        recs = tool_when(b, token, "inference.recommendations", {}, lambda s: len(s["recommendations"]) == 2)
        return alerts.structured_content, recs.structured_content

    def answer(b):
        return cost_summary_when(
            b, b.token(tenant, scope="cost:read"), {}, lambda s: s["total_usd"] >= expected
        ).structured_content

    data = {"TC_DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with start_broker(tmp_path / "first", data) as b:
        channel = grpc.insecure_channel(b.grpc_addr)
        from tensorcost.events.v1 import events_pb2, events_pb2_grpc

        stub = events_pb2_grpc.EventBrokerStub(channel)
        publish(stub, events_pb2, b.token(tenant), events)
        publish(stub, events_pb2, b.token(tenant), ALERTS_AND_RECOMMENDATIONS)
        channel.close()
        before = answer(b)
        entities_before = entities(b)
        assert before["total_usd"] == expected
        if stop == "kill -9":
            # Past one save interval (1 s): the figures are in the file.
            time.sleep(1.5)
            b.kill()
    with start_broker(tmp_path / "second", data) as b:
        after = answer(b)
        assert entities(b) == entities_before
    for key in ("from", "to"):
        before.pop(key), after.pop(key)
    assert after == before


ALERTS_AND_RECOMMENDATIONS = [
    ("alert.created", {"alert_id": "al-1", "severity": "high", "title": "Bedrock spend 80% of budget", "source": "budget", "resource": "bedrock"}),
    ("alert.created", {"alert_id": "al-2", "severity": "low", "title": "Idle GPU", "resource": "i-42"}),
    ("alert.escalated", {"alert_id": "al-1", "severity": "critical"}),
    ("alert.resolved", {"alert_id": "al-2"}),
    ("recommendation.created", {"recommendation_id": "rec-1", "category": "inference", "provider": "bedrock", "service": "anthropic.claude-3-5-sonnet", "title": "Use provisioned throughput", "estimated_monthly_savings_usd": 1200.5}),
    ("recommendation.created", {"recommendation_id": "rec-2", "category": "inference", "provider": "azure_openai", "title": "Cache prompts", "estimated_monthly_savings_usd": 300}),
    ("recommendation.created", {"recommendation_id": "rec-3", "category": "inference", "provider": "bedrock", "title": "Smaller model for triage", "estimated_monthly_savings_usd": 50}),
    ("recommendation.created", {"recommendation_id": "rec-4", "category": "compute", "provider": "aws", "title": "Rightsize", "estimated_monthly_savings_usd": 9000}),
    ("recommendation.dismissed", {"recommendation_id": "rec-3", "reason": "quality"}),
]


def test_the_alert_and_recommendation_examples_follow_their_schemas():
    for event_type, data in ALERTS_AND_RECOMMENDATIONS + FLEET_AND_CONNECTIONS:
        schema = json.loads((SCHEMAS / f"{event_type}.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.validate(data, schema)
    created = json.loads((SCHEMAS / "alert.created.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"alert_id": "a", "severity": "apocalyptic"}, created)


def test_alerts_and_inference_recommendations_as_they_stand(broker, stub, pb, tenant):
    publish(stub, pb, broker.token(tenant), ALERTS_AND_RECOMMENDATIONS)
    token = broker.token(tenant, scope="alert:read ai:read")
    alerts = tool_when(broker, token, "alerts.recent", {}, lambda s: len(s["alerts"]) == 2 and s["alerts"][0]["state"] == "escalated" or s["alerts"][0]["state"] == "resolved")
    assert not alerts.is_error, alerts.content
    by_id = {a["alert_id"]: a for a in alerts.structured_content["alerts"]}
    assert by_id["al-1"]["state"] == "escalated"
    assert by_id["al-1"]["severity"] == "critical"
    assert by_id["al-1"]["title"] == "Bedrock spend 80% of budget"
    assert by_id["al-2"]["state"] == "resolved"
    # Most recently changed first.
    assert [a["alert_id"] for a in alerts.structured_content["alerts"]] == ["al-2", "al-1"]
    open_ = tool_when(broker, token, "alerts.recent", {"state": ["open", "escalated"], "severity": ["critical"]}, lambda s: True)
    assert [a["alert_id"] for a in open_.structured_content["alerts"]] == ["al-1"]

    recs = tool_when(broker, token, "inference.recommendations", {}, lambda s: len(s["recommendations"]) == 2)
    listed = recs.structured_content["recommendations"]
    assert [(r["recommendation_id"], r["estimated_monthly_savings_usd"]) for r in listed] == [("rec-1", 1200.5), ("rec-2", 300.0)]
    assert listed[0]["service"] == "anthropic.claude-3-5-sonnet"
    bedrock = tool_when(broker, token, "inference.recommendations", {"provider": "bedrock"}, lambda s: True)
    assert [r["recommendation_id"] for r in bedrock.structured_content["recommendations"]] == ["rec-1"]

    async def bad(session):
        return [
            await session.call_tool("alerts.recent", {"state": ["burning"]}),
            await session.call_tool("alerts.recent", {"limit": 501}),
        ]

    state, limit = run(broker, token, bad)
    assert state.is_error and "burning" in state.content[0].text and "open" in state.content[0].text
    assert limit.is_error and "limit" in limit.content[0].text

    no_scope = broker.token(tenant, scope="alert:read")

    async def refused(session):
        return await session.call_tool("inference.recommendations", {})

    result = run(broker, no_scope, refused)
    assert result.is_error and "ai:read" in result.content[0].text

    other = broker.token(f"py-{uuid.uuid4().hex[:12]}", scope="alert:read ai:read")

    async def elsewhere(session):
        return (
            await session.call_tool("alerts.recent", {}),
            await session.call_tool("inference.recommendations", {}),
        )

    a, r = run(broker, other, elsewhere)
    assert a.structured_content["alerts"] == [] and r.structured_content["recommendations"] == []


FLEET_AND_CONNECTIONS = [
    ("instance.created", {"instance_id": "i-1", "provider": "aws", "region": "us-east-1", "instance_type": "p5.48xlarge", "gpu_type": "H100", "gpu_count": 8, "hourly_cost_usd": 98.32}),
    ("instance.created", {"instance_id": "i-2", "provider": "gcp", "region": "us-central1", "gpu_type": "A100", "gpu_count": 4, "hourly_cost_usd": 14.69}),
    ("instance.created", {"instance_id": "i-3", "provider": "aws", "region": "us-west-2", "gpu_type": "H100", "gpu_count": 8, "hourly_cost_usd": 98.32}),
    ("instance.state_changed", {"instance_id": "i-2", "state": "stopping"}),
    ("instance.stopped", {"instance_id": "i-3"}),
    ("system.connection_synced", {"connection_id": "aws-prod", "provider": "aws", "synced_at": "2026-11-28T10:00:00Z"}),
    ("system.connection_synced", {"connection_id": "bedrock", "provider": "bedrock"}),
    ("system.connection_failed", {"connection_id": "bedrock", "error": "AccessDenied: ce:GetCostAndUsage"}),
    ("system.connection_failed", {"connection_id": "bedrock", "error": "AccessDenied: ce:GetCostAndUsage"}),
]


def test_fleet_and_connection_health_as_they_stand(broker, stub, pb, tenant):
    publish(stub, pb, broker.token(tenant), FLEET_AND_CONNECTIONS)
    token = broker.token(tenant, scope="gpu:read integration:read")
    fleet = tool_when(broker, token, "fleet.list_instances", {}, lambda s: s["matched"] == 3 and s["running"] == 1)
    assert not fleet.is_error, fleet.content
    s = fleet.structured_content
    assert (s["matched"], s["running"], s["running_gpus"], s["running_hourly_cost_usd"]) == (3, 1, 8, 98.32)
    by_id = {i["instance_id"]: i for i in s["instances"]}
    assert by_id["i-1"]["state"] == "running" and by_id["i-1"]["instance_type"] == "p5.48xlarge"
    assert by_id["i-2"]["state"] == "stopping" and by_id["i-2"]["gpu_count"] == 4
    assert by_id["i-3"]["state"] == "stopped"
    # Most recently changed first.
    assert [i["instance_id"] for i in s["instances"]] == ["i-3", "i-2", "i-1"]
    h100 = tool_when(broker, token, "fleet.list_instances", {"gpu_type": "H100", "state": ["running"]}, lambda s: True)
    assert [i["instance_id"] for i in h100.structured_content["instances"]] == ["i-1"]
    one = tool_when(broker, token, "fleet.list_instances", {"limit": 1}, lambda s: True)
    assert len(one.structured_content["instances"]) == 1 and one.structured_content["truncated"] is True

    health = tool_when(broker, token, "connections.health", {}, lambda s: len(s["connections"]) == 2 and s["failing"] == 1 and s["connections"][0]["consecutive_failures"] == 2)
    conns = health.structured_content["connections"]
    assert [c["connection_id"] for c in conns] == ["bedrock", "aws-prod"], conns
    bedrock, aws = conns
    assert bedrock["status"] == "failing" and bedrock["consecutive_failures"] == 2
    assert bedrock["last_error"] == "AccessDenied: ce:GetCostAndUsage"
    assert bedrock["last_sync_at"] is not None
    assert aws["status"] == "ok" and aws["last_sync_at"] == "2026-11-28T10:00:00Z"

    async def refused(session):
        return (
            await session.call_tool("fleet.list_instances", {"limit": 0}),
            await session.call_tool("connections.health", {}),
        )

    limit, scope = run(broker, broker.token(tenant, scope="gpu:read"), refused)
    assert limit.is_error and "limit" in limit.content[0].text
    assert scope.is_error and "integration:read" in scope.content[0].text

    async def elsewhere(session):
        return (
            await session.call_tool("fleet.list_instances", {}),
            await session.call_tool("connections.health", {}),
        )

    f, c = run(broker, broker.token(f"py-{uuid.uuid4().hex[:12]}", scope="gpu:read integration:read"), elsewhere)
    assert f.structured_content["matched"] == 0 and c.structured_content["connections"] == []


# ---- per-tenant settings and the write tool -------------------------------------


def rest(broker, method: str, path: str, token: str | None, body: dict | None = None):
    host, port = broker.http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def test_recommendations_accept_needs_scope_flag_and_grant_and_publishes(broker, stub, pb, tenant):
    from test_grpc_client import Subscriber

    publish(stub, pb, broker.token(tenant), ALERTS_AND_RECOMMENDATIONS)
    admin = broker.token(tenant, scope="settings:read settings:write")
    writer = broker.token(tenant, scope="recommendation:write ai:read events:subscribe")
    tool_when(broker, writer, "inference.recommendations", {}, lambda s: len(s["recommendations"]) == 2)

    status, settings = rest(broker, "GET", "/v1/settings/mcp", admin)
    assert status == 200 and settings == {"enabled": True, "write_tools_enabled": False, "write_grants": []}

    async def accept(session):
        return await session.call_tool("recommendations.accept", {"recommendation_id": "rec-1"})

    refused = run(broker, writer, accept)
    assert refused.is_error and "write_tools_enabled" in refused.content[0].text

    status, _ = rest(broker, "PUT", "/v1/settings/mcp", admin, {"write_tools_enabled": True})
    assert status == 200
    refused = run(broker, writer, accept)
    assert refused.is_error and "write_grants" in refused.content[0].text

    status, saved = rest(broker, "PUT", "/v1/settings/mcp", admin, {"write_tools_enabled": True, "write_grants": ["recommendations.accept"]})
    assert status == 200 and saved["write_grants"] == ["recommendations.accept"]
    no_scope = run(broker, broker.token(tenant, scope="ai:read"), accept)
    assert no_scope.is_error and "recommendation:write" in no_scope.content[0].text

    follower = Subscriber(stub, pb, broker.token(tenant), types=["recommendation.accepted"])
    try:
        follower.status()
        accepted = run(broker, writer, accept)
        assert not accepted.is_error, accepted.content
        event_id = accepted.structured_content["event_id"]
        [seen] = follower.events(1)
        assert seen.id == event_id
        assert json.loads(seen.data)["recommendation_id"] == "rec-1"
    finally:
        follower.call.cancel()
    # The projection follows the event it published: rec-1 is no longer open.
    left = tool_when(broker, writer, "inference.recommendations", {}, lambda s: len(s["recommendations"]) == 1)
    assert [r["recommendation_id"] for r in left.structured_content["recommendations"]] == ["rec-2"]

    async def again_and_unknown(session):
        return (
            await session.call_tool("recommendations.accept", {"recommendation_id": "rec-1"}),
            await session.call_tool("recommendations.accept", {"recommendation_id": "rec-404"}),
        )

    again, unknown = run(broker, writer, again_and_unknown)
    assert again.is_error and "already accepted" in again.content[0].text
    assert unknown.is_error and "rec-404" in unknown.content[0].text


def test_mcp_settings_are_per_tenant_checked_and_can_turn_the_tools_off(broker, tenant):
    admin = broker.token(tenant, scope="settings:read settings:write cost:read")
    status, error = rest(broker, "PUT", "/v1/settings/mcp", admin, {"write_grants": ["policies.delete"]})
    assert status == 400 and "policies.delete" in error["message"]
    status, error = rest(broker, "PUT", "/v1/settings/mcp", admin, {"enable": False})
    assert status == 400 and "enable" in error["message"]
    status, error = rest(broker, "PUT", "/v1/settings/mcp", broker.token(tenant, scope="settings:read"), {})
    assert status == 403 and "settings:write" in error["message"]
    status, _ = rest(broker, "GET", "/v1/settings/mcp", None)
    assert status == 401

    status, _ = rest(broker, "PUT", "/v1/settings/mcp", admin, {"enabled": False})
    assert status == 200

    async def call(session):
        return await session.call_tool("cost.summary", {})

    off = run(broker, admin, call)
    assert off.is_error and "disabled" in off.content[0].text
    # Another tenant's tools and settings are untouched.
    other = broker.token(f"py-{uuid.uuid4().hex[:12]}", scope="settings:read cost:read")
    assert not run(broker, other, call).is_error
    status, theirs = rest(broker, "GET", "/v1/settings/mcp", other)
    assert status == 200 and theirs["enabled"] is True

    status, _ = rest(broker, "PUT", "/v1/settings/mcp", admin, {"enabled": True})
    assert not run(broker, admin, call).is_error


AGENT_AND_SPIKE_EXAMPLES = [
    ("cost.threshold_exceeded", {"budget_id": "b-ml", "budget_name": "ML monthly", "threshold_usd": 10000, "current_usd": 10250.4, "source": "bedrock"}),
    ("inference.spike_detected", {"spike_id": "sp-42", "provider": "bedrock", "model": "claude", "increase_pct": 340}),
    ("agent.connected", {"agent_id": "gpu-agent-7", "transport": "grpc", "stream": "subscribe", "instance": "0196f1c2-0000-7000-8000-000000000001"}),
    ("agent.disconnected", {"agent_id": "gpu-agent-7", "reason": "closed", "connected_at": "2026-11-29T14:02:11.120Z", "connected_s": 3605, "instance": "0196f1c2-0000-7000-8000-000000000001"}),
    ("agent.error", {"agent_id": "gpu-agent-7", "error": "CUDA out of memory"}),
    ("agent.health_check", {"agent_id": "gpu-agent-7", "status": "healthy", "latency_ms": 12}),
]


def test_the_agent_and_spike_examples_follow_their_schemas():
    for event_type, data in AGENT_AND_SPIKE_EXAMPLES:
        schema = json.loads((SCHEMAS / f"{event_type}.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"agent_id": "a", "reason": "bored"}, json.loads((SCHEMAS / "agent.disconnected.json").read_text()))


def test_an_inference_spike_and_a_threshold_are_open_alerts_of_their_own(broker, stub, pb, tenant):
    publisher = broker.token(tenant)
    publish(stub, pb, publisher, [
        ("alert.created", {"alert_id": "sp-42", "severity": "low", "title": "a budget"}),
        AGENT_AND_SPIKE_EXAMPLES[1],
        AGENT_AND_SPIKE_EXAMPLES[0],
    ])
    reader = broker.token(tenant, scope="alert:read")
    answer = tool_when(broker, reader, "alerts.recent", {}, lambda s: len(s["alerts"]) >= 3)
    by_id = {a["alert_id"]: a for a in answer.structured_content["alerts"]}
    assert set(by_id) == {"sp-42", "spike:sp-42", "budget:b-ml"}, by_id
    budget = by_id["budget:b-ml"]
    assert (budget["state"], budget["severity"], budget["source"], budget["resource"]) == ("open", "high", "bedrock", "b-ml")
    assert budget["title"] == "cost threshold exceeded: ML monthly at 10250.40 of 10000.00 USD"
    spike = by_id["spike:sp-42"]
    assert (spike["state"], spike["severity"], spike["source"], spike["resource"]) == ("open", "medium", "bedrock", "claude")
    assert spike["title"] == "inference spend spike: bedrock claude up 340%"
    # alert.created cannot take a derived alert's id; alert.resolved closes one.
    publish(stub, pb, publisher, [
        ("alert.created", {"alert_id": "spike:sp-42", "severity": "info", "title": "impostor"}),
        ("alert.resolved", {"alert_id": "spike:sp-42"}),
    ])
    answer = tool_when(broker, reader, "alerts.recent", {}, lambda s: any(a["state"] == "resolved" for a in s["alerts"]))
    by_id = {a["alert_id"]: a for a in answer.structured_content["alerts"]}
    assert (by_id["spike:sp-42"]["state"], by_id["spike:sp-42"]["title"]) == ("resolved", spike["title"])


def cli(args: list[str], token: str, broker) -> subprocess.CompletedProcess:
    from conftest import _env, binary_path

    return subprocess.run(
        [str(binary_path()), *args],
        env={**_env(), "TC_TOKEN": token, "TC_HTTP_SERVER": f"http://{broker.http_addr}"},
        capture_output=True,
        text=True,
        timeout=RPC_TIMEOUT_S,
    )


def test_the_cli_reads_and_changes_a_tenants_mcp_settings(broker, tenant):
    writer = broker.token(tenant, scope="settings:read settings:write")
    shown = cli(["settings", "mcp"], writer, broker)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"enabled": True, "write_tools_enabled": False, "write_grants": []}
    changed = cli(
        ["settings", "mcp", "--write-tools-enabled", "true", "--grant", "recommendations.accept"], writer, broker
    )
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout) == {
        "enabled": True,
        "write_tools_enabled": True,
        "write_grants": ["recommendations.accept"],
    }
    # Kept: REST reads what the CLI wrote; another tenant is untouched.
    status, body = rest(broker, "GET", "/v1/settings/mcp", writer)
    assert status == 200 and body["write_grants"] == ["recommendations.accept"], body
    other = broker.token(f"other-{tenant}", scope="settings:read")
    assert json.loads(cli(["settings", "mcp"], other, broker).stdout)["write_grants"] == []
    revoked = cli(["settings", "mcp", "--revoke", "recommendations.accept"], writer, broker)
    assert json.loads(revoked.stdout)["write_grants"] == []
    # Refusals are the broker's, named; nothing on standard output.
    bad = cli(["settings", "mcp", "--grant", "no.such_tool"], writer, broker)
    assert bad.returncode != 0 and "no.such_tool" in bad.stderr, bad.stderr
    reader = broker.token(tenant, scope="settings:read")
    denied = cli(["settings", "mcp", "--enabled", "false"], reader, broker)
    assert denied.returncode != 0 and "settings:write" in denied.stderr, denied.stderr
    assert denied.stdout == ""


def metric(broker, name: str) -> float:
    host, port = broker.http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT_S)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name} in /metrics")


def test_an_unreadable_cost_event_is_counted_and_left_out(broker, stub, pb, tenant):
    before = metric(broker, "tc_projection_unreadable_events_total")
    publish(stub, pb, broker.token(tenant), [("cost.updated", {"source": "aws"}), COSTS[2]])
    reader = broker.token(tenant, scope="cost:read")
    answer = cost_summary_when(broker, reader, {"window": "30d"}, lambda s: s["events"] >= 1)
    # The event without amount_usd was accepted and delivered, but is not in the figures.
    assert answer.structured_content["events"] == 1
    deadline = time.monotonic() + 10
    while metric(broker, "tc_projection_unreadable_events_total") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(broker, "tc_projection_unreadable_events_total") >= before + 1


def test_a_host_not_allowed_and_a_token_without_a_tenant_are_refused(broker, tenant):
    token = broker.token(tenant, scope="cost:read")
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}", "Host": "rebind.example"}
    status, _, body = raw_post(broker, INITIALIZE, headers)
    assert status == 403, (status, body)
    assert b"host" in body.lower(), body

    from conftest import _env, binary_path

    proc = subprocess.run(
        [str(binary_path()), "token", "--scope", "events:all_tenants cost:read"],
        env=_env(), capture_output=True, text=True, timeout=RPC_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    everyone = proc.stdout.strip()

    async def refused(session):
        return await session.call_tool("cost.summary", {})

    result = run(broker, everyone, refused)
    assert result.is_error
    assert "tenant" in result.content[0].text, result.content[0].text


def test_a_full_projection_queue_drops_from_the_figures_only(tmp_path):
    import grpc as grpc_mod

    from conftest import start_broker
    from tensorcost.events.v1 import events_pb2 as pb2
    from tensorcost.events.v1 import events_pb2_grpc

    with start_broker(tmp_path, {"TC_PROJECTION_QUEUE": "1"}) as b:
        channel = grpc_mod.insecure_channel(b.grpc_addr)
        stub2 = events_pb2_grpc.EventBrokerStub(channel)
        tenant = f"py-{uuid.uuid4().hex[:12]}"
        token = b.token(tenant)
        ids = []
        for _ in range(20):
            ids += publish(stub2, pb2, token, [COSTS[3]] * 250)
        assert len(set(ids)) == 5000, "every event was accepted"
        deadline = time.monotonic() + 10
        while metric(b, "tc_projection_dropped_events_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        dropped = metric(b, "tc_projection_dropped_events_total")
        assert dropped > 0, "a queue of 1 kept up with 5,000 events in 20 calls"
        reader = b.token(tenant, scope="cost:read")
        figures = cost_summary_when(b, reader, {"window": "30d"}, lambda s: True).structured_content
        assert 0 < figures["events"] < 5000, figures
        # Subscribers still get every event: history holds them all.
        status, body = rest(b, "GET", "/v1/events?limit=1000", token)
        assert status == 200 and len(body["events"]) == 1000, body
        assert "projection" in b.log() and "full" in b.log().lower()
        channel.close()


def test_a_projection_queue_of_zero_is_refused_naming_it(tmp_path):
    from conftest import _env, binary_path

    proc = subprocess.run(
        [str(binary_path()), "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        env={**_env(), "TC_PROJECTION_QUEUE": "0", "TC_DATA_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=RPC_TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "projection-queue" in proc.stderr or "TC_PROJECTION_QUEUE" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr


def test_a_tenants_cost_entries_stop_at_tc_cost_max_entries(tmp_path):
    import grpc as grpc_mod

    from conftest import start_broker
    from tensorcost.events.v1 import events_pb2 as pb2
    from tensorcost.events.v1 import events_pb2_grpc

    with start_broker(tmp_path, {"TC_COST_MAX_ENTRIES": "3"}) as b:
        channel = grpc_mod.insecure_channel(b.grpc_addr)
        stub2 = events_pb2_grpc.EventBrokerStub(channel)
        tenant = f"py-{uuid.uuid4().hex[:12]}"
        at = hours_ago(1)
        publish(stub2, pb2, b.token(tenant), [
            ("cost.updated", {"source": f"s{i}", "amount_usd": 1 + i, "period_start": at}) for i in range(5)
        ])
        reader = b.token(tenant, scope="cost:read")
        answer = cost_summary_when(b, reader, {}, lambda s: s["events"] >= 5)
        s = answer.structured_content
        assert s["total_usd"] == 15.0, "every cent is counted, named or not"
        assert s["folded_into_other"] is True
        assert {x["source"]: x["usd"] for x in s["by_source"]} == {"s0": 1.0, "s1": 2.0, "s2": 3.0, "(other)": 9.0}
        channel.close()
