"""Real redis-server processes for the remote tier's tests, on free loopback ports.

`RedisServer` is one process that a test can stop, kill -9, pause (SIGSTOP), resume and restart
(empty: nothing is persisted). `ThreeNodeCluster` is three of them in cluster mode joined by
`redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`. The fixtures start each kind
once per session (a fresh one per test where the test breaks it) and stop them at the end; with
no redis-server installed they skip, saying so (CI installs Debian's package: scripts/install.sh).
Registered for the whole suite through `pytest_plugins` in tests/conftest.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
_NOT_INSTALLED = "redis-server is not installed (apt-get install redis-server); the remote tier's tests need it"
_READY = b"Ready to accept connections"
_START_TIMEOUT_S = 10.0

ACL_USER, ACL_PASSWORD, ACL_NAMESPACE = "alice", "alice-pw", "alice"
MINIMAL_ACL = ("carol", "carol-pw", "carol", "+get +set +exists +unlink +ping")  # what the README says a user needs
DEFAULT_PASSWORD = "default-pw"


def _die_with_parent() -> None:  # runs in the child before exec: no server outlives a killed test run
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(with_bus: bool = False) -> int:
    """A loopback port nothing listens on (and port + 10000, a cluster node's bus, when asked)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair found")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> "TlsFiles":
        """A self-signed certificate for 127.0.0.1 / localhost (it is its own CA)."""
        cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
        return cls(cert, key)


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence, logging to a file in its directory."""

    def __init__(self, directory: Path, args: Sequence[str] = (), tls: TlsFiles | None = None,
                 password: str | None = None, cluster: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(with_bus=cluster)
        self.tls = tls
        self.password = password
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    @property
    def log_file(self) -> Path:
        return self.dir / "redis.log"

    def url(self, scheme: str | None = None, credentials: str = "", query: str = "") -> str:
        scheme = scheme or ("rediss" if self.tls else "redis")
        creds = f"{credentials}@" if credentials else ""
        return f"{scheme}://{creds}127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def start(self) -> "RedisServer":
        if self.tls:
            net = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                   "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.cert),
                   "--tls-auth-clients", "no"]
        else:
            net = ["--port", str(self.port)]
        auth = ["--requirepass", self.password] if self.password else []
        self.log_file.write_bytes(b"")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *net, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.log_file), "--daemonize", "no", *auth, *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while _READY not in self.log_file.read_bytes():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server on port {self.port} exited: {err}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what a crashed or OOM-killed server looks like to its clients."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        """Kill it and start it again on the same port: it comes back empty."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung or partitioned server)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def client(self, **kwargs):
        """A plain redis-py client with full rights, for tests that reach around the tier."""
        import redis

        kw = dict(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)
        if self.tls:
            kw.update(ssl=True, ssl_ca_certs=str(self.tls.cert))
        kw.update(kwargs)
        return redis.Redis(**kw)


class ThreeNodeCluster:
    """Three primaries, no replicas, every slot covered (over TLS, the cluster bus too, when given files)."""

    def __init__(self, directory: Path, tls: TlsFiles | None = None):
        self.tls = tls
        extra = ["--tls-cluster", "yes"] if tls else []
        self.nodes = [RedisServer(Path(directory) / f"node{i}", cluster=True, tls=tls,
                                  args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                        "--cluster-node-timeout", "15000", *extra]) for i in range(3)]

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss+cluster://127.0.0.1:{self.nodes[0].port}?ssl_ca_certs={self.tls.cert}"
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> "ThreeNodeCluster":
        for node in self.nodes:
            node.start()
        tls = ["--tls", "--cacert", str(self.tls.cert)] if self.tls else []
        subprocess.run([REDIS_CLI, *tls, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        for node in self.nodes:
            with node.client() as c:
                while c.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster did not converge:\n{node.log_tail()}")
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _require_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip(_NOT_INSTALLED)
    pytest.importorskip("redis", reason="the redis Python package is not installed (pip install redis hiredis)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A plain standalone server shared by the session."""
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis-plain")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_fresh(tmp_path):
    """A standalone server of this test's own, for tests that kill, pause or restart it."""
    _require_redis()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_auth_server(tmp_path_factory):
    """A server with a default-user password, an ACL user limited to the keys of one namespace, and
    one limited to those keys and the few commands the tier's data path sends."""
    _require_redis()
    user, password, ns, commands = MINIMAL_ACL
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=DEFAULT_PASSWORD,
                         args=["--user", ACL_USER, "on", f">{ACL_PASSWORD}", f"~{ACL_NAMESPACE}:*", "+@all",
                               "--user", user, "on", f">{password}", f"~{ns}:*", *commands.split()]).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_lru_server(tmp_path_factory):
    """A server deployed as the README says: 8 MiB of maxmemory, allkeys-lru."""
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis-lru"),
                         args=["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    """A self-signed certificate for the TLS servers of the session."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS servers")
    return TlsFiles.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def redis_tls_server(tmp_path_factory, tls_files):
    """A TLS-only server."""
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), tls=tls_files).start()
    yield server
    server.stop()


def _cluster(directory: Path, tls: TlsFiles | None = None):
    _require_redis()
    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed (it comes with redis-server)")
    cluster = ThreeNodeCluster(directory, tls).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """Three primaries created with redis-cli --cluster create."""
    yield from _cluster(tmp_path_factory.mktemp("redis-cluster"))


@pytest.fixture(scope="session")
def redis_tls_cluster(tmp_path_factory, tls_files):
    """The same over TLS (clients and cluster bus)."""
    yield from _cluster(tmp_path_factory.mktemp("redis-tls-cluster"), tls_files)


@pytest.fixture
def open_tier():
    """`open_tier(url, **RemoteConfig fields)`: a RedisTier, closed at teardown."""
    from hstore.tiers.remote import RedisTier, RemoteConfig

    with contextlib.ExitStack() as stack:
        yield lambda url, **fields: stack.enter_context(RedisTier(RemoteConfig(url, **fields)))


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own, so tests sharing a server never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"
