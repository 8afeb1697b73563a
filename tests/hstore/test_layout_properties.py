"""Property tests of hstore.layout: every transform over random shapes, dtypes and sizes.

Round trips are checked bitwise (NaN payloads and -0.0 included): random bytes
are reinterpreted as the dtype, and results are compared as bytes.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstore.buffers import align_up, as_bytes
from hstore.layout import (
    Extent,
    assign_round_robin,
    chunk_spans,
    cut_by_size,
    join_chunks,
    layer_major_to_token_major,
    merge_adjacent,
    n_chunks,
    next_round_robin,
    pack_chunks,
    pack_layout,
    split_into_chunks,
    token_major_to_layer_major,
    unpack_chunks,
)

# Local, not a loaded profile: a profile would leak into every other test module.
props = settings(max_examples=100, deadline=None)

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.complex64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
ALIGNS = st.sampled_from([1, 2, 8, 512, 4096])


# -- strategies ----------------------------------------------------------------


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A contiguous tensor of random bit patterns (valid 0/1 for bool)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


@st.composite
def tensors(draw, shape=None, dtypes=st.sampled_from(DTYPES)) -> torch.Tensor:
    """Random tensor, contiguous or not: plain, permuted, or strided by a step slice."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    dtype = draw(dtypes)
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["plain", "permuted", "stepped"] if shape else ["plain"]))
    if kind == "permuted":
        perm = draw(st.permutations(range(len(shape))))
        inverse = sorted(range(len(shape)), key=perm.__getitem__)
        base = random_tensor(tuple(shape[p] for p in perm), dtype, seed)
        return base.permute(inverse)  # shape == `shape`, strides permuted
    if kind == "stepped":
        base = random_tensor(shape[:-1] + (2 * shape[-1],), dtype, seed)
        return base[..., ::2]
    return random_tensor(shape, dtype, seed)


def three_d(max_layers=4, max_tokens=150, max_width=6, min_tokens=0):
    dims = st.tuples(st.integers(0, max_layers), st.integers(min_tokens, max_tokens), st.integers(0, max_width))
    return dims.flatmap(lambda shape: tensors(shape=shape))


def bits(t: torch.Tensor) -> torch.Tensor:
    # clone, not .contiguous(): a 1-element tensor with stride != 1 counts as contiguous
    return as_bytes(t.clone(memory_format=torch.contiguous_format))


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


chunk_sizes = st.integers(1, 80)


# -- chunk spans ---------------------------------------------------------------


@props
@given(n=st.integers(0, 5000), c=chunk_sizes)
def test_chunk_spans_partition_tokens_in_order(n, c):
    spans = chunk_spans(n, c)
    assert len(spans) == n_chunks(n, c)
    covered = [t for s, e in spans for t in range(s, e)]
    assert covered == list(range(n))  # every token exactly once, in order
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # contiguous
    assert all(e - s == c for s, e in spans[:-1])  # only the last may be ragged
    if spans:
        assert 0 < spans[-1][1] - spans[-1][0] <= c


def test_chunk_spans_edges():
    assert chunk_spans(0) == []
    assert chunk_spans(64) == [(0, 64)]
    assert chunk_spans(65) == [(0, 64), (64, 65)]
    for bad in [(-1, 64), (10, 0), (10, -3)]:
        with pytest.raises(ValueError):
            chunk_spans(*bad)


# -- split / join --------------------------------------------------------------


@props
@given(x=three_d(), c=chunk_sizes)
def test_split_chunks_are_the_spans_of_each_layer(x, c):
    chunks = split_into_chunks(x, c)
    spans = chunk_spans(x.shape[1], c)
    assert len(chunks) == x.shape[0]
    for layer, layer_chunks in zip(x, chunks):
        assert len(layer_chunks) == len(spans)
        for (s, e), chunk in zip(spans, layer_chunks):
            assert chunk.shape == (e - s, x.shape[2])
            assert_bitwise_equal(chunk, layer[s:e])


@props
@given(x=three_d(min_tokens=1).filter(lambda t: t.shape[0] > 0), c=chunk_sizes)
def test_join_inverts_split(x, c):
    y = join_chunks(split_into_chunks(x, c))
    assert y.is_contiguous()
    assert_bitwise_equal(y, x)


@props
@given(layers=st.integers(1, 4), tokens=st.integers(1, 200), c=chunk_sizes)
def test_split_covers_every_layer_token_exactly_once(layers, tokens, c):
    ids = torch.arange(layers * tokens).reshape(layers, tokens, 1)
    chunks = split_into_chunks(ids, c)
    seen = torch.cat([chunk.reshape(-1) for layer in chunks for chunk in layer])
    assert torch.equal(seen, torch.arange(layers * tokens))  # layer-major, chunk order


