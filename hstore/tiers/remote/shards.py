"""Who holds a key: the one server, or the primary of the key's slot in a Redis Cluster.

A `Shard` is one server: a redis-py client over a connection pool, and a `Breaker`. A router
groups a batch's keys by shard, so each shard gets one pipeline per batch. On a cluster this is
what redis-py's ClusterPipeline does too, but done here a dead or paused primary costs only its
own keys (its breaker opens, the other primaries keep serving) and nothing retries behind the
caller's back: every connection is built with zero retries and bounded timeouts.

Opening checks what a URL cannot: credentials (a wrong password or a user the ACL does not let
near the namespace is a StoreConfigError) and the server's mode (redis:// against a cluster node
or redis+cluster:// against a plain server is one too). A server that is merely unreachable at
open is not an error: the tier starts with its breaker open and reads miss until it is up.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from hstore.errors import StoreConfigError
from hstore.tiers.remote.config import Endpoint, RemoteConfig
from hstore.tiers.remote.health import Breaker
from hstore.tiers.remote.stats import error_kind
from hstore.tiers.remote.wire import ZeroCopyConnection, ZeroCopySSLConnection

log = logging.getLogger(__name__)


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


class Shard:
    """One server of the tier: its client and whether to talk to it now."""

    def __init__(self, name: str, client: redis.Redis, breaker: Breaker):
        self.name = name
        self.client = client
        self.breaker = breaker

    def pipelined(self, queue: Callable[[object], object]) -> list:
        """Queue commands with `queue(pipeline)`, send them in one round trip; the replies (an
        exception in place of a command the server refused). Raises when the exchange fails."""
        pipe = self.client.pipeline(transaction=False)
        try:
            queue(pipe)
            return pipe.execute(raise_on_error=False)
        finally:
            pipe.reset()

    def get_each(self, rkeys: Sequence[bytes], handle: Callable[[int, object], None]) -> int:
        """GET every key in one round trip and hand each reply to `handle(i, reply)` (bytes, None, or
        the server's error) as soon as it is parsed, while its bytes are still in the CPU's caches:
        verifying a whole pipeline's values after it (as redis-py's Pipeline returns them) costs
        them a trip through memory, measured at ~10% of the read bandwidth. Raises when the
        exchange fails, after handing over the replies that arrived; returns how many there were."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands([("GET", k) for k in rkeys]))
            for i in range(len(rkeys)):
                try:
                    reply = conn.read_response()
                except redis.exceptions.ResponseError as e:  # one command refused; the stream goes on
                    reply = e
                handle(i, reply)
            return len(rkeys)
        except BaseException:
            conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            pool.release(conn)

    def __repr__(self) -> str:
        return f"Shard({self.name})"


def _breaker(cfg: RemoteConfig) -> Breaker:
    probe = cfg.connect_timeout_s + 2 * cfg.socket_timeout_s + 1.0
    return Breaker(max_s=cfg.backoff_max_s, probe_timeout_s=probe)


def connection_kwargs(cfg: RemoteConfig) -> dict:
    """What every connection of the tier is built with (the credentials included, never logged)."""
    ep = cfg.endpoint
    kw = dict(
        connection_class=ZeroCopySSLConnection if ep.tls else ZeroCopyConnection,
        username=ep.username,
        password=ep.password.reveal() if ep.password is not None else None,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s,
        max_connections=cfg.max_connections,
    )
    if ep.tls:
        kw.update(ssl_cert_reqs=cfg.ssl_cert_reqs, ssl_ca_certs=cfg.ssl_ca_certs, ssl_certfile=cfg.ssl_certfile,
                  ssl_keyfile=cfg.ssl_keyfile, ssl_check_hostname=cfg.ssl_cert_reqs == "required")
    return kw


