"""`mvit serve` under load against offline `mvit predict` on the same real images, in one run.

Reads the first --images real dermoscopic JPEGs of ../shared/data (HAM10000 part 1; or
$MVIT_SHARED_DATA) into memory, once (they are under research-only terms: read where they are,
never copied), then:

1. offline: loads the same model in this process (not timed) and times `predict_stream` over the
   same files the way `mvit predict` runs it (batch 32, the decoding workers cli/predict.py chooses,
   every head, the same --precision), after one warm-up pass: --offline-repeats passes before the
   server starts and as many after it stops, so the two never compete for the cores and a busy
   neighbour or clock drift hits both; the best pass counts.
2. served: starts `python -m mvit serve --host 127.0.0.1 --port 0 --log-level warning [options]`,
   reads its URL from the line it prints on stderr, waits for GET /healthz (start-up not timed),
   and for each concurrency level c runs c clients: c coroutines on one asyncio loop sharing one
   httpx.AsyncClient of c connections (threads would take more of the 2 cores the server uses),
   each posting one image per request (multipart `images`, every head) to /v1/predict, round the
   image list, for --requests requests after an unrecorded warm-up of max(2c, 8). Each multipart
   body is encoded once, up front. A 503 is the designed overload answer and is counted apart; any
   other non-200 or a transport error is an error (goal 0). SIGTERM stops the server at the end,
   also on an error.

Prints per level images/s, p50 and p99 latency, 503s, errors, and the CPU the server, this client
and every other process on the machine took (from /proc: `others` well above 0% means a busy
neighbour, so rerun); then how many served labels differ from offline ones (batch composition moves
probabilities by ~1e-6: 0 or near it), the non-503 errors (goal 0), and last `ratio: N`, served
images/s at 8 clients / offline images/s (goal >= 0.8). The served level is one pass and the offline
rate the best of several, so the ratio errs low.

    .venv/bin/python bench/serve_load.py [--images 64] [--requests N] [--levels 1,8,64]
        [--max-batch 16] [--max-wait-ms 5] [--max-queue 128] [--workers 1] [--precision auto]
        [--model FILE] [--server-option=--flag=value ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it for `predict` and `serve` (cli/app.py, _runs_a_model)

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MVIT_SHARED_DATA") or ROOT.parent / "shared" / "data")
FOLDER = DATA / "ham10000" / "HAM10000_images_part_1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has taken since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # user nice system idle iowait irq softirq steal


def own_seconds() -> float:
    """CPU seconds of this process and its reaped children (the offline decoding workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# ---- the images -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    path: Path
    body: bytes  # the whole multipart request body, encoded once


BOUNDARY = "mvit-bench-boundary-7f3a9c"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_body(name: str, data: bytes) -> bytes:
    """One file in the field `images`; no `head` field: every head."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def read_images(count: int) -> list[Sample]:
    files = sorted(FOLDER.glob("*.jpg"))[:count] if FOLDER.is_dir() else []
    if not files:
        print(f"error: no real images under {FOLDER}; point MVIT_SHARED_DATA at the shared data folder", file=sys.stderr)
        raise SystemExit(2)
    return [Sample(path, multipart_body(path.name, path.read_bytes())) for path in files]


# ---- offline `mvit predict` ---------------------------------------------------------------------------


class Offline:
    """`predict_stream` over the files as `mvit predict` runs it: the same model file, batch 32, the
    decoding workers cli/predict.py chooses (loader_workers), every head; model loading not timed."""

    def __init__(self, images: list[Sample], model_path: Optional[str], precision: str):
        from mvit.runtime.options import loader_workers
        from mvit.core import model_file
        from mvit.infer.predict import DEFAULT_BATCH_SIZE

        self.model = model_file.load(model_path, device="cpu")
        self.files = [image.path for image in images]
        self.precision, self.batch_size = precision, DEFAULT_BATCH_SIZE
        self.workers = loader_workers(len(self.files), DEFAULT_BATCH_SIZE, self.model.device)
        self.seconds: list[float] = []  # each timed pass
        self.others: list[float] = []  # CPU other processes took during each timed pass, in cores
        self.labels = {(Path(str(p.image)).name, p.head): p.label for result in self._run() for p in result.predictions}  # and warm-up

    def _run(self) -> list:
        from mvit.infer.predict import predict_stream
        from mvit.runtime.options import RunOptions

        results = list(predict_stream(self.model, self.files, None,
                                      run=RunOptions(self.precision, self.batch_size, self.workers)))
        failed = [result.error for result in results if result.error is not None]
        assert not failed, failed
        return results

    def timed(self, repeats: int) -> None:
        for _ in range(repeats):
            busy, own, start = machine_busy_seconds(), own_seconds(), time.perf_counter()
            self._run()
            took = time.perf_counter() - start
            self.seconds.append(took)
            self.others.append(max(0.0, (machine_busy_seconds() - busy) - (own_seconds() - own)) / took)

    @property
    def rate(self) -> float:
        return len(self.files) / min(self.seconds)


# ---- the server ------------------------------------------------------------------------------------------


class Server:
    """`python -m mvit serve --port 0 ...` on loopback; its stderr drained by a thread."""

    def __init__(self, options: list[str], timeout: float = 180):
        command = [sys.executable, "-m", "mvit", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *options]
        self.command = command
        self.log: deque[str] = deque(maxlen=200)
        self.url: Optional[str] = None
        self._found = threading.Event()
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "COLUMNS": "300"})
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._found.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mvit serve {'exited' if self.process.returncode else 'did not start'}:\n" + "\n".join(self.log))
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mvit serve did not answer /healthz:\n" + "\n".join(self.log))
            time.sleep(0.1)

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if self.url is None:
                found = re.search(r" on (http://127\.0\.0\.1:\d+)/", line)
                if found:
                    self.url = found.group(1)
                    self._found.set()

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server and its worker processes so far (Linux /proc)."""
        total = 0.0
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        return total

    def stop(self) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# ---- the clients ------------------------------------------------------------------------------------------


@dataclass
class Level:
    clients: int
    requests: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, of the 200s
    statuses: dict[str, int] = field(default_factory=dict)  # "503", "500", "ConnectError", ...
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    others: float = 0.0  # CPU other processes on the machine took meanwhile
    labels: dict = field(default_factory=dict)  # (file name, head) -> label, from the answers

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def overloaded(self) -> int:
        return self.statuses.get("503", 0)

    @property
    def errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != "503")

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


