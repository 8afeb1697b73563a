"""cffi (API mode) builder for `hstore.io._uring`, the io_uring binding.

Why a C layer at all: a batch of reads for one tensor can be thousands of ops,
and per-op Python (one SQE, one CQE, one call each) would cost more than the
I/O. So Python packs a whole batch into two flat int64 arrays and makes ONE
call, `hs_run`, which keeps up to `depth` ops in flight, retries EINTR/EAGAIN
and short transfers, and records every op's outcome. cffi releases the GIL for
the call, so other Python threads run while the ring waits on the device.

Built by setup.py (`cffi_modules`) only where liburing's header exists:
    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace      # fallback: puts the .so next to this file
"""
from __future__ import annotations

import cffi

# The interface Python sees. Every hs_op field is 64-bit so Python fills a batch
# from one array('q') without touching cffi per field; iovecs are likewise a flat
# array('q') of (address, length) pairs viewed as `struct iovec[]`.
CDEF = """
struct iovec { void *iov_base; size_t iov_len; };

struct hs_op {
    int64_t fd;
    int64_t write;      /* 0: readv, else writev */
    int64_t offset;     /* file offset of the first byte */
    int64_t iov_first;  /* index of the op's first iovec in the batch's iovec array */
    int64_t nr_iov;
    int64_t result;     /* out: bytes transferred (short only at EOF), or -errno */
};

struct hs_ring;

int hs_ring_open(struct hs_ring **out, unsigned depth);
void hs_ring_close(struct hs_ring *ring);
int hs_run(struct hs_ring *ring, struct hs_op *ops, unsigned n,
           const struct iovec *iovs, unsigned niov);
"""

