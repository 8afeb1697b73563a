"""Where the remote tier lives and how it talks to it: a validated `RemoteConfig`, parsed from a URL.

    redis://[user:password@]host[:port][/db][?option=value&...]    one server
    rediss://...                                                   the same over TLS
    redis+cluster://[user:password@]host[:port][,host[:port]...]   a Redis Cluster (seed nodes, db 0)
    rediss+cluster://...                                           a cluster over TLS

Options (in the query or as fields; both only if they agree): namespace, socket_timeout, connect_timeout,
max_connections, ttl, backoff_max, pipeline_bytes, and for TLS ssl_ca_certs, ssl_certfile,
ssl_keyfile, ssl_cert_reqs (required | optional | none).

Credentials never reach a log line: the password moves out of `url` into a `Secret` when the
config is built, and `url` keeps only the redacted form (`redis://alice:***@host:6379/0`), so
repr(), dataclasses.asdict() and every error message show no secret.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, quote, unquote

from hstore.errors import StoreConfigError

_SCHEMES = {  # scheme -> (tls, cluster)
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
_DEFAULT_PORT = 6379
_MASK = "***"
_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # no ':' (the separator) and no glob characters (SCAN MATCH)
_CERT_REQS = ("required", "optional", "none")


class Secret:
    """A password that prints as *** (repr, str, format): only `reveal()` gives it back."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return repr(_MASK)

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.reveal() == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Endpoint:
    """The parsed URL: what the client connects to."""

    tls: bool
    cluster: bool
    nodes: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: Secret | None = field(repr=False)