async def _post(client: httpx.AsyncClient, image: Sample) -> tuple[str, float, Optional[list]]:
    start = time.perf_counter()
    try:
        answer = await client.post("/v1/predict", content=image.body, headers={"Content-Type": CONTENT_TYPE})
    except httpx.HTTPError as error:
        return type(error).__name__, time.perf_counter() - start, None
    took = time.perf_counter() - start
    return str(answer.status_code), took, answer.json() if answer.status_code == 200 else None


async def _load(url: str, images: list[Sample], clients: int, requests: int, warmup: int, level: Level, server: Server) -> None:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(300.0)) as client:
        async def worker(counter: list[int], total: int, record: bool) -> None:
            while counter[0] < total:
                index = counter[0]
                counter[0] += 1
                status, took, records = await _post(client, images[index % len(images)])
                if not record:
                    continue
                if status == "200":
                    level.latencies.append(took)
                    for found in records:
                        level.labels.setdefault((found["image"], found["head"]), found["label"])
                else:
                    level.statuses[status] = level.statuses.get(status, 0) + 1

        warm = [0]
        await asyncio.gather(*(worker(warm, warmup, False) for _ in range(clients)))  # connections open, batches warm
        counter = [0]
        busy, server_cpu, client_cpu = machine_busy_seconds(), server.cpu_seconds(), time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker(counter, requests, True) for _ in range(clients)))
        level.seconds = time.perf_counter() - start
        level.server_cpu, level.client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        level.others = max(0.0, machine_busy_seconds() - busy - level.server_cpu - level.client_cpu)


def run_level(server: Server, images: list[Sample], clients: int, requests: int) -> Level:
    level = Level(clients, requests)
    asyncio.run(_load(server.url, images, clients, requests, max(2 * clients, 8), level, server))
    return level


