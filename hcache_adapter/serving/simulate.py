"""The replay: one serving loop, one batch at a time, every batch run for real, on a virtual clock.

How time is kept, and why. On one GPU with transformers' generate(), a server
is a single loop: take the requests waiting (FCFS, batched), run them to the
end, repeat. Run in real time, a replay waits for each arrival, so a trace of
N requests at rate r takes N / r seconds of mostly idle GPU whatever the
method; timing each request alone and queueing on paper would miss what
batching and GPU hits do to service times. So each batch runs for real and its
wall time (device synchronised) is measured, but the clock is virtual: when
the loop would wait for the next arrival it jumps there instead. For a loop
that never overlaps batches the two clocks give the same timeline; the one
difference is that background threads (the store's NVMe flusher) get no idle
time to work in, which if anything counts against the methods that save.

What a request sees. TTFT = its first token - its arrival (queueing
included); a conversation's next turn cannot arrive before the previous answer
is complete, so its arrival is the later of the trace's time and that. TBT is
the mean gap between its own tokens. Batches are static (generate() runs a
batch until its longest answer is done; a row that is done early leaves its
answer as complete at its last token but the server is busy until the batch
ends).

Abbreviated decoding. A 7B model decodes at tens of ms per step through
transformers; ShareGPT's answers average 338 tokens. At most `max_new_tokens`
of an answer are generated; the rest of its trace length is filler carried
into the conversation's next prompt, so contexts grow as the trace says (what
restoring is about) at the price of a longer prefill of new tokens next turn,
the same for every method (it dilutes their differences, never favours one).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hcache_adapter.serving.trace import Request, Trace, filler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    max_batch: int = 8  # requests per batch
    max_batch_tokens: int = 32768  # rows x columns of a left-padded batch
    max_new_tokens: int = 16  # generated per answer (the rest is carried, see above)
    pad_token_id: int = 0
    vocab: int = 32000

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_batch_tokens", "max_new_tokens", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass
class RequestRecord:
    rid: int
    session: int
    turn: int
    reuses_context: bool
    arrival_s: float  # effective: not before the previous answer of its conversation was complete
    start_s: float  # its batch began
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    new_tokens: int  # what the request added after its session's context (with carried answer tail)
    generated: int
    batch_size: int
    tbt_s: float

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


class StepTimer(BaseStreamer):
    """Wall time of every decoding step: generate() pushes the prompt, then each step's tokens (on the host)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.steps.append(time.perf_counter())

    def end(self) -> None:
        pass


class RowLimits(StoppingCriteria):
    """Each row stops at its own length (answers of one batch differ in length)."""

    def __init__(self, limits: torch.Tensor):
        self.limits = limits

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.limits.device != input_ids.device:
            self.limits = self.limits.to(input_ids.device)
        return input_ids.shape[1] >= self.limits


class _Sessions:
    """What each session holds when its next request is served: context, answer tail carried, turns done."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.history = {sid: tuple(s.context) for sid, s in trace.sessions.items()}
        self.carry: dict[int, tuple[int, ...]] = {sid: () for sid in trace.sessions}
        self.done = {sid: 0 for sid in trace.sessions}
        self.ready_at = {sid: 0.0 for sid in trace.sessions}

    def grows(self, sid: int) -> bool:
        return self.trace.sessions[sid].grows

    def eligible(self, r: Request) -> bool:
        return not self.grows(r.session) or self.done[r.session] == r.turn

    def prompt(self, r: Request) -> tuple[tuple[int, ...], int]:
        """(prompt tokens, how many of them are new to the session)."""
        new = self.carry[r.session] + r.new_tokens if self.grows(r.session) else r.new_tokens
        return self.history[r.session] + new, len(new)

    def answered(self, r: Request, prompt: tuple[int, ...], generated: list[int], finish: float, vocab: int) -> None:
        sid = r.session
        self.done[sid] += 1
        if self.grows(sid):
            self.history[sid] = prompt + tuple(generated)
            self.carry[sid] = filler(r.rid, max(0, r.output_tokens - len(generated)), vocab)
            self.ready_at[sid] = finish


def replay(trace: Trace, generate: Callable, cfg: ServerConfig, device: torch.device,
           progress: Callable[[int], None] = lambda n: None) -> list[RequestRecord]:
    """Serve `trace` (arrival times set) through `generate` (hc.generate or model.generate): one record per request."""
    sessions = _Sessions(trace)
    pending = list(trace.requests)  # in arrival order
    queue: list[Request] = []
    records: list[RequestRecord] = []
    now = 0.0
    while pending or queue:
        while pending and pending[0].arrival_s <= now:
            queue.append(pending.pop(0))
        batch = _next_batch(queue, sessions, cfg)
        if not batch:
            if not pending:
                raise RuntimeError("replay: requests wait on turns that never come")
            now = max(now, pending[0].arrival_s)
            continue
        for r in batch:
            queue.remove(r)
        served, wall = _serve(batch, sessions, generate, cfg, device, now)
        records += served
        now += wall  # the server is busy until the batch ends, whoever finished first
        progress(len(batch))
    return records


def _next_batch(queue: list[Request], sessions: _Sessions, cfg: ServerConfig) -> list[Request]:
    """FCFS: the oldest eligible request, then later ones while the batch has room."""
    batch: list[Request] = []
    in_batch: set[int] = set()
    width = 0
    for r in queue:
        if not sessions.eligible(r) or (sessions.grows(r.session) and r.session in in_batch):
            continue
        n = len(sessions.prompt(r)[0])
        w = max(width, n)
        if batch and w * (len(batch) + 1) > cfg.max_batch_tokens:
            continue
        batch.append(r)
        in_batch.add(r.session)
        width = w
        if len(batch) == cfg.max_batch:
            break
    return batch


def _serve(batch: list[Request], sessions: _Sessions, generate: Callable, cfg: ServerConfig, device: torch.device,
           now: float) -> tuple[list[RequestRecord], float]:
    """Run one batch for real: its requests' records and its wall time."""
    prompts = [sessions.prompt(r) for r in batch]
    T = max(len(p) for p, _ in prompts)
    B = len(batch)
    ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (p, _) in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    n_out = [min(r.output_tokens, cfg.max_new_tokens) for r in batch]
    new = max(n_out)
    timer = StepTimer()
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=cfg.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([RowLimits(torch.tensor([T + n for n in n_out]))]),
                  streamer=timer)
    if B > 1:
        kwargs["attention_mask"] = mask.to(device)
    _sync(device)
    t0 = time.perf_counter()
    out = generate(ids.to(device), **kwargs)
    _sync(device)
    wall = time.perf_counter() - t0
    seqs = getattr(out, "sequences", out).tolist()
    steps = [s - t0 for s in timer.steps] or [wall]
    records = []
    for b, (r, (prompt, n_new)) in enumerate(zip(batch, prompts)):
        n = max(1, min(n_out[b], len(steps)))
        first, last = steps[0], steps[n - 1]
        generated = seqs[b][T: T + n_out[b]]
        arrival = max(r.arrival_s, sessions.ready_at[r.session])
        tbt = (last - first) / (n - 1) if n > 1 else float("nan")
        rec = RequestRecord(r.rid, r.session, r.turn, r.reuses_context, arrival, now, now + first, now + last,
                            len(prompt), n_new, len(generated), B, tbt)
        records.append(rec)
        sessions.answered(r, prompt, generated, rec.finish_s, cfg.vocab)
    return records, wall


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
