"""The MCP server at /mcp, driven by the official Python `mcp` SDK over
Streamable HTTP against the real binary: tools and their schemas, the
bearer token on every request, scopes, tenant isolation, and malformed or
oversized requests."""

from __future__ import annotations

import http.client
import json
import uuid

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from conftest import RPC_TIMEOUT_S, auth


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
