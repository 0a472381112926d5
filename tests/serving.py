"""A real `mvit serve` process on a free loopback port, for the API, page and load tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

from conftest import SHARED_DATA



def real_images(count: int) -> list[Path]:
    """`count` real dermoscopic JPEGs from ../shared/data (HAM10000), or [] where it is absent."""
    folder = SHARED_DATA / "ham10000" / "HAM10000_images_part_1"
    return sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path  # the server's stderr
    token: Optional[str] = None
    _client: Optional[httpx.Client] = field(default=None, repr=False)

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._client = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        return self._client

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait for it to exit; its exit status."""
        if self._client is not None:
            self._client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def start_server(*args: str, log: Path, env: Optional[dict] = None, token: Optional[str] = None, timeout: float = 120,
                 cwd: Optional[Path] = None) -> Server:
    """`mvit serve --port 0 ARGS` (in folder `cwd`) started and answering /healthz; its URL read from what it prints."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    stream = open(log, "w")
    process = subprocess.Popen([sys.executable, "-m", "mvit", "serve", "--port", "0", *args],
                               stdout=subprocess.DEVNULL, stderr=stream, env=full_env, cwd=cwd)
    stream.close()
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mvit serve exited with {process.returncode}:\n{log.read_text()}")
        if url is None:
            found = re.search(r"on (http://[^/\s]+)", log.read_text())
            url = found.group(1) if found else None
        if url is not None:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    return Server(process, url, log, token)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"mvit serve did not answer within {timeout} s:\n{log.read_text()}")
