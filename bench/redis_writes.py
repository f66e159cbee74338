"""Redis feature writer throughput against redis-benchmark's pipelined SET on the same server.

    .venv/bin/python bench/redis_writes.py [--entities 1000000] [--processes 2]

Starts a redis-server of its own on a free loopback port, with no persistence and a 6 GB limit,
because a million entities with their readable hashes take about 2 GB, more than the local stack
allows. Then it writes ``--entities`` user entities with the full user feature set through the versioned Lua writer
(FeatureWriter, 100 entities per call, pipelined) from ``--processes`` processes at once, once with
the readable hash and once with vectors only (``redis.readable_hash: false``), then
runs redis-benchmark's SET with a payload the size of one packed entity, pipelined 16 deep, on the
same server. Prints ``name: value`` lines.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import re
import subprocess
import sys
import time
import uuid

import redis

from jobs.lib.redis_writer import EntityValues, FeatureWriter
from reccore.config import load_config
from reccore.features import load_feature_set
from reccore.store import KeyLayout, Stamp, pack


def write_share(args: tuple) -> float:
    host, port, prefix, version, names, start, stop, ttl_seconds, readable_hash = args
    client = redis.Redis(host=host, port=port, socket_timeout=60)
    writer = FeatureWriter(client, KeyLayout(prefix, version), "user", names, ttl_seconds, entities_per_call=100,
                           readable_hash=readable_hash)
    generator = random.Random(start)
    entities = (EntityValues(str(number), Stamp(1_700_000_000_000 + number, 10, 1_700_000_000_000),
                             [generator.random() for _ in names]) for number in range(start, stop))
    began = time.monotonic()
    written, _ = writer.write(entities)
    elapsed = time.monotonic() - began
    if written != stop - start:
        raise RuntimeError(f"wrote {written} of {stop - start} entities")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)

    server = start_private_redis()
    try:
        return run(args, server[1])
    finally:
        server[0].terminate()
        server[0].wait(timeout=60)


def start_private_redis() -> tuple:
    import socket
    import tempfile

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="streamrec-bench-redis-")
    process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", folder,
                                "--save", "", "--appendonly", "no", "--maxmemory", "6gb",
                                "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    for _attempt in range(300):
        try:
            client.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"redis-server did not start on port {port} within 30 s")


def run(args: argparse.Namespace, port: int) -> int:
    config = load_config("local", overrides={"redis.port": port, "redis.host": "127.0.0.1"})
    feature_set = load_feature_set()
    names = feature_set.names("user")
    rates = {}
    for readable_hash in (True, False):
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        share = math.ceil(args.entities / args.processes)
        tasks = [(config.redis.host, config.redis.port, prefix, feature_set.version, names, start,
                  min(args.entities, start + share), 3600, readable_hash) for start in range(0, args.entities, share)]
        began = time.monotonic()
        with multiprocessing.Pool(len(tasks)) as pool:
            pool.map(write_share, tasks)
        rates[readable_hash] = args.entities / (time.monotonic() - began)
        client = redis.Redis(host=config.redis.host, port=config.redis.port, socket_timeout=60)
        client.flushdb()

    payload = len(pack(Stamp(0, 0), [0.0] * len(names)))
    output = subprocess.run(["redis-benchmark", "-h", config.redis.host, "-p", str(config.redis.port), "-t", "set",
                             "-n", "1000000", "-P", "16", "-d", str(payload), "-q"],
                            capture_output=True, text=True, check=True, timeout=600).stdout
    match = re.search(r"SET: ([\d.]+) requests per second", output.replace("\r", "\n"))
    if match is None:
        raise RuntimeError(f"could not read redis-benchmark's output: {output[-500:]}")
    set_per_s = float(match.group(1))

    writes_per_s, vector_only_per_s = rates[True], rates[False]
    sys.stdout.write("\n".join([
        f"redis_feature_entities: {args.entities}",
        f"redis_feature_processes: {args.processes}",
        f"redis_feature_payload_bytes: {payload}",
        f"redis_feature_writes_per_s: {writes_per_s:.0f}",
        f"redis_benchmark_set_per_s: {set_per_s:.0f}",
        f"redis_write_vs_benchmark_ratio: {writes_per_s / set_per_s:.3f}",
        f"redis_feature_writes_per_s_vector_only: {vector_only_per_s:.0f}",
        f"redis_write_vs_benchmark_ratio_vector_only: {vector_only_per_s / set_per_s:.3f}",
    ]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
