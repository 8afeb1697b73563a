"""The remote tier's URL parsing, redaction and record codec: no server needed."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("redis", reason="the redis Python package is not installed (pip install redis hiredis)")

from hstore.errors import InvalidItemError, StoreConfigError  # noqa: E402
from hstore.tiers.remote.codec import FORMAT_VERSION, Verdict, decode, encode_header, header_size  # noqa: E402
from hstore.tiers.remote.config import RemoteConfig, redact_url  # noqa: E402
from hstore.tiers.remote.wire import SplitValue, ZeroCopyPacker  # noqa: E402
from tests.helpers.store import ALL_DTYPES, random_tensor, tensor_bytes  # noqa: E402


# ---------------------------------------------------------------------------- URLs
@pytest.mark.parametrize("url, tls, cluster, nodes, db, user", [
    ("redis://127.0.0.1:6379/0", False, False, [("127.0.0.1", 6379)], 0, None),
    ("redis://localhost", False, False, [("localhost", 6379)], 0, None),
    ("redis://h:7000/3", False, False, [("h", 7000)], 3, None),
    ("rediss://alice:pw@h:6380/1", True, False, [("h", 6380)], 1, "alice"),
    ("redis+cluster://a:7000,b:7001,[::1]:7002", False, True, [("a", 7000), ("b", 7001), ("::1", 7002)], 0, None),
    ("rediss+cluster://:pw@a:7000", True, True, [("a", 7000)], 0, None),
    ("REDIS://h:1/", False, False, [("h", 1)], 0, None),
])
def test_urls_parse(url, tls, cluster, nodes, db, user):
    ep = RemoteConfig(url).endpoint
    assert (ep.tls, ep.cluster, list(ep.nodes), ep.db, ep.username) == (tls, cluster, nodes, db, user)


@pytest.mark.parametrize("url, says", [
    ("http://h:6379", "scheme"),
    ("h:6379", "scheme"),
    ("redis://", "no host"),
    ("redis://h:port", "port"),
    ("redis://h:0", "port"),
    ("redis://h:70000", "port"),
    ("redis://h:6379/x", "database number"),
    ("redis+cluster://h:6379/2", "only database 0"),
    ("redis://a:1,b:2", "several hosts"),
    ("redis://user@h", "user:password"),
    ("redis://h?namespace=a:b", "namespace"),
    ("redis://h?namespace=a*", "namespace"),
    ("redis://h?socket_timeout=0", "socket_timeout"),
    ("redis://h?socket_timeout=nan", "socket_timeout"),
    ("redis://h?connect_timeout=-1", "connect_timeout"),
    ("redis://h?max_connections=0", "max_connections"),
    ("redis://h?colour=blue", "unknown option"),
    ("redis://h?ttl=1&ttl=2", "twice"),
    ("redis://h?ssl_cert_reqs=none", "rediss://"),
    ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("rediss://h?ssl_ca_certs=/nonexistent/ca.pem", "no such file"),
    ("redis://h#frag", "fragment"),
])
def test_bad_urls_say_what_is_wrong(url, says):
    with pytest.raises(StoreConfigError, match=says):
        RemoteConfig(url)


def test_options_from_the_query_or_fields_but_not_conflicting():
    cfg = RemoteConfig("redis://h:1/0?namespace=prod&socket_timeout=0.25&ttl=60")
    assert (cfg.namespace, cfg.socket_timeout_s, cfg.ttl_s, cfg.connect_timeout_s) == ("prod", 0.25, 60.0, 0.5)
    assert RemoteConfig("redis://h", namespace="x", socket_timeout_s=2).socket_timeout_s == 2.0
    assert RemoteConfig("redis://h?namespace=x", namespace="x").namespace == "x"
    with pytest.raises(StoreConfigError, match="namespace"):
        RemoteConfig("redis://h?namespace=x", namespace="y")
    with pytest.raises(StoreConfigError, match="URL string"):
        RemoteConfig(6379)


def test_credentials_never_appear_in_reprs_dicts_or_errors(caplog):
    secret = "s3cr3t-p@ss/word"
    url = "redis://alice:s3cr3t-p%40ss%2Fword@h:1/0"
    cfg = RemoteConfig(url)
    assert cfg.endpoint.password.reveal() == secret
    shown = [repr(cfg), str(cfg), cfg.url, repr(dataclasses.asdict(cfg)), repr(cfg.endpoint), str(cfg.password)]
    for text in shown:
        assert "s3cr3t" not in text, text
    assert cfg.url == "redis://alice:***@h:1/0"
    # a config rebuilt from its (redacted) self keeps the secret
    again = dataclasses.replace(cfg, namespace="other")
    assert again.endpoint.password.reveal() == secret and again.namespace == "other"
    with pytest.raises(StoreConfigError) as e:
        RemoteConfig("redis://alice:s3cr3t@h:99999/0")
    assert "s3cr3t" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(StoreConfigError, match="redacted"):
        RemoteConfig("redis://alice:***@h:1/0")
    with pytest.raises(StoreConfigError, match="another"):
        RemoteConfig("redis://alice:one@h:1/0", password="two")
    assert RemoteConfig("redis://h:1/0", password="pw").endpoint.password.reveal() == "pw"


@pytest.mark.parametrize("url, shown", [
    ("redis://u:p@h:1/0", "redis://u:***@h:1/0"),
    ("redis://:p@h", "redis://:***@h"),
    ("redis://p@h", "redis://***@h"),
    ("redis://u:p/with/slash@h:1/0", "redis://***@h:1/0"),
    ("redis://u:p@a:1,b:2", "redis://u:***@a:1,b:2"),
    ("redis://h:1/0", "redis://h:1/0"),
    ("not a url with secret@host", "<not a URL>"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


# ---------------------------------------------------------------------------- records
def _record(key: bytes, t: torch.Tensor) -> bytes:
    payload = memoryview(bytearray(tensor_bytes(t)))
    return encode_header(key, t.dtype, tuple(t.shape), payload) + bytes(payload)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_record_round_trip_every_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    for shape in [(), (0,), (7,), (3, 5), (2, 1, 4)]:
        t = random_tensor(gen, dtype, shape)
        record, verdict = decode(b"key", _record(b"key", t))
        assert verdict is Verdict.OK
        assert (record.dtype, record.shape) == (dtype, shape)
        assert bytes(record.payload.numpy()) == tensor_bytes(t)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=64), shape=st.lists(st.integers(0, 4), max_size=4), pos=st.integers(0),
       bit=st.integers(0, 7))
def test_any_flipped_bit_is_a_miss(data, shape, pos, bit):
    """Every byte of a record is covered: a flip anywhere is CORRUPT (or NEWER_FORMAT when it hits the version)."""
    numel = 1
    for d in shape:
        numel *= d
    payload = (data * (numel + 1))[:numel]
    if len(payload) < numel:
        return
    t = torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(shape) if numel else torch.empty(shape,
                                                                                                      dtype=torch.uint8)
    value = bytearray(_record(b"k", t))
    pos %= len(value)
    value[pos] ^= 1 << bit
    record, verdict = decode(b"k", bytes(value))
    assert record is None
    assert verdict is (Verdict.NEWER_FORMAT if pos == 4 and value[4] > FORMAT_VERSION else Verdict.CORRUPT)


def test_a_record_of_another_key_truncated_or_extended_is_a_miss():
    t = torch.arange(12, dtype=torch.int32)
    value = _record(b"a", t)
    assert decode(b"b", value) == (None, Verdict.CORRUPT)
    assert decode(b"a", value[:-1]) == (None, Verdict.CORRUPT)
    assert decode(b"a", value + b"\0") == (None, Verdict.CORRUPT)
    assert decode(b"a", b"") == (None, Verdict.CORRUPT)
    assert decode(b"a", b"some foreign value") == (None, Verdict.CORRUPT)
    assert len(value) == header_size(1) + 48


def test_header_rejects_inconsistent_items():
    with pytest.raises(InvalidItemError, match="bytes"):
        encode_header(b"k", torch.float32, (3,), memoryview(bytes(8)))
    with pytest.raises(InvalidItemError, match="dimensions"):
        encode_header(b"k", torch.uint8, (1,) * 40, memoryview(bytes(1)))


# ---------------------------------------------------------------------------- wire
def test_packer_sends_payloads_without_copying_them():
    payload = memoryview(bytearray(range(256)) * 100)
    chunks = ZeroCopyPacker().pack("SET", b"k", SplitValue((b"HDR", payload)), "PX", 5)
    assert any(c is payload for c in chunks)  # the very buffer, not a copy
    wire = b"".join(bytes(c) for c in chunks)
    body = b"HDR" + bytes(payload)
    assert wire == b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n$2\r\nPX\r\n$1\r\n5\r\n" % (len(body), body)
    assert b"".join(ZeroCopyPacker().pack("CLUSTER SLOTS")) == b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n"


def test_no_log_record_of_a_failed_open_shows_the_password(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreConfigError):
        RemoteConfig("redis://bob:hunter2@h:1/0?nope=1")
    assert "hunter2" not in caplog.text