def test_split_returns_views_and_join_rejects_ambiguous_input():
    x = torch.zeros(2, 70, 3)
    split_into_chunks(x)[1][1][0, 0] = 7.0
    assert x[1, 64, 0] == 7.0
    with pytest.raises(ValueError):
        join_chunks([])
    with pytest.raises(ValueError):
        join_chunks([[], []])
    with pytest.raises(ValueError):
        join_chunks([[torch.zeros(4, 3)], [torch.zeros(5, 3)]])  # token counts differ
    with pytest.raises(ValueError):
        join_chunks([[torch.zeros(4, 3), torch.zeros(4, 2)]])  # widths differ
    with pytest.raises(ValueError):
        split_into_chunks(torch.zeros(3, 4))


# -- token-major <-> layer-major ---------------------------------------------------


@props
@given(x=three_d())
def test_major_swaps_transpose_and_invert(x):
    lm = token_major_to_layer_major(x)
    assert lm.is_contiguous() and lm.shape == (x.shape[1], x.shape[0], x.shape[2])
    assert_bitwise_equal(lm, x.transpose(0, 1))
    back = layer_major_to_token_major(lm)
    assert back.is_contiguous()
    assert_bitwise_equal(back, x)
    assert_bitwise_equal(token_major_to_layer_major(layer_major_to_token_major(x)), x)


def test_major_swap_never_aliases_input():
    x = torch.zeros(1, 5, 2)  # the transpose of a size-1 dim is already contiguous
    y = layer_major_to_token_major(x)
    y.fill_(1.0)
    assert x.sum() == 0


# -- pack_layout -----------------------------------------------------------------


@props
@given(
    sizes=st.lists(st.integers(0, 20000), max_size=20),
    align=ALIGNS,
    header_blocks=st.integers(0, 2),
)
def test_pack_layout_is_aligned_tight_and_ordered(sizes, align, header_blocks):
    header = header_blocks * align
    offsets, total = pack_layout(sizes, align, header_bytes=header)
    assert len(offsets) == len(sizes)
    assert total % align == 0
    ends = []
    for off, size in zip(offsets, sizes):
        assert off % align == 0 and (off + header) % align == 0
        ends.append(off + header + align_up(size, align))
    # each record starts exactly where the previous slot ends: ordered, no overlap, no waste
    assert offsets == ([0] + ends)[: len(offsets)]
    assert total == (ends[-1] if ends else 0)
    assert all(off + header + size <= end for off, size, end in zip(offsets, sizes, ends))


def test_pack_layout_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_layout([1], 4096, header_bytes=64)  # header not a whole block
    with pytest.raises(ValueError):
        pack_layout([-1])
    with pytest.raises(ValueError):
        pack_layout([1], align=0)
    assert pack_layout([]) == ([], 0)
    assert pack_layout([1, 4096, 0, 4097], 4096, 4096) == ([0, 8192, 16384, 20480], 32768)


# -- pack_chunks / unpack_chunks --------------------------------------------------------


def assert_padding_is_zero(buf: torch.Tensor, extents: list[Extent]) -> None:
    """Padding is zeroed so that the packed bytes depend only on the inputs (stable checksums)."""
    payload = torch.zeros(buf.numel(), dtype=torch.bool)
    for e in extents:
        payload[e.offset : e.end] = True
    assert not buf[~payload].any()


@props
@given(ts=st.lists(tensors(), max_size=6), align=ALIGNS)
def test_pack_unpack_round_trip(ts, align):
    buf, extents = pack_chunks(ts, align)
    offsets, total = pack_layout([t.numel() * t.element_size() for t in ts], align)
    assert buf.dtype == torch.uint8 and buf.shape == (total,)
    assert buf.data_ptr() % align == 0
    assert [e.offset for e in extents] == offsets
    for t, e in zip(ts, extents):
        assert e == Extent(e.offset, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
    out = unpack_chunks(buf, extents)
    assert len(out) == len(ts)
    for a, b in zip(out, ts):
        assert_bitwise_equal(a, b)
    assert_padding_is_zero(buf, extents)


@props
@given(ts=st.lists(tensors(), min_size=1, max_size=4), slack=st.integers(0, 9000), shift=st.integers(0, 7))
def test_pack_into_out_and_unpack_from_unaligned_buffer(ts, slack, shift):
    _, total = pack_layout([t.numel() * t.element_size() for t in ts])
    storage = torch.full((shift + total + slack,), 0xAB, dtype=torch.uint8)
    out = storage[shift:]
    buf, extents = pack_chunks(ts, out=out)
    assert buf.numel() == total and (total == 0 or buf.data_ptr() == out.data_ptr())
    assert (storage[shift + total :] == 0xAB).all()  # nothing written past the layout
    assert_padding_is_zero(buf, extents)  # `out` held 0xAB everywhere before
    for a, b in zip(unpack_chunks(buf, extents), ts):  # odd storage offsets fall back to copies
        assert_bitwise_equal(a, b)


def test_pack_one_element_tensor_with_odd_stride():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)[0:1, 2]  # shape (1,), stride (4,), "contiguous"
    buf, extents = pack_chunks([x, x.reshape(())])
    a, b = unpack_chunks(buf, extents)
    assert a.tolist() == [2.0] and b.item() == 2.0 and b.shape == ()


