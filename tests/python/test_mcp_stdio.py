"""MCP beyond single HTTP calls, with the official Python `mcp` SDK against
the real binary: `tensorcost-events mcp` over stdio (relaying to a running
broker, and running its own broker in-process), the events:// resources and
their notifications (subscriptions/listen at 2026-07-28 over HTTP;
resources/subscribe at 2025-11-25 over stdio), and the protocol revisions
/mcp serves."""

from __future__ import annotations

import json
import os
import time
import uuid

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import SubscriptionLost, listen
from mcp.shared.exceptions import MCPError

from conftest import JWT_SECRET, RPC_TIMEOUT_S, _env, binary_path
from test_mcp import INITIALIZE, MCP_HEADERS, cost_events, mcp_url, metric, publish, raw_post

WAIT_S = 10.0
# resources/subscribe is the previous revisions' way, tested on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed")


def stdio_params(env: dict[str, str]) -> StdioServerParameters:
    base = _env()
    base.pop("TC_JWT_SECRET", None)
    return StdioServerParameters(command=str(binary_path()), args=["mcp"], env={**base, **env})


async def call_until(session, name: str, args: dict, ready):
    """`name(args)`, asked again until `ready(structured)`: projections
    apply events a moment after they are accepted."""
    deadline = anyio.current_time() + WAIT_S
    while True:
        result = await session.call_tool(name, args)
        if result.is_error or ready(result.structured_content) or anyio.current_time() > deadline:
            return result
        await anyio.sleep(0.05)


def test_stdio_relay_serves_the_tools_of_a_running_broker(broker, stub, pb, tenant, tmp_path):
    publish(stub, pb, broker.token(tenant), cost_events([2, 5, 20, 24 * 10]))
    reader = broker.token(tenant, scope="cost:read")
    errlog = open(tmp_path / "relay.log", "w")

    async def body():
        params = stdio_params({"TC_SERVER": f"http://{broker.http_addr}", "TC_TOKEN": reader})
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.server_info.name == "tensorcost-events"
                tools = {t.name for t in (await session.list_tools()).tools}
                assert {"cost.summary", "inference.recommendations", "events.recent"} <= tools
                week = await call_until(session, "cost.summary", {}, lambda s: s["total_usd"] >= 22.875)
                assert not week.is_error, week.content
                assert week.structured_content["total_usd"] == 22.875
                assert [a["source"] for a in week.structured_content["by_source"]] == ["bedrock", "aws"]
                # The token's scopes travel with every relayed call.
                refused = await session.call_tool("alerts.recent", {})
                assert refused.is_error
                assert "alert:read" in refused.content[0].text
                # An unknown tool is still the broker's protocol error.
                with pytest.raises(MCPError):
                    await session.call_tool("no.such_tool", {})

    anyio.run(body)


def test_stdio_relay_speaks_the_current_revision_and_relays_a_listen_stream(broker, stub, pb, tenant, tmp_path):
    reader = broker.token(tenant, scope="cost:read events:subscribe")
    publisher = broker.token(tenant, scope="events:publish")
    errlog = open(tmp_path / "relay.log", "w")

    async def body():
        params = stdio_params({"TC_SERVER": f"http://{broker.http_addr}/mcp/", "TC_TOKEN": reader})
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=WAIT_S) as session:
                await session.discover()
                assert session.protocol_version == "2026-07-28"
                summary = await session.call_tool("cost.summary", {})
                assert not summary.is_error, summary.content
                async with listen(session, resource_subscriptions=["events://cost.*"]) as sub:
                    with anyio.fail_after(WAIT_S):
                        assert (await sub.__anext__()).uri == "events://cost.*", "following started"
                    publish(stub, pb, publisher, [("cost.updated", {"source": "aws", "amount_usd": 2})])
                    with anyio.fail_after(WAIT_S):
                        update = await sub.__anext__()
                    assert update.uri == "events://cost.*"
                read_back = await session.read_resource("events://cost.*")
                assert [e["data"]["amount_usd"] for e in json.loads(read_back.contents[0].text)["events"]] == [2]

    anyio.run(body)