def _seconds(name: str, allow_zero: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise StoreConfigError(f"{name} must be a number of seconds, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise StoreConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                                   f"number of seconds, got {value!r}")
        return v

    return parse


def _count(name: str, minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise StoreConfigError(f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or isinstance(value, float) or v < minimum:
            raise StoreConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return v

    return parse


def _namespace(value: Any) -> str:
    if not isinstance(value, str) or not _NAMESPACE.fullmatch(value):
        raise StoreConfigError(f"namespace must be 1-64 characters of A-Z a-z 0-9 _ . -, got {value!r}")
    return value


def _cert_reqs(value: Any) -> str:
    if value not in _CERT_REQS:
        raise StoreConfigError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {value!r}")
    return value


def _existing_file(name: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, (str, os.PathLike)) or not os.path.isfile(value):
            raise StoreConfigError(f"{name}: no such file: {value!r}")
        return os.fspath(value)

    return parse


# query name -> (field name, parser, default); a field left at None takes the query's value, else the default
_OPTIONS: dict[str, tuple[str, Callable[[Any], Any], Any]] = {
    "namespace": ("namespace", _namespace, "hstore"),
    "socket_timeout": ("socket_timeout_s", _seconds("socket_timeout"), 1.0),
    "connect_timeout": ("connect_timeout_s", _seconds("connect_timeout"), 0.5),
    "max_connections": ("max_connections", _count("max_connections", 1), 32),
    "ttl": ("ttl_s", _seconds("ttl", allow_zero=True), 0.0),
    "backoff_max": ("backoff_max_s", _seconds("backoff_max"), 5.0),
    "pipeline_bytes": ("pipeline_bytes", _count("pipeline_bytes", 1 << 16), 64 << 20),
    "ssl_ca_certs": ("ssl_ca_certs", _existing_file("ssl_ca_certs"), None),
    "ssl_certfile": ("ssl_certfile", _existing_file("ssl_certfile"), None),
    "ssl_keyfile": ("ssl_keyfile", _existing_file("ssl_keyfile"), None),
    "ssl_cert_reqs": ("ssl_cert_reqs", _cert_reqs, "required"),
}


@dataclass
class RemoteConfig:
    """Configuration of the Redis remote tier. `RemoteConfig("redis://host:6379/0")` works as is.

    After construction every option holds its value (from the field, the URL's query, or the
    default), `url` is redacted and `endpoint` says where to connect.
    """

    url: str
    """Where the server is; see the module docstring. A password in it moves to `password`."""
    namespace: str | None = None
    """Every Redis key of the tier starts with "<namespace>:"; nothing else is read or written (default hstore)."""
    socket_timeout_s: float | None = None
    """Longest wait on one socket read or write before the server counts as down (default 1 s)."""
    connect_timeout_s: float | None = None
    """Longest wait for a TCP (and TLS) connection (default 0.5 s)."""
    max_connections: int | None = None
    """Connections per server in the pool (default 32)."""
    ttl_s: float | None = None
    """Expire values after this many seconds; 0 keeps them until the server evicts them (default 0)."""
    backoff_max_s: float | None = None
    """A server that failed is left alone for 0.1 s, doubling up to this, before it is tried again (default 5 s)."""
    pipeline_bytes: int | None = None
    """Writes go out in pipelines of about this many payload bytes (default 64 MiB)."""
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str | None = None
    password: Secret | str | None = field(default=None, repr=False)
    """The password, if not in the URL (never both)."""
    endpoint: Endpoint = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise StoreConfigError(f"remote must be a URL string, got {type(self.url).__name__}")
        endpoint, query, redacted = parse_url(self.url)
        given = self.password.reveal() if isinstance(self.password, Secret) else self.password
        if endpoint.password is not None and endpoint.password.reveal() != _MASK:
            if given is not None and given != endpoint.password.reveal():
                raise StoreConfigError(f"remote URL {redacted}: a password in the URL and another in `password`")
            given = endpoint.password.reveal()
        elif endpoint.password is not None and given is None:  # a redacted URL without the secret beside it
            raise StoreConfigError(f"remote URL {redacted}: the password is redacted and none was given")
        secret = Secret(given) if given is not None else None
        self.password = secret
        self.endpoint = Endpoint(endpoint.tls, endpoint.cluster, endpoint.nodes, endpoint.db, endpoint.username, secret)
        self.url = redacted
        for qname, (fname, parse, default) in _OPTIONS.items():
            field_value, query_value = getattr(self, fname), query.pop(qname, None)
            value = default if field_value is None and query_value is None else parse(
                field_value if field_value is not None else query_value)
            if field_value is not None and query_value is not None and parse(query_value) != value:
                raise StoreConfigError(f"remote URL {redacted}: {qname} is {query_value!r} in the URL "
                                       f"and {field_value!r} as a field")
            setattr(self, fname, value)
        if query:
            raise StoreConfigError(f"remote URL {redacted}: unknown option(s) {', '.join(sorted(query))}; "
                                   f"known: {', '.join(_OPTIONS)}")
        if not endpoint.tls:
            tls_set = [q for q, (f, _, default) in _OPTIONS.items()
                       if q.startswith("ssl_") and getattr(self, f) != default]
            if tls_set:
                raise StoreConfigError(f"remote URL {redacted}: {', '.join(tls_set)} need a rediss:// URL")

    def __repr__(self) -> str:
        return f"RemoteConfig({self.url!r}, namespace={self.namespace!r})"

    @property
    def key_prefix(self) -> bytes:
        """What every Redis key of this tier starts with."""
        return self.namespace.encode() + b":"


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***; safe on malformed URLs too (then all credentials go)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL>" if "@" in url else url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        if "@" in rest:  # a password with an unescaped '/', '?' or '#' in it: hide everything before the host
            return f"{scheme}://{_MASK}@{rest.rpartition('@')[2]}"
        return url
    userinfo, _, hosts = authority.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:{_MASK}" if colon else _MASK
    return f"{scheme}://{shown}@{hosts}{rest[end:]}"


def parse_url(url: str) -> tuple[Endpoint, dict[str, str], str]:
    """(endpoint, query options, redacted URL); StoreConfigError with the redacted URL when it is not valid."""
    redacted = redact_url(url)

    def bad(why: str) -> StoreConfigError:
        return StoreConfigError(f"remote URL {redacted}: {why}")

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise bad(f"the scheme must be one of {', '.join(s + '://' for s in _SCHEMES)}")
    tls, cluster = _SCHEMES[scheme.lower()]
    if "#" in rest:
        raise bad("a URL fragment (#...) means nothing here")
    rest, _, query_text = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        if not colon:
            raise bad("credentials must be user:password@ or :password@ (a bare name is ambiguous)")
        username = unquote(user) or None
        password = Secret(unquote(pw)) if pw else None
    nodes = tuple(_parse_host(part, bad) for part in hosts.split(","))
    if len(nodes) > 1 and not cluster:
        raise bad("several hosts need a redis+cluster:// URL")
    db = 0
    if slash and path:
        if not path.isdigit():
            raise bad(f"the path must be a database number, got /{path}")
        db = int(path)
        if cluster and db != 0:
            raise bad("a Redis Cluster has only database 0")
    try:
        pairs = parse_qsl(query_text, keep_blank_values=True, strict_parsing=bool(query_text))
    except ValueError:
        raise bad("the query must be option=value pairs joined by &") from None
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query:
            raise bad(f"option {name} is given twice")
        query[name] = value
    return Endpoint(tls, cluster, nodes, db, username, password), query, redacted


def _parse_host(part: str, bad: Callable[[str], StoreConfigError]) -> tuple[str, int]:
    if part.startswith("["):  # [v6::addr]:port
        host, bracket, tail = part[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise bad(f"bad IPv6 host {part!r}")
        port_text = tail[1:]
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise bad("no host")
    if not port_text:
        return host, _DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise bad(f"the port must be a number 1-65535, got {port_text!r}")
    return host, int(port_text)

