"""HTTP/1.1 load on loopback for the scorer benchmark, in a process of its own.

    .venv/bin/python bench/loadgen.py < spec.json > result.json

bench/scorer.py starts one such process per phase. The spec (JSON on stdin) names the server
(``host``, ``port``), the request ``paths`` (used round robin), the ``mode``, ``seconds``,
``connections``, ``timeout_seconds`` and the ``check`` each response must pass. The result (JSON
on stdout) has the request count, errors with a few samples, the rate, latency percentiles and
the CPU time this process used.

- ``open`` mode keeps a fixed ``rate``. Request i is due at start + i / rate, whatever happened to
  the earlier ones, and its latency counts from that due time, not from when it was sent. So when
  the server falls behind, the time a request waits in the queue is counted: a closed-loop client
  would send later instead and hide it (coordinated omission). A request waits for a free
  keep-alive connection from a pool of at most ``connections``.
- ``closed`` mode finds the maximum rate. Each of ``connections`` keep-alive connections sends its
  next request as soon as the previous response is in. The first ``warmup_seconds`` are not
  counted. The rate is the responses completed in the next ``seconds`` divided by ``seconds``.

Why not wrk: wrk is closed-loop only, so it cannot hold a fixed rate, and wrk2, which can, is not
among Debian 12's packages. wrk would also need a Lua script to check each JSON body, while this
generator checks every response. Its cost is CPU time on the same cores as the server. The
result reports that CPU time, so the benchmark can show how much of the machine the generator took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import sys
import time
from collections import deque
from typing import Callable, Optional

log = logging.getLogger("bench.loadgen")

MAX_ERROR_SAMPLES = 5


class Connection:
    """One keep-alive HTTP/1.1 connection that opens on first use and reopens after it was closed."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.requests = 0

    async def get(self, path: str) -> tuple[int, bytes]:
        """Send GET ``path`` and return the status code and body.

        The server may have closed a reused connection when its keep-alive timeout passed. When
        such a connection returns no byte at all, the request is sent once more on a new
        connection, as HTTP clients do for idempotent requests.
        """
        reused = self.writer is not None and self.requests > 0
        try:
            return await self._exchange(path)
        except (ConnectionError, asyncio.IncompleteReadError) as error:
            nothing_read = not isinstance(error, asyncio.IncompleteReadError) or not error.partial
            if not (reused and nothing_read):
                raise
            self.close()
            return await self._exchange(path)

    async def _exchange(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.requests = 0
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            self.close()
            raise ValueError(f"response to {path} has no Content-Length (headers: {sorted(headers)})")
        body = await self.reader.readexactly(int(headers["content-length"]))
        self.requests += 1
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Pool:
    """A pool of at most ``size`` connections. A request without a free one waits for the next one released."""

    def __init__(self, host: str, port: int, size: int):
        self.host, self.port, self.size = host, port, size
        self.idle: list[Connection] = []
        self.created = 0
        self.waiters: deque = deque()

    async def acquire(self) -> Connection:
        if self.idle:
            return self.idle.pop()  # most recently used first: it is the least likely to have timed out
        if self.created < self.size:
            self.created += 1
            return Connection(self.host, self.port)
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def release(self, connection: Connection) -> None:
        if self.waiters:
            self.waiters.popleft().set_result(connection)
        else:
            self.idle.append(connection)

    def close(self) -> None:
        for connection in self.idle:
            connection.close()


def response_check(spec: dict) -> Callable[[int, bytes], Optional[str]]:
    """Return a function that gives the error of one response, or None when it passes ``spec['check']``."""
    check = spec["check"]
    kind = check["kind"]

    def status_only(status: int, _body: bytes) -> Optional[str]:
        return None if status == 200 else f"status {status}"

    def recommendations(status: int, body: bytes) -> Optional[str]:
        if status != 200:
            return f"status {status}: {body[:200]!r}"
        document = json.loads(body)
        if document.get("fallback") is not False:
            return f"fallback {document.get('fallback_reason')!r} for user {document.get('user_id')!r}"
        items = document.get("items") or []
        if len(items) != check["k"]:
            return f"{len(items)} items for user {document.get('user_id')!r}, expected {check['k']}"
        if any(item.get("score") is None for item in items):
            return f"an item without a score for user {document.get('user_id')!r}"
        return None

    def fetch(status: int, body: bytes) -> Optional[str]:
        if status != 200:
            return f"status {status}: {body[:200]!r}"
        document = json.loads(body)
        if not document.get("user_found"):
            return f"no user vector for user {document.get('user_id')!r}"
        if document.get("items") != check["items"] or document.get("found") != check["items"]:
            return (f"{document.get('found')} of {document.get('items')} item vectors for user "
                    f"{document.get('user_id')!r}, expected {check['items']}")
        return None

    checks = {"status": status_only, "recommendations": recommendations, "fetch": fetch}
    if kind not in checks:
        raise ValueError(f"unknown check {kind!r}; use one of {sorted(checks)}")
    return checks[kind]


class Recorder:
    """Latencies and errors of the requests that count."""

    def __init__(self):
        self.latencies: list[float] = []
        self.send_lags: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        # Every response of the phase, counted or not (closed loop: also the warm-up and the tail).
        self.all_requests = 0

    def add(self, latency_s: float, send_lag_s: float, error: Optional[str]) -> None:
        self.latencies.append(latency_s)
        self.send_lags.append(send_lag_s)
        if error is not None:
            self.errors += 1
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(error)


async def timed_get(connection: Connection, path: str, check, timeout_s: float) -> Optional[str]:
    """Send one request and return its error (None when the response passes ``check``)."""
    try:
        async with asyncio.timeout(timeout_s):
            status, body = await connection.get(path)
        return check(status, body)
    except TimeoutError:
        connection.close()
        return f"no response to {path} within {timeout_s} s"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
        connection.close()
        return f"{path}: {type(error).__name__}: {error}"


async def open_loop(spec: dict, check) -> Recorder:
    loop = asyncio.get_running_loop()
    paths, rate, timeout_s = spec["paths"], float(spec["rate"]), float(spec["timeout_seconds"])
    pool = Pool(spec["host"], spec["port"], int(spec["connections"]))
    recorder = Recorder()
    count = round(rate * float(spec["seconds"]))

    async def one(path: str, due: float) -> None:
        connection = await pool.acquire()
        sent = loop.time()
        try:
            error = await timed_get(connection, path, check, timeout_s)
        finally:
            pool.release(connection)
        recorder.add(loop.time() - due, sent - due, error)

    start = loop.time() + 0.1
    tasks = []
    for number in range(count):
        due = start + number / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(paths[number % len(paths)], due)))
    # Every request has its own timeout, so this bound is only reached if the pool itself stalls.
    _done, pending = await asyncio.wait(tasks, timeout=timeout_s * 2 + 5)
    for task in pending:
        task.cancel()
        recorder.add(math.inf, math.inf, "request not finished when the phase ended")
    pool.close()
    return recorder


