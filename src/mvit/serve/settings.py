"""What `mvit serve` is started with: where it listens, who may call it, and the limits that keep one
process answering under hostile or heavy use. Validated once, before the model is loaded.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mvit.runtime.precision import PRECISIONS

TOKEN_ENV = "MVIT_SERVE_TOKEN"  # the token, when not given as --token (which other users can see in `ps`)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MIN_TOKEN_LENGTH = 16

MiB = 1024 * 1024


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class ServeSettings(BaseModel):
    """The server's options; the CLI's flags map one to one onto these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Optional[Path] = None  # None: the model bundled with mvit
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    token: Optional[str] = Field(None, repr=False)  # never printed, never logged
    device: str = "auto"
    precision: str = "auto"
    workers: int = Field(1, ge=1, le=64)  # processes, each with its own copy of the model
    # dynamic batching: a batch runs when it holds max_batch images or its first image has waited max_wait_ms
    max_batch: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    # admission: images accepted and not yet answered; above this a request gets 503 and Retry-After
    max_queue: int = Field(128, ge=1)
    max_upload_bytes: int = Field(32 * MiB, ge=1024)  # one request's body (413 above)
    max_images: int = Field(64, ge=1)  # files in one /v1/predict request
    # a body not complete within this many seconds gets 408 and frees its place in the queue (slow-loris)
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    max_client_requests: int = Field(16, ge=1)  # upload requests in flight per client address (429 above)
    max_pixels: int = Field(50_000_000, ge=1)  # per image, read from its header before decoding (413 above)
    decode_threads: int = Field(2, ge=1, le=64)  # images decoded at once: bounds the memory decoding takes
    model_threads: int = Field(0, ge=0, le=64)  # threads running batches; 0: two on a CPU (two cores or more), one on a GPU
    root_path: str = ""  # the path prefix a reverse proxy serves mvit under
    allowed_hosts: tuple[str, ...] = ()  # Host headers accepted; empty: the loopback names when on loopback, else any

    @model_validator(mode="after")
    def _checked(self) -> "ServeSettings":
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"a token has at least {MIN_TOKEN_LENGTH} characters, so that it cannot be guessed; "
                             "make one with: python -c 'import secrets; print(secrets.token_urlsafe())'")
        if not is_loopback(self.host) and self.token is None:
            raise ValueError(
                f"serving on {self.host} lets other machines call mvit, so it needs a token: "
                f"set {TOKEN_ENV} (or pass --token) to {MIN_TOKEN_LENGTH} characters or more, or serve on 127.0.0.1"
            )
        if self.max_batch > self.max_queue:
            raise ValueError(f"a batch (--max-batch {self.max_batch}) cannot be larger than the queue (--max-queue {self.max_queue})")
        return self

    @property
    def trusted_hosts(self) -> list[str]:
        """The Host headers to accept. On loopback only the loopback names: a web page elsewhere that
        rebinds its own domain name to 127.0.0.1 (DNS rebinding) then cannot read mvit's answers."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        return [*LOOPBACK_NAMES, "[::1]"] if is_loopback(self.host) else ["*"]

