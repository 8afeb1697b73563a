"""Synthetic request traces from published statistics (no data set is downloaded).

Two workloads, the paper's two (HCache, EuroSys'25, evaluates on ShareGPT4 and L-Eval):

* **chat** (ShareGPT-like multi-round conversations). Turns per conversation:
  27% single-turn (CachedAttention, Gao et al., USENIX ATC'24: "73% of
  conversations in ShareGPT are multi-turn"), mean 3.51 turns (ShareChat, Yan
  et al., arXiv 2512.17843, Table 1: 330,239 turns in 94,145 ShareGPT
  conversations); the multi-turn ones are 2 + a geometric number of turns
  with the mean that gives 3.51 overall, capped at 20 turns. Lengths per turn:
  log-normal with ShareGPT's mean input 161.31 and mean output 337.99 tokens
  (vLLM, Kwon et al., SOSP'23, Fig. 11); the papers give means, not shapes,
  so the spread (sigma 1.0) is ours. A turn's prompt is the conversation so
  far (every earlier prompt and answer) plus the new user tokens.
* **doc** (L-Eval-like long-document QA). Documents of 4K-16K tokens (log-uniform;
  L-Eval's span 3K-200K, the range the issue asks for), each asked about 4
  times on average (L-Eval, An et al., ACL'24: 2,000+ queries over 508
  documents): 1 + Poisson(3) questions. Questions and answers are short; their
  lengths (means 48 and 96 tokens) are ours. A question's prompt is its
  document plus the question; questions on one document share its state.

Arrivals are a Poisson process of `rate` requests/s over the whole trace. Each
arrival is the next turn (or question) of one of `active` open conversations
(documents), picked at random; a finished one is replaced by a new one. So the
number of contexts competing for the GPU is `active` whatever the rate, and
the rate sets only how fast they come. The content (sessions, order, lengths,
tokens) depends on the seed alone; `at_rate` lays the same requests on a
time axis, so every method and rate serves the same requests.

Tokens are random ids (random weights do not care what they mean).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

CHAT_SOURCES = ("multi-turn share: CachedAttention (Gao et al., USENIX ATC'24); mean turns: ShareChat (Yan et al., "
                "arXiv 2512.17843, Table 1, ShareGPT row); mean input/output tokens: vLLM (Kwon et al., SOSP'23, "
                "Fig. 11, ShareGPT)")
DOC_SOURCES = ("questions per document and length range: L-Eval (An et al., ACL'24: 20 sub-tasks, 508 documents, "
               "2,000+ queries, 3K-200K tokens), restricted to 4K-16K tokens")


@dataclass(frozen=True)
class ChatStats:
    multi_turn_share: float = 0.73
    mean_turns: float = 3.51
    max_turns: int = 20
    mean_input: float = 161.31
    mean_output: float = 337.99
    sigma: float = 1.0
    max_input: int = 2048
    max_output: int = 2048


@dataclass(frozen=True)
class DocStats:
    min_tokens: int = 4096
    max_tokens: int = 16384
    mean_questions: float = 4.0
    mean_question: float = 48.0
    mean_output: float = 96.0
    sigma: float = 0.6


@dataclass(frozen=True)
class Session:
    """A conversation (`grows`: each turn's prompt and answer join the context) or a document (fixed)."""

    sid: int
    context: tuple[int, ...] = ()
    grows: bool = True


@dataclass(frozen=True)
class Request:
    rid: int
    session: int
    turn: int  # 0 for a session's first request
    arrival_s: float
    new_tokens: tuple[int, ...]  # what the request adds after its session's context
    output_tokens: int  # the answer's length in the trace

    @property
    def reuses_context(self) -> bool:
        """Whether an earlier request left context this one starts with."""
        return self.turn > 0


@dataclass(frozen=True)
class Trace:
    name: str
    sessions: dict[int, Session]
    requests: tuple[Request, ...]  # in arrival order
    sources: str = ""
    rate: float = 0.0
    params: dict = field(default_factory=dict)

    def at_rate(self, rate: float, seed: int) -> "Trace":
        """The same requests, arriving as a Poisson process of `rate` per second."""
        if rate <= 0:
            raise ValueError("rate must be > 0 requests/s")
        rng = random.Random(seed * 7919 + 17)
        t, reqs = 0.0, []
        for r in self.requests:
            t += rng.expovariate(rate)
            reqs.append(replace(r, arrival_s=t))
        return replace(self, requests=tuple(reqs), rate=rate)

    def context_tokens(self) -> int:
        """Tokens of every session's largest context (prompts and answers included): what 'everything fits' means."""
        total = 0
        for sid, s in self.sessions.items():
            reqs = [r for r in self.requests if r.session == sid]
            if s.grows:
                total += sum(len(r.new_tokens) + r.output_tokens for r in reqs)
            else:
                total += len(s.context) + max((len(r.new_tokens) + r.output_tokens for r in reqs), default=0)
        return total


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(max(mean, 1e-9)) - sigma * sigma / 2  # E[exp(N(mu, sigma))] = mean
    return int(min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))))


