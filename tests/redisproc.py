"""A throw-away ``redis-server`` subprocess for tests.

    with RedisServer() as srv:          # free port, no persistence, bound to 127.0.0.1
        srv.url                         # redis://127.0.0.1:<port>/0 (with the password if any)
        srv.stop()                      # SIGKILL (or stop(kill=False) for SIGTERM)
        srv.start()                     # again, same port, empty data set
        srv.pause(500)                  # CLIENT PAUSE 500 ms
    RedisServer(password="pw")          # --requirepass; RedisServer(tls=True): rediss:// only

Never touches the Redis on 6379. ``require_redis_server()`` skips the calling test (or module) when
``redis-server`` is not on PATH; ``redis_server_fixture()`` is a generator to ``yield from`` in a fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

DEFAULT_PORT = 6379


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def require_redis_server() -> str:
    """Path of ``redis-server``; skips the test when it is not on PATH."""
    path = redis_server_path()
    if path is None:
        import pytest

        pytest.skip("redis-server not found on PATH (install redis-server to run the Redis store tests)")
    return path


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != DEFAULT_PORT:
            return port


class RedisServer:
    def __init__(self, password: str | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = (), executable: str | None = None,
                 start_timeout: float = 10.0, tls: bool = False) -> None:
        if port == DEFAULT_PORT:
            raise ValueError("tests must not use the Redis on 6379")
        self.password = password
        self.port = port or free_port()
        self.extra_args = extra_args
        self.executable = executable or require_redis_server()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="aws-masker-redis-")
        self.dir = self._tmp.name
        # TLS only (no plain port): a self-signed certificate for 127.0.0.1, no client certificates.
        self.tls_ca = make_tls_files(self.dir) if tls else None

    # -- addresses -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.url_with_password(self.password)

    def url_with_password(self, password: str | None) -> str:
        auth = f":{password}@" if password is not None else ""
        if self.tls_ca is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> RedisServer:
        if self.running:
            return self
        if self.tls_ca is None:
            ports = ["--port", str(self.port)]
        else:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                     "--tls-cert-file", os.path.join(self.dir, "server.pem"),
                     "--tls-key-file", os.path.join(self.dir, "server.key"),
                     "--tls-ca-cert-file", self.tls_ca]
        args = [self.executable, *ports, "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no",
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.password is not None:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        self.proc = subprocess.Popen(args, cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"redis-server exited at start (port {self.port}): {err.strip()}"
                                   f" {self._log_tail()}")
            try:
                if self.client(socket_timeout=0.5).ping():
                    return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING in time")
            time.sleep(0.02)

    def stop(self, kill: bool = True) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    # -- admin helpers ---------------------------------------------------------------------------------
    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous client for inspecting the server (not the code under test)."""
        kwargs.setdefault("socket_timeout", 5)
        if self.tls_ca is not None:
            kwargs.update(ssl=True, ssl_ca_certs=self.tls_ca)
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def pause(self, ms: int) -> None:
        """CLIENT PAUSE every client for ``ms`` milliseconds (commands queue; nothing is answered)."""
        with self.client() as c:
            c.client_pause(ms, all=True)

    @contextmanager
    def monitor(self) -> Iterator[list[str]]:
        """Collect MONITOR lines (one per command the server runs) while the block runs.

        Leaving the block waits until the server has shown everything that ran before it.
        """
        lines: list[str] = []
        marker = f"monitor-end-{time.monotonic_ns()}"
        sock, f = self._raw_connection()
        sock.sendall(_command("MONITOR"))
        if f.readline().strip() != b"+OK":
            raise RuntimeError("MONITOR failed")
        done = threading.Event()

        def reader() -> None:
            for raw in f:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if marker in line:
                    break
                lines.append(line.lstrip("+"))
            done.set()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            yield lines
        finally:
            # a bare connection, so the marker is the only command it shows (no HELLO/SETINFO handshake)
            esock, ef = self._raw_connection()
            esock.sendall(_command("ECHO", marker))
            ef.readline()
            esock.close()
            done.wait(5)
            sock.close()
            t.join(1)

    def _raw_connection(self) -> tuple[socket.socket, Any]:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if self.tls_ca is not None:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        f = sock.makefile("rb")
        if self.password is not None:
            sock.sendall(_command("AUTH", self.password))  # MONITOR never shows AUTH
            f.readline()
        return sock, f


def make_tls_files(directory: str) -> str:
    """Write a self-signed ``server.pem`` / ``server.key`` for 127.0.0.1; returns the CA (= cert) path."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aws-masker test redis")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = os.path.join(directory, "server.pem")
    with open(pem, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(directory, "server.key"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return pem


def _command(*args: str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def redis_server_fixture(**kwargs: Any) -> Iterator[RedisServer]:
    """For fixtures: ``yield from redis_server_fixture()``; stops the server afterwards."""
    require_redis_server()
    with RedisServer(**kwargs) as srv:
        yield srv