# ---- the report -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="real images, the first of HAM10000 part 1")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per level, one image each (default: max(3 x images, 8 x clients))")
    parser.add_argument("--levels", default="1,8,64", help="concurrent clients, comma-separated")
    parser.add_argument("--offline-repeats", type=int, default=2,
                        help="timed offline passes before the server starts and again after it stops; the best of all counts")
    parser.add_argument("--model", default=None, help="model file for both (default: the bundled model)")
    parser.add_argument("--precision", default=None, help="--precision for both (default: each one's default, auto)")
    parser.add_argument("--max-batch", type=int, default=None, help="passed to mvit serve")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="passed to mvit serve")
    parser.add_argument("--max-queue", type=int, default=None, help="passed to mvit serve")
    parser.add_argument("--workers", type=int, default=None, help="passed to mvit serve (server processes)")
    parser.add_argument("--server-option", action="append", default=[], help="any other mvit serve option, as --server-option=--flag=value (repeat)")
    args = parser.parse_args()
    levels = [int(text) for text in args.levels.split(",") if text.strip()]

    images = read_images(args.images)  # exits 2 when absent, before anything slow

    import torch

    options = [f"--{name.replace('_', '-')}={value}" for name in ("model", "precision", "max_batch", "max_wait_ms", "max_queue", "workers")
               if (value := getattr(args, name)) is not None] + args.server_option
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpus} usable), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    size = sum(len(image.body) for image in images) / len(images) / 1024
    print(f"{len(images)} real images from {FOLDER} ({size:.0f} KiB per request on average), "
          f"{args.model or 'the bundled model'}, every head")

    offline = Offline(images, args.model, args.precision or "auto")
    offline.timed(args.offline_repeats)  # the server not started yet: nothing competes
    try:
        server = Server(options)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)
    results: list[Level] = []
    try:
        print(f"server: {' '.join(server.command[1:])} -> {server.url}")
        for clients in levels:
            requests = args.requests or max(3 * len(images), 8 * clients)
            results.append(run_level(server, images, clients, requests))
    finally:
        code = server.stop()
    offline.timed(args.offline_repeats)  # and after it stopped: a busy neighbour or clock drift hits both alike
    print(f"offline: predict_stream, batch {offline.batch_size}, {offline.workers} decoding worker(s), precision "
          f"{offline.precision}, {len(images)} images; passes {', '.join(f'{s:.2f}' for s in offline.seconds)} s "
          f"(before / after the server; the best counts)")
    if code not in (0, -signal.SIGTERM):
        print(f"note: mvit serve exited with {code}; its last lines:\n  " + "\n  ".join(list(server.log)[-20:]))
    elif any("mvit serve" not in line for line in server.log):
        print("server log:\n  " + "\n  ".join(line for line in list(server.log)[-20:] if "mvit serve" not in line))

    print(f"\n{'measurement':<24}{'requests':>9}{'images/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'503s':>6}{'errors':>7}"
          f"{'server CPU':>11}{'client CPU':>11}{'others CPU':>11}")
    best = min(range(len(offline.seconds)), key=offline.seconds.__getitem__)
    print(f"{'offline mvit predict':<24}{len(images):>9}{offline.rate:>10.1f}{'':>8}{'':>8}{'':>6}{'':>7}{'':>11}{'':>11}"
          f"{100 * offline.others[best]:>10.0f}%")
    for level in results:
        name = f"served, {level.clients} client{'s' if level.clients > 1 else ''}"
        print(f"{name:<24}{level.requests:>9}{level.ok / level.seconds:>10.1f}{1000 * level.percentile(50):>8.0f}"
              f"{1000 * level.percentile(99):>8.0f}{level.overloaded:>6}{level.errors:>7}"
              + "".join(f"{100 * value / level.seconds:>10.0f}%" for value in (level.server_cpu, level.client_cpu, level.others)))
    print(f"(CPU: per second of wall time, 100% = one of the {cpus} cores; others: every other process on the machine, "
          "a busy neighbour when well above 0)")

    kinds: dict[str, int] = {}
    served: dict = {}
    for level in results:
        for status, count in level.statuses.items():
            if status != "503":
                kinds[status] = kinds.get(status, 0) + count
        for key, label in level.labels.items():
            served.setdefault(key, label)
    compared = [key for key in served if key in offline.labels]
    differ = sum(served[key] != offline.labels[key] for key in compared)
    missing = len(offline.labels) - len(compared)
    print(f"\nlabels: {differ} of {len(compared)} served (image, head) labels differ from offline predict"
          + (f" ({missing} never answered)" if missing else ""))
    errors = sum(kinds.values())
    print(f"non-503 errors: {errors} (goal 0)" + (f": {kinds}" if kinds else ""))
    at_8 = next((level for level in results if level.clients == 8), None)
    if at_8 is None:
        print("no level with 8 clients (--levels), so no ratio")
        return
    print("ratio = served images/s at 8 clients / offline images/s (goal >= 0.8)")
    print(f"ratio: {(at_8.ok / at_8.seconds) / offline.rate:.2f}")


if __name__ == "__main__":
    main()