async def closed_loop(spec: dict, check) -> tuple[Recorder, float]:
    loop = asyncio.get_running_loop()
    paths, timeout_s = spec["paths"], float(spec["timeout_seconds"])
    connections = int(spec["connections"])
    recorder = Recorder()
    start = loop.time()
    measured_from = start + float(spec.get("warmup_seconds", 0))
    measured_to = measured_from + float(spec["seconds"])
    completed = 0

    async def client(index: int) -> None:
        nonlocal completed
        connection = Connection(spec["host"], spec["port"])
        number = index
        while loop.time() < measured_to:
            sent = loop.time()
            error = await timed_get(connection, paths[number % len(paths)], check, timeout_s)
            done = loop.time()
            number += connections
            recorder.all_requests += 1
            if measured_from <= done <= measured_to:
                completed += 1
                recorder.add(done - sent, 0.0, error)
            elif error is not None:
                recorder.errors += 1
                if len(recorder.error_samples) < MAX_ERROR_SAMPLES:
                    recorder.error_samples.append(error)
        connection.close()

    await asyncio.gather(*(client(index) for index in range(connections)))
    return recorder, completed / float(spec["seconds"])


def percentile_ms(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values`` (seconds) in milliseconds."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] * 1000.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(spec: dict) -> dict:
    """Run the phase that ``spec`` describes and return its result."""
    check = response_check(spec)
    cpu_before, wall_before = cpu_seconds(), time.monotonic()
    if spec["mode"] == "open":
        recorder = asyncio.run(open_loop(spec, check))
        rate = len(recorder.latencies) / float(spec["seconds"])
    elif spec["mode"] == "closed":
        recorder, rate = asyncio.run(closed_loop(spec, check))
    else:
        raise ValueError(f"unknown mode {spec['mode']!r}; use open or closed")
    latencies, lags = recorder.latencies, recorder.send_lags
    return {
        "mode": spec["mode"],
        "requests": len(latencies),
        "all_requests": max(recorder.all_requests, len(latencies)),
        "errors": recorder.errors,
        "error_samples": recorder.error_samples,
        "rate_per_s": rate,
        "latency_ms": {name: percentile_ms(latencies, fraction)
                       for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "send_lag_ms": {name: percentile_ms(lags, fraction) for name, fraction in (("p50", 0.5), ("p99", 0.99))},
        "cpu_s": cpu_seconds() - cpu_before,
        "elapsed_s": time.monotonic() - wall_before,
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.load(sys.stdin)
    result = run(spec)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
