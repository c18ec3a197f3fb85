"""grpcio over TLS against the real binary: certificates made here with the
`cryptography` package (a CA, the broker's certificate for 127.0.0.1, a
client certificate for mTLS); a publish seen by a subscriber over TLS; a
plain-text client refused cleanly on the TLS port; with TC_TLS_CLIENT_CA,
a client without a certificate, or with one from another CA, refused and one
with a certificate of the CA served."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import RPC_TIMEOUT_S, auth, start_broker
from test_grpc_client import Subscriber, publish


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Ca:
    def __init__(self, cn: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, server: bool) -> tuple[bytes, bytes]:
        """A certificate and its key (PEM) for a server at 127.0.0.1, or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _write(dir: Path, name: str, data: bytes) -> str:
    path = dir / name
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def ca():
    return Ca("python test CA")


@pytest.fixture(scope="module")
def tls_env(tmp_path_factory, ca):
    dir = tmp_path_factory.mktemp("certs")
    cert, key = ca.issue("broker", server=True)
    return dir, {"TC_TLS_CERT": _write(dir, "cert.pem", cert), "TC_TLS_KEY": _write(dir, "key.pem", key)}


def _stub(channel):
    from tensorcost.events.v1 import events_pb2_grpc

    return events_pb2_grpc.EventBrokerStub(channel)


def _ready(channel) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
        return True
    except grpc.FutureTimeoutError:
        return False


def test_grpcio_over_tls_publishes_and_subscribes(tmp_path, tls_env, ca, pb, tenant):
    _, env = tls_env
    with start_broker(tmp_path, env) as broker:
        token = broker.token(tenant)
        channel = grpc.secure_channel(broker.grpc_addr, grpc.ssl_channel_credentials(root_certificates=ca.pem))
        assert _ready(channel), broker.log()
        stub = _stub(channel)
        sub = Subscriber(stub, pb, token)
        try:
            sub.status()
            ack = publish(stub, pb, token, {"type": "instance.created", "data": '{"instance_id":"i-tls"}'})
            [event] = sub.events(1)
            assert event.id == ack.results[0].id
            assert event.data == '{"instance_id":"i-tls"}'
        finally:
            sub.close()
            channel.close()

        # A plain-text client on the TLS port: refused, and the broker goes on.
        plain = grpc.insecure_channel(broker.grpc_addr)
        with pytest.raises(grpc.RpcError) as refused:
            publish(_stub(plain), pb, token, {"type": "instance.created", "data": "{}"})
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()

        # A client that does not trust the broker's CA: refused by the client.
        stranger = Ca("another CA")
        untrusting = grpc.secure_channel(
            broker.grpc_addr, grpc.ssl_channel_credentials(root_certificates=stranger.pem)
        )
        with pytest.raises(grpc.RpcError) as untrusted:
            publish(_stub(untrusting), pb, token, {"type": "instance.created", "data": "{}"})
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
        untrusting.close()

        again = grpc.secure_channel(broker.grpc_addr, grpc.ssl_channel_credentials(root_certificates=ca.pem))
        assert publish(_stub(again), pb, token, {"type": "instance.created", "data": "{}"}).results[0].id
        again.close()
        assert "panicked" not in broker.log()


def test_mtls_requires_a_client_certificate_of_the_client_ca(tmp_path, tls_env, ca, pb, tenant):
    dir, env = tls_env
    clients = Ca("agent fleet CA")
    env = {**env, "TC_TLS_CLIENT_CA": _write(dir, "clients.pem", clients.pem)}
    with start_broker(tmp_path, env) as broker:
        token = broker.token(tenant)

        def call(creds):
            channel = grpc.secure_channel(broker.grpc_addr, creds)
            try:
                return publish(_stub(channel), pb, token, {"type": "agent.heartbeat", "data": '{"agent_id":"a-1"}'})
            finally:
                channel.close()

        # No client certificate: refused.
        with pytest.raises(grpc.RpcError) as none:
            call(grpc.ssl_channel_credentials(root_certificates=ca.pem))
        assert none.value.code() == grpc.StatusCode.UNAVAILABLE

        # A certificate from a CA the broker does not trust: refused.
        stranger_cert, stranger_key = Ca("stranger").issue("agent", server=False)
        with pytest.raises(grpc.RpcError) as stranger:
            call(
                grpc.ssl_channel_credentials(
                    root_certificates=ca.pem, private_key=stranger_key, certificate_chain=stranger_cert
                )
            )
        assert stranger.value.code() == grpc.StatusCode.UNAVAILABLE

        # A certificate of the client CA: served (the token still decides
        # what it may do).
        cert, key = clients.issue("agent-1", server=False)
        ack = call(grpc.ssl_channel_credentials(root_certificates=ca.pem, private_key=key, certificate_chain=cert))
        assert ack.results[0].id
        assert "panicked" not in broker.log()
