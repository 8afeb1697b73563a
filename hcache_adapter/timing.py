"""Time to first token, measured inside generate() through its streamer hook.

generate() pushes the prompt, then each new token (already copied to the host,
so the GPU work that produced it is finished) to `streamer.put`; the second
push is the first generated token.
"""
from __future__ import annotations

import time

from transformers.generation.streamers import BaseStreamer


class FirstTokenTimer(BaseStreamer):
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self._pushes = 0

    def put(self, value) -> None:
        self._pushes += 1
        if self._pushes == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        if self.first_token_at is None:  # max_new_tokens=1: the only token ends generation
            self.first_token_at = time.perf_counter()

    @property
    def ttft_s(self) -> float:
        return (self.first_token_at or time.perf_counter()) - self.start