def _config_error(cfg: RemoteConfig, exc: BaseException) -> StoreConfigError | None:
    """The StoreConfigError an exception at open means, or None when it is only 'not reachable now'."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " / ".join(str(e) for e in chain)
    for e in chain:
        if isinstance(e, redis.exceptions.NoPermissionError) or "no permissions" in str(e):
            return StoreConfigError(f"remote {cfg.url}: the ACL does not let the user do what the tier needs ({e})")
        if error_kind(e) == "auth" or "WRONGPASS" in str(e) or "NOAUTH" in str(e):
            return StoreConfigError(f"remote {cfg.url}: authentication failed ({e}); check the user and password")
    if "cluster support disabled" in text or "Cluster mode is not enabled" in text:
        return StoreConfigError(f"remote {cfg.url}: the server is not a Redis Cluster; use a redis:// URL")
    if "DB index is out of range" in text:
        return StoreConfigError(f"remote {cfg.url}: database {cfg.endpoint.db} does not exist on the server")
    return None


def _check_mode_and_access(cfg: RemoteConfig, client: redis.Redis, cluster: bool) -> None:
    """Raise StoreConfigError when the server is not what the URL says or the user may not use the namespace."""
    if not cluster:
        try:
            clustered = client.info("cluster").get("cluster_enabled")
        except redis.exceptions.NoPermissionError:  # an ACL without INFO: the first MOVED reply will tell
            clustered = False
        if clustered:
            raise StoreConfigError(f"remote {cfg.url}: the server is a Redis Cluster node; "
                                   f"use a redis+cluster:// URL")
    probe = cfg.key_prefix + b"__access_check__"
    try:
        client.exists(probe)
    except redis.exceptions.NoPermissionError as e:
        raise StoreConfigError(f"remote {cfg.url}: the user may not read keys of namespace "
                               f"{cfg.namespace!r} ({e})") from None


class StandaloneRouter:
    """One server holds every key."""

    def __init__(self, cfg: RemoteConfig):
        ep: Endpoint = cfg.endpoint
        (host, port), = ep.nodes
        pool = redis.ConnectionPool(host=host, port=port, db=ep.db, retry=_no_retry(), **connection_kwargs(cfg))
        self._shard = Shard(f"{host}:{port}", redis.Redis(connection_pool=pool), _breaker(cfg))
        try:
            _check_mode_and_access(cfg, self._shard.client, cluster=False)
        except StoreConfigError:
            pool.disconnect()
            raise
        except redis.exceptions.RedisError as e:
            problem = _config_error(cfg, e)
            if problem is not None:
                pool.disconnect()
                raise problem from None
            self._shard.breaker.failure()
            log.warning("remote %s is not reachable (%s: %s); reads miss and writes are dropped until it is",
                        cfg.url, type(e).__name__, e)

    def route(self, rkeys: Sequence[bytes]) -> tuple[dict[Shard, list[int]], list[int]]:
        """(indices per shard, indices no shard can take now)."""
        return {self._shard: list(range(len(rkeys)))}, []

    def stale(self) -> None:
        """The topology may have changed (nothing to do for one server)."""

    def shards(self) -> list[Shard]:
        return [self._shard]

    def close(self) -> None:
        self._shard.client.connection_pool.disconnect()


class ClusterRouter:
    """A Redis Cluster: keys go to their slot's primary.

    The slot map is rebuilt when it proves stale (a MOVED or ASK reply, a primary refusing
    connections, slots nobody serves) or, when no seed answered at open, until one does. That
    runs on a background thread, at most once per backoff step, so no caller ever waits on it:
    meanwhile keys go where the old map says, or miss.
    """

    def __init__(self, cfg: RemoteConfig):
        self._cfg = cfg
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None
        self._shards: dict[str, Shard] = {}
        self._topology = _breaker(cfg)  # building the client / rebuilding the slot map
        self._refresher: threading.Thread | None = None
        self._closed = False
        try:
            self._client = self._connect()
        except StoreConfigError:
            raise
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            problem = _config_error(cfg, e)
            if problem is not None:
                raise problem from None
            self._topology.failure()
            log.warning("remote cluster %s is not reachable (%s: %s); reads miss and writes are dropped until "
                        "it is", cfg.url, type(e).__name__, e)

    def _connect(self) -> RedisCluster:
        cfg, ep = self._cfg, self._cfg.endpoint
        (host, port), *more = ep.nodes
        seeds = [redis.cluster.ClusterNode(h, p) for h, p in more]
        # url= (not host=) makes redis-py build each node's pool from these kwargs, our connection class included
        shown = f"[{host}]" if ":" in host else host
        client = RedisCluster(url=f"redis://{shown}:{port}", startup_nodes=seeds, retry=_no_retry(),
                              require_full_coverage=False, **connection_kwargs(cfg))
        try:
            _check_mode_and_access(cfg, client, cluster=True)
        except BaseException:
            client.close()
            raise
        return client

    def route(self, rkeys: Sequence[bytes]) -> tuple[dict[Shard, list[int]], list[int]]:
        client = self._client
        if client is None:
            self.stale()
            return {}, list(range(len(rkeys)))
        groups: dict[Shard, list[int]] = {}
        unrouted: list[int] = []
        for i, rkey in enumerate(rkeys):
            try:
                node = client.get_node_from_key(rkey)
            except (redis.exceptions.RedisClusterException, redis.exceptions.RedisError):
                node = None
            if node is None:
                unrouted.append(i)
                continue
            groups.setdefault(self._shard_for(client, node), []).append(i)
        if unrouted:
            self.stale()
        return groups, unrouted

    def _shard_for(self, client: RedisCluster, node) -> Shard:
        shard = self._shards.get(node.name)
        node_client = client.get_redis_connection(node)
        if shard is None or shard.client is not node_client:
            with self._lock:
                shard = self._shards.get(node.name)
                if shard is None or shard.client is not node_client:
                    node_client.set_retry(_no_retry())  # older redis-py gave node clients retries
                    shard = Shard(node.name, node_client, shard.breaker if shard else _breaker(self._cfg))
                    self._shards[node.name] = shard
        return shard

    def stale(self) -> None:
        """The slot map may be out of date: rebuild it in the background, unless that is running or backing off."""
        with self._lock:
            if self._closed or (self._refresher is not None and self._refresher.is_alive()):
                return
            if not self._topology.allow():
                return
            self._refresher = threading.Thread(target=self._refresh, name="hstore-remote-topology", daemon=True)
            self._refresher.start()

    def _refresh(self) -> None:
        try:
            if self._client is None:
                self._client = self._connect()
                log.warning("remote cluster %s is reachable", self._cfg.url)
            else:
                self._client.nodes_manager.initialize()
            self._topology.success()
        except (StoreConfigError, redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as e:
            if self._topology.failure():  # after open a refusal is an outage like any other, not an error
                log.warning("remote cluster %s: no slot map (%s); its keys miss until it is back", self._cfg.url, e)

    def shards(self) -> list[Shard]:
        client = self._client
        if client is None:
            return []
        return [self._shard_for(client, node) for node in client.get_primaries()]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            refresher = self._refresher
        if refresher is not None:
            refresher.join(self._cfg.connect_timeout_s * 4 + self._cfg.socket_timeout_s * 2)
        if self._client is not None:
            self._client.close()


def make_router(cfg: RemoteConfig) -> StandaloneRouter | ClusterRouter:
    return ClusterRouter(cfg) if cfg.endpoint.cluster else StandaloneRouter(cfg)
