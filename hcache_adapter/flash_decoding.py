"""Split-KV attention of a few queries over a long cache as two Triton kernels (flash-decoding).

`split_attention` cuts the keys into pieces that run as the batch of PyTorch's memory-efficient
attention kernel, then merges the pieces with a few more kernels. Measured on the lent H200 (the 7B
shape's 32 layers of 32 queries over a 5,120-row bucket), that is 2.4 ms of GPU time for 2.7 GB of K/V:
1.1 TB/s, a quarter of the memory's bandwidth, and it sits on the critical path of the captured first
forward after a restore. Here one kernel runs every (piece, K/V head) as a thread block that streams its
keys once, in blocks of `BLOCK_N`, with an online softmax in float32 (the bias read alongside, as the
mask transformers passes), and a second merges the pieces by their log-sum-exp straight into the
`[batch, queries, heads, dim]` layout the attention module returns. A block of keys whose every bias is
below the kernels module's `SKIP_BELOW` (the padding rows of a static cache bucket) is not read at all.

Used by `split_attention` on a CUDA device when Triton imports; with `TRITON_INTERPRET=1` the same
kernels run on a CPU, which is how they are tested without a GPU.
"""
import functools
import math

import torch
from torch import Tensor

TARGET_BLOCKS = 264  # thread blocks to aim for (about two per SM of an H100/H200)
MIN_PIECE = 256  # keys per piece at least: shorter pieces cost more in merging than they gain
HEAD_DIMS = (16, 32, 64, 128, 256)  # head sizes the kernels take (tl.arange needs a power of two)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BLOCK_M = 128  # query rows per thread block at most (the float32 accumulator lives in registers)
STAGES = 3  # software pipelining depth of the key loop (2 and 4 measured no better)


@functools.cache
def _kernels():
    """The kernels module, imported on first use (Triton takes a while to import), or None without Triton."""
    try:
        from hcache_adapter import flash_decoding_kernels
    except ImportError:  # the CPU wheel of torch comes without Triton
        return None
    return flash_decoding_kernels


def available(query: Tensor) -> bool:
    """Triton is importable and `query` is on a GPU (the interpreter runs the kernels on a CPU too, but only
    tests call them there: interpreted, they are far slower than the math they replace)."""
    return query.is_cuda and _kernels() is not None


def supports(query: Tensor, key: Tensor, value: Tensor, bias: Tensor) -> bool:
    """Shapes and dtypes the kernels take: batch 1, grouped heads, a power-of-two head size, a 2D bias."""
    return (query.dim() == 4 and query.shape[0] == 1 and key.shape[0] == 1 and value.shape == key.shape
            and query.shape[1] % key.shape[1] == 0 and query.shape[-1] == key.shape[-1] in HEAD_DIMS
            and query.dtype == key.dtype == value.dtype and query.dtype in DTYPES
            and key.stride(-1) == 1 and value.stride(-1) == 1 and query.stride(-1) == 1
            and bias.dim() == 2 and bias.shape[0] == query.shape[2] and bias.shape[1] >= key.shape[2])


def blocks_for(rows: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for `rows` query rows per K/V head (in blocks of at most MAX_BLOCK_M).

    Swept on the lent H200 at the 4K bucket (32 layers, 5,120 keys, 928 of them padding): 32 rows (the 7B
    shape) 1.19 ms with 128-key blocks and 4 warps (64-key blocks: 1.46); 128 rows (the 8B shape's 4 query
    heads per K/V head) 1.00 ms with 64-key blocks and 8 warps (32-key blocks, 8 warps: 1.18). Wider heads
    take 32-key blocks (not measured)."""
    block_m = min(MAX_BLOCK_M, max(16, 1 << (max(rows, 1) - 1).bit_length()))  # more rows: more row blocks
    if dim > 128:  # (256: Gemma) keep STAGES blocks of K and V within shared memory
        return block_m, 32, 8
    if block_m <= 32:
        return block_m, 128, 4
    return block_m, 64, 8


def pieces_for(n_keys: int, kv_heads: int, block_n: int, target_blocks: int = TARGET_BLOCKS) -> tuple[int, int]:
    """(pieces, keys per piece): enough pieces to fill the GPU (`target_blocks` thread blocks), each a
    multiple of `block_n` keys and at least MIN_PIECE long."""
    want = max(1, min(-(-target_blocks // kv_heads), n_keys // MIN_PIECE))
    per = -(-n_keys // want)
    per = -(-per // block_n) * block_n
    return -(-n_keys // per), per


def attend(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float, *, block_n: int | None = None,
           num_warps: int | None = None, num_stages: int | None = None, target_blocks: int = TARGET_BLOCKS) -> Tensor:
    """softmax(q k^T * scale + bias) v: query [1, H, M, D], key/value [1, Hkv, N, D] (grouped as
    transformers repeats K/V), bias [M, >= N] additive -> [1, M, H, D] (the attention module's layout).
    The keyword arguments override the tiling `blocks_for` and `pieces_for` choose (how they are tuned)."""
    kernels = _kernels()
    _, H, M, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    G = H // Hkv
    rows = G * M
    block_m, block_n_auto, warps = blocks_for(rows, D)
    block_n, warps = block_n or block_n_auto, num_warps or warps
    S, P = pieces_for(N, Hkv, block_n, target_blocks)
    part = torch.empty(S, Hkv, rows, D, device=query.device, dtype=torch.float32)
    lse = torch.empty(S, Hkv, rows, device=query.device, dtype=torch.float32)
    kernels.pieces_kernel[(S, Hkv, -(-rows // block_m))](
        query, key, value, bias, part, lse,
        query.stride(1), query.stride(2), key.stride(1), key.stride(2), value.stride(1), value.stride(2),
        bias.stride(0), bias.stride(1), part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
        lse.stride(1), G, M, N, P, scale / math.log(2.0),
        BLOCK_M=block_m, BLOCK_N=block_n, D=D, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=num_stages or STAGES)
    out = torch.empty(1, M, H, D, device=query.device, dtype=query.dtype)
    merge_rows = 16
    kernels.merge_kernel[(Hkv, -(-rows // merge_rows))](
        part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(1), out.stride(2), S, G, M, BLOCK_R=merge_rows, D=D, num_warps=4)
    return out