def _tokens(rng: random.Random, n: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(3, vocab) for _ in range(n))


def _turns(rng: random.Random, s: ChatStats) -> int:
    if rng.random() >= s.multi_turn_share:
        return 1
    extra = (s.mean_turns - (1 - s.multi_turn_share)) / s.multi_turn_share - 2  # mean of the geometric part
    p = 1 / (1 + max(extra, 1e-9))
    n = 2
    while n < s.max_turns and rng.random() >= p:
        n += 1
    return n


def _interleave(rng: random.Random, per_session: list[list[tuple]], active: int, n_requests: int):
    """Deal session turns to arrivals: each arrival is the next turn of a random open session."""
    out, open_, upcoming = [], [], list(range(len(per_session)))
    while len(out) < n_requests and (open_ or upcoming):
        while len(open_) < active and upcoming:
            open_.append([upcoming.pop(0), 0])
        i = rng.randrange(len(open_))
        sid, k = open_[i]
        out.append((sid, k, per_session[sid][k]))
        open_[i][1] += 1
        if open_[i][1] == len(per_session[sid]):
            open_.pop(i)
    return out


def chat_trace(n_requests: int, *, seed: int, vocab: int, active: int = 8, stats: ChatStats = ChatStats(),
               scale: float = 1.0) -> Trace:
    """`n_requests` ShareGPT-like turns of interleaved conversations (`scale` shrinks every length)."""
    rng = random.Random(seed)
    per_session: list[list[tuple]] = []
    while sum(len(t) for t in per_session) < n_requests + active * stats.max_turns:
        turns = []
        for _ in range(_turns(rng, stats)):
            n_in = _lognormal(rng, stats.mean_input * scale, stats.sigma, 1, max(1, int(stats.max_input * scale)))
            n_out = _lognormal(rng, stats.mean_output * scale, stats.sigma, 1, max(1, int(stats.max_output * scale)))
            turns.append((_tokens(rng, n_in, vocab), n_out))
        per_session.append(turns)
        if len(per_session) > 10 * n_requests + 100:
            break
    dealt = _interleave(rng, per_session, active, n_requests)
    used = sorted({sid for sid, _, _ in dealt})
    sessions = {sid: Session(sid) for sid in used}
    reqs = tuple(Request(i, sid, k, 0.0, toks, n_out) for i, (sid, k, (toks, n_out)) in enumerate(dealt))
    return Trace("chat", sessions, reqs, CHAT_SOURCES, params=dict(stats=stats, active=active, scale=scale))


def doc_trace(n_requests: int, *, seed: int, vocab: int, active: int = 2, stats: DocStats = DocStats(),
              scale: float = 1.0) -> Trace:
    """`n_requests` L-Eval-like questions over documents of 4K-16K tokens (`scale` shrinks every length)."""
    rng = random.Random(seed + 1)
    docs: list[tuple[tuple[int, ...], list[tuple]]] = []
    while sum(len(q) for _, q in docs) < n_requests + active * 8:
        lo, hi = math.log(stats.min_tokens * scale), math.log(stats.max_tokens * scale)
        n_doc = max(1, int(round(math.exp(rng.uniform(lo, hi)))))
        questions = []
        for _ in range(1 + _poisson(rng, stats.mean_questions - 1)):
            n_q = _lognormal(rng, stats.mean_question * scale, stats.sigma, 1, 4096)
            n_out = _lognormal(rng, stats.mean_output * scale, stats.sigma, 1, 4096)
            questions.append((_tokens(rng, n_q, vocab), n_out))
        docs.append((_tokens(rng, n_doc, vocab), questions))
    dealt = _interleave(rng, [q for _, q in docs], active, n_requests)
    sessions = {sid: Session(sid, docs[sid][0], grows=False) for sid in sorted({sid for sid, _, _ in dealt})}
    reqs = tuple(Request(i, sid, k, 0.0, toks, n_out) for i, (sid, k, (toks, n_out)) in enumerate(dealt))
    return Trace("doc", sessions, reqs, DOC_SOURCES, params=dict(stats=stats, active=active, scale=scale))


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    k, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def filler(seed: int, n: int, vocab: int) -> tuple[int, ...]:
    """The part of an answer the server did not generate (see simulate): fixed by the request, not the method."""
    return _tokens(random.Random(seed * 104729 + 3), n, vocab)