def test_stdio_relay_says_why_a_broker_refuses_or_cannot_be_reached(broker, tmp_path):
    errlog = open(tmp_path / "relay.log", "w")

    async def attempt(env):
        async with stdio_client(stdio_params(env), errlog=errlog) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=WAIT_S) as session:
                with pytest.raises(MCPError) as refused:
                    await session.initialize()
                return str(refused.value)

    bad_token = anyio.run(attempt, {"TC_SERVER": f"http://{broker.http_addr}", "TC_TOKEN": "not-a-token"})
    assert "401" in bad_token, bad_token
    assert "not-a-token" not in bad_token
    unreachable = anyio.run(attempt, {"TC_SERVER": "http://127.0.0.1:9", "TC_TOKEN": "x"})
    assert "cannot reach the broker" in unreachable, unreachable


def test_stdio_without_a_token_or_with_a_bad_server_exits_naming_it():
    import subprocess

    for env, expected in [
        ({"TC_SERVER": "http://127.0.0.1:9"}, "TC_TOKEN"),
        ({"TC_SERVER": "127.0.0.1:8080", "TC_TOKEN": "x"}, "TC_SERVER"),
    ]:
        proc = subprocess.run(
            [str(binary_path()), "mcp"],
            env={**_env(), **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RPC_TIMEOUT_S,
        )
        assert proc.returncode != 0
        assert expected in proc.stderr, proc.stderr
        assert proc.stdout == "", "standard output is for MCP messages only"


def token_for(tenant: str, scope: str) -> str:
    import subprocess

    proc = subprocess.run(
        [str(binary_path()), "token", "--tenant", tenant, "--scope", scope, "--ttl", "10m"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RPC_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_stdio_in_process_runs_a_broker_and_notifies_subscribed_resources(tmp_path):
    import grpc

    from tensorcost.events.v1 import events_pb2 as pb
    from tensorcost.events.v1 import events_pb2_grpc

    tenant = f"py-{uuid.uuid4().hex[:12]}"
    ready = tmp_path / "ready.json"
    reader = token_for(tenant, "cost:read events:subscribe")
    publisher = token_for(tenant, "events:publish")
    other = token_for(f"other-{tenant}", "events:publish")
    env = {
        "TC_JWT_SECRET": JWT_SECRET,
        "TC_TOKEN": reader,
        "TC_GRPC_ADDR": "127.0.0.1:0",
        "TC_HTTP_ADDR": "127.0.0.1:0",
        "TC_READY_FILE": str(ready),
        "TC_DATA_DIR": str(tmp_path / "data"),
    }
    errlog = open(tmp_path / "in-process.log", "w")
    updates: list[str] = []

    async def on_message(message):
        params = getattr(getattr(message, "params", None), "uri", None)
        if params is not None and getattr(message, "method", "") == "notifications/resources/updated":
            updates.append(params)

    async def wait_for(predicate):
        deadline = anyio.current_time() + WAIT_S
        while not predicate() and anyio.current_time() < deadline:
            await anyio.sleep(0.05)
        return predicate()

    async def body():
        async with stdio_client(stdio_params(env), errlog=errlog) as (read, write):
            async with ClientSession(read, write, message_handler=on_message) as session:
                await session.initialize()
                addrs = json.loads(ready.read_text())
                channel = grpc.insecure_channel(addrs["grpc"])
                stub = events_pb2_grpc.EventBrokerStub(channel)
                publish(stub, pb, publisher, cost_events([2, 5, 20, 24 * 10]))
                week = await call_until(session, "cost.summary", {}, lambda s: s["total_usd"] >= 22.875)
                assert not week.is_error, week.content
                assert week.structured_content["total_usd"] == 22.875

                read_back = await session.read_resource("events://cost.*")
                held = json.loads(read_back.contents[0].text)["events"]
                assert [e["type"] for e in held] == ["cost.updated"] * 4
                assert {e["tenant_id"] for e in held} == {tenant}

                await session.subscribe_resource("events://alert.*")
                # Another tenant's alert and this tenant's cost: no update.
                publish(stub, pb, other, [("alert.created", {"alert_id": "x", "severity": "high"})])
                publish(stub, pb, publisher, [("cost.updated", {"source": "aws", "amount_usd": 1})])
                await anyio.sleep(0.5)
                assert updates == [], "an event the subscription does not match was notified"
                publish(stub, pb, publisher, [("alert.created", {"alert_id": "a1", "severity": "high"})])
                assert await wait_for(lambda: updates), "no notification for a matching event"
                assert updates[0] == "events://alert.*"
                await session.unsubscribe_resource("events://alert.*")
                seen = len(updates)
                publish(stub, pb, publisher, [("alert.created", {"alert_id": "a2", "severity": "low"})])
                await anyio.sleep(0.5)
                assert len(updates) == seen, "notified after unsubscribing"
                with pytest.raises(MCPError) as bad:
                    await session.subscribe_resource("file:///etc/passwd")
                assert "events://" in str(bad.value)
                channel.close()

    anyio.run(body)
    log = (tmp_path / "in-process.log").read_text()
    assert "MCP on standard input and output" in log


def test_stdio_in_process_refuses_a_token_it_cannot_verify(tmp_path):
    import subprocess

    env = {
        **_env(),
        "TC_TOKEN": token_for("t1", "cost:read"),
        "TC_GRPC_ADDR": "127.0.0.1:0",
        "TC_HTTP_ADDR": "127.0.0.1:0",
        "TC_DATA_DIR": str(tmp_path / "data"),
    }
    env.pop("TC_JWT_SECRET")
    proc = subprocess.run(
        [str(binary_path()), "mcp"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RPC_TIMEOUT_S * 2,
    )
    assert proc.returncode != 0
    assert "TC_TOKEN refused" in proc.stderr and "TC_JWT_SECRET" in proc.stderr, proc.stderr
    assert proc.stdout == ""


async def _modern(broker, token: str, body):
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=RPC_TIMEOUT_S) as client:
        async with streamable_http_client(mcp_url(broker), http_client=client) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=WAIT_S) as session:
                await session.discover()
                return await body(session)


def test_listen_over_http_notifies_matching_events_of_the_tenant_only(broker, stub, pb, tenant):
    reader = broker.token(tenant, scope="events:subscribe")
    publisher = broker.token(tenant, scope="events:publish")
    other = broker.token(f"other-{tenant}", scope="events:publish")

    async def body(session):
        assert session.protocol_version == "2026-07-28"
        uris = ["events://cost.*", "events://alert.created", "nope://x"]
        async with listen(session, resource_subscriptions=uris) as sub:
            assert set(sub.honored.resource_subscriptions) == {"events://cost.*", "events://alert.created"}
            # Once per URI as following starts: read it now.
            with anyio.fail_after(WAIT_S):
                started = {(await sub.__anext__()).uri, (await sub.__anext__()).uri}
            assert started == {"events://cost.*", "events://alert.created"}
            publish(stub, pb, other, [("alert.created", {"alert_id": "x", "severity": "high"})])
            publish(stub, pb, publisher, [("cost.updated", {"source": "aws", "amount_usd": 1})])
            with anyio.fail_after(WAIT_S):
                first = await sub.__anext__()
            assert first.uri == "events://cost.*", first
            publish(stub, pb, publisher, [("alert.created", {"alert_id": "a", "severity": "low"})])
            with anyio.fail_after(WAIT_S):
                second = await sub.__anext__()
            assert second.uri == "events://alert.created", second
        read = await session.read_resource("events://alert.created")
        held = json.loads(read.contents[0].text)["events"]
        assert [(e["tenant_id"], e["data"]["alert_id"]) for e in held] == [(tenant, "a")]
        return True

    assert anyio.run(_modern, broker, reader, body)


def test_resources_need_events_subscribe_and_a_session_for_resources_subscribe(broker, tenant):
    no_scope = broker.token(tenant, scope="cost:read")

    async def refused(session):
        with pytest.raises(MCPError) as read:
            await session.read_resource("events://cost.*")
        assert "events:subscribe" in str(read.value)
        # rmcp acknowledges a listen before the server sees who asks: the
        # refusal ends the stream, with the error naming the scope.
        with pytest.raises(SubscriptionLost) as listened:
            async with listen(session, resource_subscriptions=["events://cost.*"]) as sub:
                with anyio.fail_after(WAIT_S):
                    await sub.__anext__()
        assert "events:subscribe" in str(listened.value.__cause__)
        # A listen with no event URI at all is refused, naming the form.
        with pytest.raises(SubscriptionLost) as empty:
            async with listen(session, resource_subscriptions=["nope://x"]) as sub:
                with anyio.fail_after(WAIT_S):
                    await sub.__anext__()
        assert "events://{pattern}" in str(empty.value.__cause__)
        templates = await session.list_resource_templates()
        assert [t.uri_template for t in templates.resource_templates] == ["events://{pattern}"]
        return True

    assert anyio.run(_modern, broker, no_scope, refused)

    async def legacy(session):
        with pytest.raises(MCPError) as subscribed:
            await session.subscribe_resource("events://cost.*")
        assert "subscriptions/listen" in str(subscribed.value)
        return True

    from test_mcp import run

    assert run(broker, broker.token(tenant), legacy)


@pytest.mark.parametrize("revision", ["2025-11-25", "2025-06-18", "2025-03-26"])
def test_mcp_serves_the_current_and_previous_protocol_revisions(broker, tenant, revision):
    token = broker.token(tenant, scope="events:subscribe")
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    initialize = json.loads(INITIALIZE)
    initialize["params"]["protocolVersion"] = revision
    status, _, body = raw_post(broker, json.dumps(initialize).encode(), headers)
    assert status == 200, body
    assert json.loads(body)["result"]["protocolVersion"] == revision
    listed = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    status, _, body = raw_post(
        broker, json.dumps(listed).encode(), {**headers, "MCP-Protocol-Version": revision}
    )
    assert status == 200, body
    assert "cost.summary" in {t["name"] for t in json.loads(body)["result"]["tools"]}


def test_the_sdk_negotiates_the_current_revision_and_the_handshake_one(broker, tenant):
    token = broker.token(tenant, scope="events:subscribe")

    async def modern(session):
        result = await session.call_tool("events.recent", {"limit": 1})
        assert not result.is_error, result.content
        return session.protocol_version

    assert anyio.run(_modern, broker, token, modern) == "2026-07-28"

    async def legacy(session):
        return session.protocol_version

    from test_mcp import run

    assert run(broker, token, legacy) == "2025-11-25"


def test_what_drove_last_weeks_bedrock_bill_over_stdio(broker, stub, pb, tenant, tmp_path):
    """The issue's end: an MCP client over stdio answers "what drove last
    week's Bedrock bill?" from cost.summary and inference.recommendations,
    with what producers published."""
    from test_mcp import hours_ago

    sonnet, haiku = "anthropic.claude-3-5-sonnet", "anthropic.claude-3-haiku"
    publish(stub, pb, broker.token(tenant), [
        ("cost.updated", {"source": "bedrock", "service": sonnet, "amount_usd": 310.5, "period_start": hours_ago(30), "tags": {"team": "support-bot"}}),
        ("cost.updated", {"source": "bedrock", "service": sonnet, "amount_usd": 89.5, "period_start": hours_ago(50), "tags": {"team": "search"}}),
        ("cost.updated", {"source": "bedrock", "service": haiku, "amount_usd": 12.0, "period_start": hours_ago(70)}),
        ("cost.updated", {"source": "aws", "service": "EC2", "amount_usd": 55.0, "period_start": hours_ago(20)}),
        ("recommendation.created", {"recommendation_id": "r-pt", "category": "inference", "provider": "bedrock", "service": sonnet,
                                    "title": "Provisioned throughput for claude-3-5-sonnet", "estimated_monthly_savings_usd": 420.0}),
    ])
    reader = broker.token(tenant, scope="cost:read ai:read")
    errlog = open(tmp_path / "relay.log", "w")

    async def body():
        params = stdio_params({"TC_SERVER": f"http://{broker.http_addr}", "TC_TOKEN": reader})
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                bill = await call_until(session, "cost.summary", {"source": "bedrock"}, lambda s: s["total_usd"] >= 412)
                recs = await call_until(session, "inference.recommendations", {"provider": "bedrock"}, lambda s: s["recommendations"])
                return bill, recs

    bill, recs = anyio.run(body)
    s = bill.structured_content
    assert s["total_usd"] == 412.0
    assert [(x["service"], x["usd"]) for x in s["by_service"]] == [(sonnet, 400.0), (haiku, 12.0)]
    assert f"bedrock {sonnet} 400.00" in bill.content[0].text
    [rec] = recs.structured_content["recommendations"]
    assert (rec["recommendation_id"], rec["estimated_monthly_savings_usd"]) == ("r-pt", 420.0)


def test_followers_count_against_the_tenants_subscriber_cap(tmp_path):
    """Abuse: listens are broker subscriptions, so a tenant cannot open more
    than TC_MAX_SUBSCRIBERS_PER_TENANT of them (gRPC included); the one past
    the cap ends naming it, and another tenant still follows."""
    import grpc

    from conftest import start_broker
    from tensorcost.events.v1 import events_pb2 as pb2
    from tensorcost.events.v1 import events_pb2_grpc

    with start_broker(tmp_path, {"TC_MAX_SUBSCRIBERS_PER_TENANT": "2"}) as b:
        tenant = f"py-{uuid.uuid4().hex[:12]}"
        token = b.token(tenant, scope="events:subscribe")
        other_tenant = f"other-{tenant}"
        other = b.token(other_tenant, scope="events:subscribe")
        publisher = b.token(other_tenant, scope="events:publish")
        channel = grpc.insecure_channel(b.grpc_addr)
        stub2 = events_pb2_grpc.EventBrokerStub(channel)

        async def others(session):
            async with listen(session, resource_subscriptions=["events://*"]) as sub:
                with anyio.fail_after(WAIT_S):
                    await sub.__anext__()  # following started
                publish(stub2, pb2, publisher, [("cost.updated", {"source": "aws", "amount_usd": 1})])
                with anyio.fail_after(WAIT_S):
                    return (await sub.__anext__()).uri

        async def body(session):
            async with listen(session, resource_subscriptions=["events://cost.*"]):
                async with listen(session, resource_subscriptions=["events://alert.*"]):
                    with pytest.raises(SubscriptionLost) as third:
                        async with listen(session, resource_subscriptions=["events://*"]) as sub:
                            with anyio.fail_after(WAIT_S):
                                await sub.__anext__()
                    cause = str(third.value.__cause__)
                    assert "TC_MAX_SUBSCRIBERS_PER_TENANT" in cause, cause
                    return await _modern(b, other, others)

        assert anyio.run(_modern, b, token, body) == "events://*"
        channel.close()


def test_stdio_relay_serves_resources_subscribe_of_earlier_revisions(broker, stub, pb, tenant, tmp_path):
    """Claude Desktop's path: the relay at 2025-11-25 follows a resource
    with a listen of its own, per URI, and passes updates on."""
    reader = broker.token(tenant, scope="events:subscribe")
    publisher = broker.token(tenant, scope="events:publish")
    other = broker.token(f"other-{tenant}", scope="events:publish")
    no_scope = broker.token(tenant, scope="cost:read")
    errlog = open(tmp_path / "relay.log", "w")
    updates: list[str] = []

    async def on_message(message):
        if getattr(message, "method", "") == "notifications/resources/updated":
            updates.append(message.params.uri)

    async def settle(n):
        deadline = anyio.current_time() + WAIT_S
        while len(updates) < n and anyio.current_time() < deadline:
            await anyio.sleep(0.05)
        return len(updates) >= n

    async def body(token):
        params = stdio_params({"TC_SERVER": f"http://{broker.http_addr}", "TC_TOKEN": token})
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write, message_handler=on_message, read_timeout_seconds=WAIT_S) as session:
                init = await session.initialize()
                assert init.protocol_version == "2025-11-25"
                base = metric(broker, "tc_subscribers")
                await session.subscribe_resource("events://alert.*")
                # Answered once the broker follows: its "read it now".
                assert await settle(1) and updates == ["events://alert.*"]
                assert metric(broker, "tc_subscribers") == base + 1, "one broker subscription per URI"
                publish(stub, pb, other, [("alert.created", {"alert_id": "x", "severity": "high"})])
                publish(stub, pb, publisher, [("cost.updated", {"source": "aws", "amount_usd": 1})])
                await anyio.sleep(0.5)
                assert updates == ["events://alert.*"], "notified for another tenant or another type"
                publish(stub, pb, publisher, [("alert.created", {"alert_id": "a", "severity": "low"})])
                assert await settle(2), "no update through the relay"
                await session.unsubscribe_resource("events://alert.*")
                # Unsubscribing ends the relay's listen at the broker, with
                # no event needed to notice.
                deadline = anyio.current_time() + WAIT_S
                while metric(broker, "tc_subscribers") != base and anyio.current_time() < deadline:
                    await anyio.sleep(0.05)
                assert metric(broker, "tc_subscribers") == base, "the relay's listen outlived the unsubscribe"
                publish(stub, pb, publisher, [("alert.created", {"alert_id": "b", "severity": "low"})])
                await anyio.sleep(0.5)
                assert len(updates) == 2, "notified after unsubscribing"

    anyio.run(body, reader)

    async def refused():
        params = stdio_params({"TC_SERVER": f"http://{broker.http_addr}", "TC_TOKEN": no_scope})
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=WAIT_S) as session:
                await session.initialize()
                with pytest.raises(MCPError) as e:
                    await session.subscribe_resource("events://alert.*")
                return str(e.value)

    assert "events:subscribe" in anyio.run(refused)


