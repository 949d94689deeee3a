"""deploy/certs/make-dev-certs.sh, run for real with openssl: it makes the three files the
compose file mounts, the keys private, a server certificate for the names the agent and a
browser use, and a TLS 1.3 handshake with them verifies as the agent's would.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.unit.deploy_checks import ROOT

SCRIPT = ROOT / "deploy" / "certs" / "make-dev-certs.sh"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl here")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    result = subprocess.run(
        ["sh", str(SCRIPT), str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return directory


def test_makes_exactly_the_files_compose_mounts(certs: Path) -> None:
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    for key in ("ca.key", "tls.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    compose = (ROOT / "docker-compose.yml").read_text()
    for mounted in ("ca.crt", "tls.crt", "tls.key"):
        assert f"./deploy/certs/{mounted}" in compose
    assert "./deploy/certs/ca.key" not in compose, "the CA's key stays on the host"


def test_server_certificate_is_signed_by_the_ca_for_the_compose_names(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "tls.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"envoy", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_tls_1_3_handshake_verifies_the_name_envoy(certs: Path) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_3
    server_context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    client_context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    client_context.minimum_version = ssl.TLSVersion.TLSv1_3
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname="envoy") as tls,
        ):
            assert tls.version() == "TLSv1.3"
            assert tls.recv(2) == b"ok"
        thread.join(timeout=10)
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        port = listener.getsockname()[1]
        thread = threading.Thread(target=lambda: _accept_tls(listener, server_context))
        thread.daemon = True
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            client_context.wrap_socket(raw, server_hostname="gateway")


def _accept_tls(listener: socket.socket, context: ssl.SSLContext) -> None:
    connection, _ = listener.accept()
    with contextlib.suppress(ssl.SSLError, OSError):
        context.wrap_socket(connection, server_side=True).close()


def test_refuses_to_overwrite_existing_certificates(certs: Path) -> None:
    before = (certs / "tls.crt").read_bytes()
    result = subprocess.run(
        ["sh", str(SCRIPT), str(certs)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0 and "already has certificates" in result.stderr
    assert (certs / "tls.crt").read_bytes() == before


def test_git_ignores_the_certificates_but_not_the_script() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git work tree")

    def ignored(path: str) -> bool:
        result = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True, check=False
        )
        return result.returncode == 0

    for secret in ("ca.key", "tls.key", "ca.crt", "tls.crt"):
        assert ignored(f"deploy/certs/{secret}"), secret
    assert not ignored("deploy/certs/README.md")
    assert not ignored("deploy/certs/make-dev-certs.sh")
