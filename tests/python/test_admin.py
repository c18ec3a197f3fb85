"""The admin API against the real binary (no Redis): per-tenant rate-limit
overrides kept in the embedded store across a restart, memberships written
to TC_MEMBERSHIPS_FILE, the CLI's `admin` commands, and who may call it:
scope `admin` on an all-tenants backend token only."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import RPC_TIMEOUT_S, _env, binary_path, start_broker


def call(broker, method: str, path: str, token: str | None, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://{broker.http_addr}{path}", data=data, method=method)
    if token is not None:
        request.add_header("authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S) as response:
            text = response.read()
            return response.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def admin_token(broker) -> str:
    proc = subprocess.run(
        [str(binary_path()), "token", "--scope", "admin events:all_tenants", "--ttl", "10m"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RPC_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def cli(broker, token: str, *args: str):
    env = {**_env(), "TC_HTTP_SERVER": f"http://{broker.http_addr}", "TC_TOKEN": token}
    return subprocess.run(
        [str(binary_path()), "admin", *args], env=env, capture_output=True, text=True, timeout=RPC_TIMEOUT_S
    )


def test_rate_limit_overrides_are_kept_and_survive_a_restart(tmp_path):
    env = {"TC_RATE_LIMIT_PER_TENANT": "100", "TC_RATE_LIMIT_OVERRIDES": "tenant-set=300"}
    with start_broker(tmp_path, env) as broker:
        token = admin_token(broker)
        path = "/v1/admin/tenants/tenant-a/rate-limit"
        assert call(broker, "GET", path, token) == (
            200,
            {"tenant": "tenant-a", "events_per_second": 100, "source": "default"},
        )
        assert call(broker, "GET", "/v1/admin/tenants/tenant-set/rate-limit", token)[1]["source"] == "setting"
        status, body = call(broker, "PUT", path, token, {"events_per_second": 5000})
        assert (status, body) == (200, {"tenant": "tenant-a", "events_per_second": 5000, "source": "override"})
        # The CLI, same door.
        out = cli(broker, token, "rate-limit", "set", "tenant-b", "2500")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["events_per_second"] == 2500

    # Kept in the embedded store: a new process has them.
    (tmp_path / "ready.json").unlink()
    with start_broker(tmp_path, env) as broker:
        token = admin_token(broker)
        out = cli(broker, token, "rate-limit", "get", "tenant-a")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"tenant": "tenant-a", "events_per_second": 5000, "source": "override"}
        assert call(broker, "DELETE", "/v1/admin/tenants/tenant-a/rate-limit", token)[1]["source"] == "default"
        out = cli(broker, token, "rate-limit", "delete", "tenant-b")
        assert out.returncode == 0 and json.loads(out.stdout)["source"] == "default", out.stderr


def test_memberships_are_written_to_the_memberships_file(tmp_path):
    members = tmp_path / "memberships.json"
    members.write_text(json.dumps({"kept-user": ["tenant-k"]}))
    with start_broker(tmp_path, {"TC_MEMBERSHIPS_FILE": str(members)}) as broker:
        token = admin_token(broker)
        status, body = call(broker, "PUT", "/v1/admin/memberships/user-1", token, {"tenants": ["tenant-a", "tenant-b"]})
        assert (status, body) == (200, {"cognito_sub": "user-1", "tenants": ["tenant-a", "tenant-b"]})
        # Written whole, the users already there kept.
        assert json.loads(members.read_text()) == {"kept-user": ["tenant-k"], "user-1": ["tenant-a", "tenant-b"]}
        out = cli(broker, token, "membership", "get", "user-1")
        assert out.returncode == 0 and json.loads(out.stdout)["tenants"] == ["tenant-a", "tenant-b"], out.stderr
        out = cli(broker, token, "membership", "set", "user-2", "tenant-c")
        assert out.returncode == 0, out.stderr
        assert call(broker, "DELETE", "/v1/admin/memberships/user-1", token)[0] == 204
        assert call(broker, "GET", "/v1/admin/memberships/user-1", token)[0] == 404
        assert json.loads(members.read_text()) == {"kept-user": ["tenant-k"], "user-2": ["tenant-c"]}
        # A file the broker cannot read is not overwritten: the operator fixes it.
        members.write_text('{"user-3": ["not a tenant"]}')
        status, body = call(broker, "PUT", "/v1/admin/memberships/user-4", token, {"tenants": ["tenant-d"]})
        assert status == 503 and "fix it by hand" in body["message"], body
        assert members.read_text() == '{"user-3": ["not a tenant"]}'


def test_memberships_need_somewhere_to_be_kept(tmp_path):
    with start_broker(tmp_path) as broker:
        status, body = call(broker, "PUT", "/v1/admin/memberships/user-1", admin_token(broker), {"tenants": ["t"]})
        assert status == 503
        assert "TC_MEMBERSHIPS_FILE" in body["message"] and "TC_REDIS_URL" in body["message"]


def test_only_an_all_tenants_admin_token_may_call_and_bad_input_is_named(tmp_path):
    with start_broker(tmp_path) as broker:
        path = "/v1/admin/tenants/tenant-a/rate-limit"
        # No token, a tenant's token, admin scope on a tenant's token, an
        # all-tenants token without admin: refused, before any body is read.
        assert call(broker, "GET", path, None)[0] == 401
        tenant_token = broker.token("tenant-a", "events:publish events:subscribe")
        status, body = call(broker, "PUT", path, tenant_token, {"events_per_second": 1_000_000})
        assert status == 403 and "admin" in body["message"]
        tenant_admin = broker.token("tenant-a", "admin events:publish")
        status, body = call(broker, "PUT", path, tenant_admin, {"events_per_second": 1_000_000})
        assert status == 403 and "events:all_tenants" in body["message"]
        proc = subprocess.run(
            [str(binary_path()), "token", "--scope", "events:all_tenants events:subscribe"],
            env=_env(), capture_output=True, text=True, timeout=RPC_TIMEOUT_S,
        )
        status, body = call(broker, "GET", path, proc.stdout.strip())
        assert status == 403 and "admin" in body["message"]
        # Still the default: nothing was changed by the refused calls.
        token = admin_token(broker)
        assert call(broker, "GET", path, token)[1]["source"] == "default"

        cases = [
            ("PUT", path, {"events_per_second": 0}, "events_per_second"),
            ("PUT", path, {"events_per_second": 2_000_000}, "events_per_second"),
            ("PUT", path, {"events_per_second": "fast"}, "body"),
            ("PUT", path, {"events_per_second": 5, "burst": 1}, "body"),
            ("GET", "/v1/admin/tenants/bad%20tenant/rate-limit", None, "tenant"),
            ("PUT", "/v1/admin/memberships/user-1", {"tenants": []}, "tenants"),
            ("PUT", "/v1/admin/memberships/user-1", {"tenants": ["ok", "not ok"]}, "tenants[1]"),
        ]
        for method, p, body, named in cases:
            status, answer = call(broker, method, p, token, body)
            assert status == 400, (p, body, status, answer)
            assert named in answer["message"], (body, answer)
        # A body over the bound is refused, not buffered.
        status, answer = call(broker, "PUT", path, token, raw=b"{" + b" " * (64 * 1024) + b"}")
        assert status == 400 and "larger than" in answer["message"]
        assert "panicked" not in broker.log()