def test_stdio_relay_answers_bad_lines_and_keeps_going(broker, tenant):
    """Abuse of the relay's input: an over-long line and a line that is not
    JSON are answered with errors naming them, and the relay goes on."""
    import select
    import subprocess

    token = broker.token(tenant, scope="cost:read")
    proc = subprocess.Popen(
        [str(binary_path()), "mcp"],
        env={**_env(), "TC_SERVER": f"http://{broker.http_addr}", "TC_TOKEN": token},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )

    def send(line: bytes):
        proc.stdin.write(line + b"\n")
        proc.stdin.flush()

    def answer():
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
        assert ready, "no answer from the relay"
        return json.loads(proc.stdout.readline())

    try:
        send(json.dumps(json.loads(INITIALIZE)).encode())
        assert answer()["result"]["protocolVersion"] == "2025-06-18"
        send(b'{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"pad":"' + b"x" * 300_000 + b'"}}')
        too_long = answer()
        assert too_long["error"]["code"] == -32600 and "262144 bytes" in too_long["error"]["message"], too_long
        send(b"this is not json")
        assert answer()["error"]["code"] == -32700
        send(b'{"jsonrpc":"2.0","id":3,"method":"tools/list"}')
        listed = answer()
        assert listed["id"] == 3
        tools = {t["name"]: t for t in listed["result"]["tools"]}
        assert set(tools) == {
            "events.recent",
            "cost.summary",
            "workload.cost",
            "agent.cost",
            "alerts.recent",
            "inference.recommendations",
            "fleet.list_instances",
            "recommendations.accept",
            "policies.simulate",
            "policies.create",
            "connections.health",
        }
        for name, tool in tools.items():
            assert tool["inputSchema"]["type"] == "object", name
            assert tool["outputSchema"]["type"] == "object", name
            assert "Scope: " in tool["description"], name
    finally:
        proc.stdin.close()
        proc.wait(timeout=RPC_TIMEOUT_S)
    assert proc.returncode == 0


