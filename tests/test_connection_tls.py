"""TLS against a real ``redis-server --tls-port`` with a CA made here (openssl CLI), mutual too."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from rsaga.config import RedisSettings
from rsaga.connection import connect, ping
from rsaga.errors import RedisUnavailable
from rsaga.testing import RedisServer, free_port, require_real_redis

pytestmark = pytest.mark.real_redis


class Pki(NamedTuple):
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _signed(directory: Path, name: str, subject: str, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", subject)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "1", "-extfile", extensions,
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not (RedisServer.available() and shutil.which("openssl")):
        reason = "TLS tests need redis-server and the openssl CLI on PATH"
        if require_real_redis():
            pytest.fail(f"RSAGA_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
        "-days", "1", "-subj", "/CN=rsaga test CA",
    )
    server_cert, server_key = _signed(directory, "server", "/CN=127.0.0.1", ca, ca_key)
    client_cert, client_key = _signed(directory, "client", "/CN=rsaga-client", ca, ca_key)
    return Pki(ca, server_cert, server_key, client_cert, client_key)


def _tls_server(pki: Pki, tmp: Path, *, require_client_cert: bool) -> Iterator[int]:
    """A private redis-server answering TLS only, on a free port (yielded)."""
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
            "--tls-ca-cert-file", str(pki.ca),
            "--tls-auth-clients", "yes" if require_client_cert else "no",
            "--save", "", "--appendonly", "no", "--dir", str(tmp),
            "--logfile", str(tmp / "redis.log"),
        ],
    )
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    deadline = time.monotonic() + 10
    try:
        while True:
            if process.poll() is not None:
                log = (tmp / "redis.log").read_text(errors="replace")
                pytest.fail(f"redis-server (TLS) exited at start: {log[-2000:]}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
                ):
                    tls.sendall(b"PING\r\n")
                    if tls.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait(10)


@pytest.fixture
def tls_port(pki: Pki, tmp_path: Path) -> Iterator[int]:
    """A TLS server that does not ask for client certificates."""
    yield from _tls_server(pki, tmp_path, require_client_cert=False)


@pytest.fixture
def mtls_port(pki: Pki, tmp_path: Path) -> Iterator[int]:
    """A TLS server that requires a client certificate signed by the test CA."""
    yield from _tls_server(pki, tmp_path, require_client_cert=True)


async def round_trip(settings: RedisSettings) -> str:
    client = connect(settings)
    try:
        info = await ping(client, "test")
        await client.set("rsaga-tls-check", b"ok")
        assert await client.get("rsaga-tls-check") == b"ok"
        return info.version
    finally:
        await client.aclose()


async def test_tls_with_the_servers_ca(pki: Pki, tls_port: int) -> None:
    url = f"rediss://127.0.0.1:{tls_port}/0"
    assert await round_trip(RedisSettings(url=url, tls_ca=str(pki.ca)))


async def test_mutual_tls_with_a_client_certificate(pki: Pki, mtls_port: int) -> None:
    settings = RedisSettings(
        url=f"rediss://127.0.0.1:{mtls_port}/0",
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
    )
    assert await round_trip(settings)


async def test_a_missing_client_certificate_is_a_clear_error(pki: Pki, mtls_port: int) -> None:
    client = connect(RedisSettings(url=f"rediss://127.0.0.1:{mtls_port}/0", tls_ca=str(pki.ca)))
    started = time.monotonic()
    try:
        with pytest.raises(RedisUnavailable) as caught:
            await ping(client, "here", wait=30)  # a mistake in settings: no waiting
    finally:
        await client.aclose()
    assert time.monotonic() - started < 10
    assert str(caught.value).startswith(
        "cannot use Redis at here: the server closed the TLS connection: it requires a client "
        "certificate; set redis.tls_cert and redis.tls_key"
    )


async def test_an_untrusted_server_certificate_names_the_setting(tls_port: int) -> None:
    client = connect(RedisSettings(url=f"rediss://127.0.0.1:{tls_port}/0"))
    try:
        with pytest.raises(RedisUnavailable, match=r"set redis\.tls_ca to the CA that signed it"):
            await ping(client, "here", wait=30)
    finally:
        await client.aclose()


def test_rsaga_check_over_mutual_tls_from_the_environment(
    pki: Pki, mtls_port: int, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rsaga.cli", "check"],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "RSAGA_REDIS_URL": f"rediss://127.0.0.1:{mtls_port}/0",
            "RSAGA_REDIS_TLS_CA": str(pki.ca),
            "RSAGA_REDIS_TLS_CERT": str(pki.client_cert),
            "RSAGA_REDIS_TLS_KEY": str(pki.client_key),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