def test_unpack_returns_views_and_validates():
    buf, extents = pack_chunks([torch.arange(4, dtype=torch.float32)])
    view = unpack_chunks(buf, extents)[0]
    buf[:4] = 0
    assert view[0] == 0 and view[1] == 1
    with pytest.raises(ValueError):
        unpack_chunks(buf[:8], extents)  # extent past the end
    with pytest.raises(ValueError):
        unpack_chunks(buf, [Extent(0, 12, torch.float32, (4,))])  # size disagrees with shape
    with pytest.raises(ValueError):
        pack_chunks([torch.zeros(4)], out=torch.empty(100, dtype=torch.uint8))  # out too small


# -- round-robin striping -----------------------------------------------------------


@props
@given(n=st.integers(0, 500), d=st.integers(1, 16), start=st.integers(-50, 50))
def test_round_robin_is_balanced_and_deterministic(n, d, start):
    devices = assign_round_robin(n, d, start)
    assert devices == assign_round_robin(n, d, start)
    assert len(devices) == n and all(0 <= x < d for x in devices)
    assert all((b - a) % d == 1 % d for a, b in zip(devices, devices[1:]))  # consecutive devices
    if n:
        assert devices[0] == start % d
    counts = Counter(devices)
    per_device = [counts.get(i, 0) for i in range(d)]
    assert max(per_device) - min(per_device) <= 1


def test_round_robin_rejects_bad_input():
    with pytest.raises(ValueError):
        assign_round_robin(3, 0)
    with pytest.raises(ValueError):
        assign_round_robin(-1, 2)


@props
@given(free=st.lists(st.integers(0, 100), min_size=1, max_size=8), cursor=st.integers(0, 20), size=st.integers(0, 100))
def test_next_round_robin_picks_the_first_device_with_room_from_the_cursor(free, cursor, size):
    device = next_round_robin(cursor, free, size)
    n = len(free)
    order = [(cursor + i) % n for i in range(n)]
    fitting = [d for d in order if free[d] >= size]
    assert device == (fitting[0] if fitting else None)


def test_next_round_robin_is_assign_round_robin_while_every_device_has_room():
    cursor, picked = 3, []
    for _ in range(10):
        d = next_round_robin(cursor, [10, 10, 10, 10], 1)
        picked.append(d)
        cursor = (d + 1) % 4
    assert picked == assign_round_robin(10, 4, start=3)


@props
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 6), st.integers(1, 4)), max_size=30),
       st.integers(1, 12), st.integers(1, 6))
def test_merge_adjacent_covers_every_extent_once_in_runs_that_touch(spec, max_bytes, max_parts):
    extents, parts = [], []
    for dev, slot, size in spec:
        extents.append((dev, slot * 10 + len(extents) % 3 * 4, size))  # some back to back, some not
        parts.append(1 + size % 2)
    runs = merge_adjacent(extents, max_bytes=max_bytes, parts=parts, max_parts=max_parts)
    assert sorted(i for run in runs for i in run) == list(range(len(extents)))
    for run in runs:
        for a, b in zip(run, run[1:]):
            assert extents[a][0] == extents[b][0] and extents[a][1] + extents[a][2] == extents[b][1]
        if len(run) > 1:
            assert sum(extents[i][2] for i in run) <= max_bytes
            assert sum(parts[i] for i in run) <= max_parts


@props
@given(st.lists(st.integers(0, 50), max_size=40), st.integers(1, 60))
def test_cut_by_size_keeps_order_and_bounds_every_group_of_more_than_one(sizes, limit):
    groups = cut_by_size(sizes, limit)
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    for g in groups:
        assert len(g) == 1 or sum(sizes[i] for i in g) <= limit
    for a, b in zip(groups, groups[1:]):  # a group ends only where the next item would not fit
        assert sum(sizes[i] for i in a) + sizes[b[0]] > limit