SOURCE = r"""
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <liburing.h>

struct hs_op {
    int64_t fd;
    int64_t write;
    int64_t offset;
    int64_t iov_first;
    int64_t nr_iov;
    int64_t result;
};

/* Python packs iovecs as int64 (address, length) pairs and ops as six int64. */
_Static_assert(sizeof(struct iovec) == 16, "struct iovec must be two 64-bit words");
_Static_assert(sizeof(struct hs_op) == 48, "struct hs_op must be six int64");

/* Consecutive EINTR/EAGAIN results (per op) or enter() stalls (per batch)
   after which we report the errno instead of spinning forever. */
#define HS_MAX_RETRIES 1000

/* One in-flight op. `iov` points into the caller's array until a short
   transfer forces us to advance it; it is copied into `own` first, so the
   caller's array is never modified. */
struct hs_slot {
    unsigned op;
    unsigned nr_iov;
    struct iovec *iov;
    int owned;
    struct iovec *own;
    unsigned own_cap;
    int64_t done;
    int64_t total;
    unsigned retries;
};

struct hs_ring {
    struct io_uring ring;
    unsigned depth;
    struct hs_slot *slots;
    unsigned *free_slots;
    unsigned nfree;
    int broken;  /* a ring-level failure left SQEs behind: never submit again */
};

int hs_ring_open(struct hs_ring **out, unsigned depth)
{
    struct hs_ring *r;
    int ret;

    *out = NULL;
    if (depth == 0)
        return -EINVAL;
    r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->slots = calloc(depth, sizeof(*r->slots));
    r->free_slots = calloc(depth, sizeof(*r->free_slots));
    if (!r->slots || !r->free_slots) {
        ret = -ENOMEM;
        goto fail;
    }
    /* Rings are per thread, so the kernel may skip cross-task wakeups.
       Kernels older than 6.0 reject these flags: fall back to none. */
    ret = io_uring_queue_init(depth, &r->ring,
                              IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN);
    if (ret == -EINVAL)
        ret = io_uring_queue_init(depth, &r->ring, 0);
    if (ret < 0)
        goto fail;
    r->depth = depth;
    for (unsigned i = 0; i < depth; i++)
        r->free_slots[i] = depth - 1 - i;
    r->nfree = depth;
    *out = r;
    return 0;
fail:
    free(r->slots);
    free(r->free_slots);
    free(r);
    return ret;
}

void hs_ring_close(struct hs_ring *r)
{
    if (!r)
        return;
    io_uring_queue_exit(&r->ring);
    for (unsigned i = 0; i < r->depth; i++)
        free(r->slots[i].own);
    free(r->slots);
    free(r->free_slots);
    free(r);
}

/* Queue (or re-queue) what is left of a slot's op. 0, or -EBUSY without an SQE. */
static int queue_slot(struct hs_ring *r, unsigned idx, const struct hs_op *op)
{
    struct hs_slot *s = &r->slots[idx];
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    uint64_t offset = (uint64_t)(op->offset + s->done);

    if (!sqe) {
        /* Cannot happen while in-flight ops <= depth <= SQ size; be safe anyway. */
        io_uring_submit(&r->ring);
        sqe = io_uring_get_sqe(&r->ring);
        if (!sqe)
            return -EBUSY;
    }
    if (op->write)
        io_uring_prep_writev(sqe, (int)op->fd, s->iov, s->nr_iov, offset);
    else
        io_uring_prep_readv(sqe, (int)op->fd, s->iov, s->nr_iov, offset);
    io_uring_sqe_set_data64(sqe, idx);
    return 0;
}

/* Drop the first `n` bytes of a slot's iovecs after a short transfer. */
static int advance_slot(struct hs_slot *s, int64_t n)
{
    if (!s->owned) {
        if (s->own_cap < s->nr_iov) {
            struct iovec *p = realloc(s->own, s->nr_iov * sizeof(*p));
            if (!p)
                return -ENOMEM;
            s->own = p;
            s->own_cap = s->nr_iov;
        }
        memcpy(s->own, s->iov, s->nr_iov * sizeof(*s->own));
        s->iov = s->own;
        s->owned = 1;
    }
    while (s->nr_iov && (int64_t)s->iov[0].iov_len <= n) {
        n -= (int64_t)s->iov[0].iov_len;
        s->iov++;
        s->nr_iov--;
    }
    if (s->nr_iov && n) {
        s->iov[0].iov_base = (char *)s->iov[0].iov_base + n;
        s->iov[0].iov_len -= (size_t)n;
    }
    return 0;
}

/* Validate an op and sum its lengths: 0 and *total, or -errno. */
static int check_op(const struct hs_op *op, const struct iovec *iovs, unsigned niov,
                    int64_t *total)
{
    int64_t sum = 0;

    if (op->fd < 0 || op->fd > INT_MAX)
        return -EBADF;
    if (op->offset < 0 || op->nr_iov < 0 || op->iov_first < 0 ||
        op->nr_iov > (int64_t)niov || op->iov_first > (int64_t)niov - op->nr_iov)
        return -EINVAL;
    for (int64_t i = op->iov_first; i < op->iov_first + op->nr_iov; i++) {
        int64_t len = (int64_t)iovs[i].iov_len;
        if (len < 0 || sum > INT64_MAX - len)
            return -EINVAL;
        sum += len;
    }
    *total = sum;
    return 0;
}

/* A ring-level failure: wait for what the kernel already holds (so it stops
   touching the caller's buffers before we return), then retire the ring. */
static int fail_ring(struct hs_ring *r, unsigned inflight, int err)
{
    unsigned in_kernel = inflight - io_uring_sq_ready(&r->ring);

    while (in_kernel) {
        struct io_uring_cqe *cqe;
        int ret = io_uring_wait_cqe(&r->ring, &cqe);
        if (ret == -EINTR)
            continue;
        if (ret < 0)
            break;
        io_uring_cqe_seen(&r->ring, cqe);
        in_kernel--;
    }
    r->broken = 1;
    return err;
}

int hs_run(struct hs_ring *r, struct hs_op *ops, unsigned n,
           const struct iovec *iovs, unsigned niov)
{
    unsigned next = 0, inflight = 0, finished = 0, stalls = 0;

    if (r->broken)
        return -EBADFD;
    while (finished < n) {
        /* Fill free slots with new ops; one submit below covers them all. */
        while (next < n && r->nfree) {
            struct hs_op *op = &ops[next];
            int64_t total = 0;
            int err = check_op(op, iovs, niov, &total);
            unsigned idx;
            struct hs_slot *s;

            if (err < 0 || total == 0) {
                op->result = err;
                next++;
                finished++;
                continue;
            }
            idx = r->free_slots[r->nfree - 1];
            s = &r->slots[idx];
            s->op = next;
            s->iov = (struct iovec *)&iovs[op->iov_first];  /* read-only until owned */
            s->nr_iov = (unsigned)op->nr_iov;
            s->owned = 0;
            s->done = 0;
            s->total = total;
            s->retries = 0;
            if (queue_slot(r, idx, op) < 0) {
                if (!inflight)
                    return fail_ring(r, 0, -EBUSY);
                break;
            }
            r->nfree--;
            next++;
            inflight++;
        }
        if (!inflight)
            continue;

        int ret = io_uring_submit_and_wait(&r->ring, 1);
        if (ret < 0) {
            if (ret == -EINTR)
                continue;
            if ((ret != -EAGAIN && ret != -EBUSY) || ++stalls >= HS_MAX_RETRIES)
                return fail_ring(r, inflight, ret);
            /* Out of kernel resources: let completions free some, then retry. */
            if (inflight > io_uring_sq_ready(&r->ring)) {
                struct io_uring_cqe *cqe;
                io_uring_wait_cqe(&r->ring, &cqe);
            } else {
                sched_yield();
            }
        } else {
            stalls = 0;
        }

        /* Reap every completion that is ready; requeue what must go again. */
        unsigned head, seen = 0;
        struct io_uring_cqe *cqe;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            unsigned idx = (unsigned)io_uring_cqe_get_data64(cqe);
            struct hs_slot *s = &r->slots[idx];
            struct hs_op *op = &ops[s->op];
            int res = cqe->res;
            int64_t result = 0;
            int again = 0;

            seen++;
            if (res == -EINTR || res == -EAGAIN) {
                again = ++s->retries < HS_MAX_RETRIES;
                result = res;
            } else if (res < 0) {
                result = res;                   /* a real error: never dropped */
            } else if (res == 0) {
                result = s->done;               /* end of file: short count */
            } else {
                s->done += res;
                s->retries = 0;
                result = s->done;
                if (s->done < s->total) {
                    int err = advance_slot(s, res);
                    if (err < 0)
                        result = err;
                    else
                        again = 1;
                }
            }
            if (again) {
                int err = queue_slot(r, idx, op);
                if (err == 0)
                    continue;
                result = err;
            }
            op->result = result;
            r->free_slots[r->nfree++] = idx;
            inflight--;
            finished++;
        }
        io_uring_cq_advance(&r->ring, seen);
    }
    return 0;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "hstore.io._uring",
    SOURCE,
    libraries=["uring"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
