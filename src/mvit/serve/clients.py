"""Requests in flight per client address: one client cannot hold every upload slot.

Without it, a client that opens many connections and stalls each mid-body holds the whole queue
(`--max-queue`) until the body timeout, and everyone else gets 503. Above the limit a request is
refused at once with 429 and Retry-After, before it takes a place in the queue. Behind a reverse
proxy on this machine the address is the proxy's `X-Forwarded-For` (uvicorn's proxy headers).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.requests import Request

from mvit.serve.uploads import ApiError

RETRY_AFTER_S = 1  # a client at its limit waits for one of its own requests, which takes about this


class ClientSlots:
    """Counts each address's requests in flight (the event loop's thread only: no lock needed)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: Counter[str] = Counter()

    @contextmanager
    def held(self, request: Request) -> Iterator[None]:
        address = request.client.host if request.client is not None else "unknown"
        if self.in_flight[address] >= self.limit:
            raise ApiError(429, f"this client already has {self.limit} requests in flight, the most one client may; "
                                f"wait for their answers, then send more", {"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight[address] += 1
        try:
            yield
        finally:
            self.in_flight[address] -= 1
            if not self.in_flight[address]:
                del self.in_flight[address]