def hs256(claims: dict) -> str:
    """A token signed here with the suite's secret (any claims, any exp)."""
    import base64
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(JWT_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_stdio_in_process_bounds_subscriptions_and_refuses_an_expired_token(tmp_path):
    tenant = f"py-{uuid.uuid4().hex[:12]}"
    # Valid at start for about 12 s: exp 18 s ago, within the 30 s leeway.
    exp = int(time.time()) - 18
    expiring = hs256({"tenantId": tenant, "scope": "events:subscribe", "exp": exp})
    env = {
        "TC_JWT_SECRET": JWT_SECRET,
        "TC_TOKEN": expiring,
        "TC_GRPC_ADDR": "127.0.0.1:0",
        "TC_HTTP_ADDR": "127.0.0.1:0",
        "TC_DATA_DIR": str(tmp_path / "data"),
    }
    errlog = open(tmp_path / "in-process.log", "w")

    async def body():
        async with stdio_client(stdio_params(env), errlog=errlog) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=WAIT_S) as session:
                await session.initialize()
                for i in range(16):
                    await session.subscribe_resource(f"events://kind{i}.*")
                # Again to one already followed: nothing changes.
                await session.subscribe_resource("events://kind0.*")
                with pytest.raises(MCPError) as seventeenth:
                    await session.subscribe_resource("events://kind16.*")
                assert "16" in str(seventeenth.value) and "limit" in str(seventeenth.value)
                # Past exp and the leeway, every call is refused.
                await anyio.sleep(max(0.0, expiring_at - time.time()) + 0.5)
                with pytest.raises(MCPError) as expired:
                    await session.call_tool("events.recent", {})
                return str(expired.value)

    expiring_at = exp + 30 + 1
    assert "TC_TOKEN has expired" in anyio.run(body)
