"""The Triton kernels of `flash_decoding` (imported only where Triton is)."""
import triton
import triton.language as tl

SKIP_BELOW = -1.0e4  # a key block whose every bias is below this is skipped (transformers masks with finfo.min)
_SKIP = tl.constexpr(SKIP_BELOW)


@triton.jit
def pieces_kernel(Q, K, V, B, O, L,
                  sq_h, sq_m, sk_h, sk_n, sv_h, sv_n, sb_m, sb_n, so_s, so_h, so_r, sl_s, sl_h,
                  G, M, N, P, scale_log2,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """One (piece, K/V head, block of rows): its keys [s*P, s*P + P) against BLOCK_M of the head's G*M query
    rows; writes the rows' normalised output and log2-sum-exp (-inf for a row that saw no key)."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_N)
    live = rows < G * M
    head = h * G + rows // M  # row r is query head h*G + r // M at position r % M
    pos = rows % M
    q = tl.load(Q + head[:, None] * sq_h + pos[:, None] * sq_m + dims[None, :], mask=live[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    start = s * P
    end = tl.minimum(start + P, N)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + cols
        jlive = j < end
        b = tl.load(B + pos[:, None] * sb_m + j[None, :] * sb_n, mask=live[:, None] & jlive[None, :],
                    other=float("-inf")).to(tl.float32)
        b = tl.maximum(b, -1.0e30)  # finfo(float32).min in log2 units would overflow to -inf
        if tl.max(tl.max(b, 1), 0) > _SKIP:
            k = tl.load(K + h * sk_h + j[:, None] * sk_n + dims[None, :], mask=jlive[:, None], other=0.0)
            v = tl.load(V + h * sv_h + j[:, None] * sv_n + dims[None, :], mask=jlive[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + b * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(O + s * so_s + h * so_h + rows[:, None] * so_r + dims[None, :], out, mask=live[:, None])
    tl.store(L + s * sl_s + h * sl_h + rows, lse, mask=live)


@triton.jit
def merge_kernel(O, L, Out, so_s, so_h, so_r, sl_s, sl_h, sout_m, sout_h, S, G, M,
              BLOCK_R: tl.constexpr, D: tl.constexpr):
    """The pieces' outputs of one K/V head's block of rows, weighted by their sums, into [1, M, H, D]."""
    h = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, D)
    live = rows < G * M
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(0, S):
        top = tl.maximum(top, tl.load(L + s * sl_s + h * sl_h + rows, mask=live, other=float("-inf")))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for s in range(0, S):
        w = tl.exp2(tl.load(L + s * sl_s + h * sl_h + rows, mask=live, other=float("-inf")) - top_safe)
        o = tl.load(O + s * so_s + h * so_h + rows[:, None] * so_r + dims[None, :], mask=live[:, None], other=0.0)
        total += w
        acc += w[:, None] * o
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    head = h * G + rows // M
    pos = rows % M
    tl.store(Out + pos[:, None] * sout_m + head[:, None] * sout_h + dims[None, :],
             out.to(Out.dtype.element_ty), mask=live[:, None])

