"""Fixtures for the Python gRPC client suite.

The stubs are generated from ../../proto with grpcio-tools at test time, and
the tests run against the real `tensorcost-events` binary (env TC_BIN, default
../../target/debug/tensorcost-events).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO_ROOT = REPO / "proto"
BROKER_SERVICE = "tensorcost.events.v1.EventBroker"
JWT_SECRET = "python-grpc-client-suite-secret-0123456789abcdef"
READY_TIMEOUT_S = 20.0
RPC_TIMEOUT_S = 10.0

_GEN_DIR: Path | None = None


def _generate_stubs() -> Path:
    """Runs `python -m grpc_tools.protoc` on every .proto under proto/ into a
    fresh temporary directory and puts it on sys.path."""
    # The broker's own protocol; proto/opentelemetry (vendored for the
    # broker's exporter) comes from the opentelemetry-proto package here.
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "tensorcost").rglob("*.proto"))
    assert protos, f"no .proto files under {PROTO_ROOT}"
    out = Path(tempfile.mkdtemp(prefix="tc-pystubs-"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    proc = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(
            f"grpc_tools.protoc failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    sys.path.insert(0, str(out))
    return out


def pytest_configure(config):
    # Runs before test modules are imported, so they can import the stubs.
    global _GEN_DIR
    if _GEN_DIR is None:
        _GEN_DIR = _generate_stubs()


def pytest_unconfigure(config):
    global _GEN_DIR
    if _GEN_DIR is not None:
        try:
            sys.path.remove(str(_GEN_DIR))
        except ValueError:
            pass
        shutil.rmtree(_GEN_DIR, ignore_errors=True)
        _GEN_DIR = None


def binary_path() -> Path:
    return Path(os.environ.get("TC_BIN") or REPO / "target" / "debug" / "tensorcost-events")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Settings come from flags and this secret only: drop any TC_* the
    # caller's shell may carry (TC_TOKEN, TC_READY_FILE, limits, ...).
    for key in [k for k in env if k.startswith("TC_")]:
        del env[key]
    env["TC_JWT_SECRET"] = JWT_SECRET
    return env


class Broker:
    def __init__(self, grpc_addr: str, http_addr: str, log_path: Path, proc=None):
        self.grpc_addr = grpc_addr
        self.http_addr = http_addr
        self.log_path = log_path
        self.proc = proc

    def kill(self):
        """SIGKILL: no shutdown work at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def token(
        self, tenant: str, scope: str = "events:publish events:subscribe", ttl: str = "10m", agent_id: str | None = None
    ) -> str:
        agent = ["--agent-id", agent_id] if agent_id else []
        proc = subprocess.run(
            [str(binary_path()), "token", "--tenant", tenant, "--scope", scope, "--ttl", ttl, *agent],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=RPC_TIMEOUT_S,
        )
        assert proc.returncode == 0, f"token minting failed: {proc.stderr}"
        token = proc.stdout.strip()
        assert token.count(".") == 2, f"not a JWT: {token!r}"
        return token


@contextlib.contextmanager
def start_broker(workdir: Path, extra_env: dict[str, str] | None = None):
    """Runs `serve` on free ports with its state under `workdir` (TC_DATA_DIR
    `workdir/data` unless `extra_env` sets it) and yields a Broker once the
    ready file names its addresses; stops it on exit."""
    binary = binary_path()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(f"broker binary not found or not executable: {binary} (set TC_BIN)", pytrace=False)
    ready = workdir / "ready.json"
    log_path = workdir / "broker.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            str(binary),
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        env={**_env(), "TC_DATA_DIR": str(workdir / "data"), **(extra_env or {})},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        addrs = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(
                    f"broker exited with {proc.returncode} before it was ready:\n"
                    + log_path.read_text(errors="replace"),
                    pytrace=False,
                )
            if ready.exists():
                try:
                    addrs = json.loads(ready.read_text())
                    break
                except (OSError, ValueError):
                    pass  # being written: try again
            time.sleep(0.05)
        if addrs is None:
            pytest.fail(
                f"broker wrote no ready file {ready} within {READY_TIMEOUT_S:.0f}s:\n"
                + log_path.read_text(errors="replace"),
                pytrace=False,
            )
        assert set(addrs) >= {"grpc", "http"}, f"ready file lacks addresses: {addrs}"
        yield Broker(addrs["grpc"], addrs["http"], log_path, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    with start_broker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture(scope="session")
def channel(broker):
    ch = grpc.insecure_channel(broker.grpc_addr)
    try:
        grpc.channel_ready_future(ch).result(timeout=RPC_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        pytest.fail(f"cannot connect to the broker at {broker.grpc_addr}:\n{broker.log()}", pytrace=False)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def pb():
    from tensorcost.events.v1 import events_pb2

    return events_pb2


@pytest.fixture(scope="session")
def stub(channel):
    from tensorcost.events.v1 import events_pb2_grpc

    return events_pb2_grpc.EventBrokerStub(channel)


@pytest.fixture
def tenant():
    """A tenant of this test's own, so tests never see each other's events."""
    return f"py-{uuid.uuid4().hex[:12]}"


def auth(token: str):
    return (("authorization", f"Bearer {token}"),)
