"""Start, report and stop the local stack: Kafka (KRaft), Redis and an MLflow server on loopback.

    python -m devstack up       # install what is missing, start what is not running, create topics
    python -m devstack status   # what runs where; exit status 1 when a selected service is down
    python -m devstack down     # stop what the stack started, by the pids in its pid files
    python -m devstack topics   # create the configured Kafka topics on kafka.bootstrap_servers

Ports and the state folder come from the config's ``stack`` section (conf/local.yaml fills it from
STREAMREC_HOME, STREAMREC_KAFKA_PORT, STREAMREC_KAFKA_CONTROLLER_PORT, STREAMREC_REDIS_PORT and
STREAMREC_MLFLOW_PORT). The status table goes to stdout and progress logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from reccore.config import ConfigError, load_config

from devstack import stack, topics
from devstack.process import StackError


COMMANDS = ("up", "status", "down", "topics")


def parse_only(value: str | None) -> list[str] | None:
    """Return the service names of ``--only`` ("kafka,redis"), or None for all services."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise StackError(f"--only needs at least one service name; choose from {', '.join(stack.SERVICE_NAMES)}")
    return names


def format_table(header: Sequence[str], rows: list[Sequence[object]]) -> str:
    """Return ``rows`` under ``header`` as left-aligned columns separated by two spaces."""
    cells = [[str(value) for value in header]] + [["-" if value in (None, "") else str(value) for value in row]
                                                  for row in rows]
    widths = [max(len(row[index]) for row in cells) for index in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def _print_services(rows: list[stack.ServiceStatus]) -> None:
    table = [(row.service, row.pid, row.address, row.state, row.log_path, row.note) for row in rows]
    sys.stdout.write(format_table(("SERVICE", "PID", "ADDRESS", "STATE", "LOG", "NOTE"), table))
    for row in rows:
        if row.error:
            sys.stderr.write(f"\n{row.error}\n")


def _print_topics(results: list[topics.TopicResult]) -> None:
    table = [(result.name, result.partitions, result.retention_ms, result.outcome, result.note)
             for result in results]
    sys.stdout.write(format_table(("TOPIC", "PARTITIONS", "RETENTION_MS", "RESULT", "NOTE"), table))


def _up(config, services) -> int:
    rows = stack.up(config.stack, services)
    _print_services(rows)
    healthy = all(row.is_up for row in rows)

    kafka_row = next((row for row in rows if row.service == "kafka"), None)
    if kafka_row is not None and kafka_row.is_up:
        sys.stdout.write("\n")
        _print_topics(topics.ensure_topics(kafka_row.address, config.kafka.topic_configs()))
    return 0 if healthy else 1


def _status(config, services) -> int:
    rows = stack.status(services)
    _print_services(rows)
    return 0 if all(row.is_up for row in rows) else 1


def _down(config, services) -> int:
    rows = stack.down(config.stack, services)
    _print_services(rows)
    return 1 if any(row.state == "failed" for row in rows) else 0


def _topics(config, services) -> int:
    client_options = config.kafka.client_options()
    client_options.pop("bootstrap.servers")
    results = topics.ensure_topics(config.kafka.bootstrap_servers, config.kafka.topic_configs(),
                                   options=client_options)
    _print_topics(results)
    return 0


HANDLERS = {"up": _up, "status": _status, "down": _down, "topics": _topics}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m devstack`` / ``streamrec-stack``."""
    parser = argparse.ArgumentParser(prog="streamrec-stack", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("command", choices=COMMANDS,
                        help="up: start; status: report; down: stop; topics: create the configured topics")
    parser.add_argument("--env", default=None,
                        help="config environment, the file conf/ENV.yaml (default: $STREAMREC_ENV, else local)")
    parser.add_argument("--only", default=None, metavar="SERVICES",
                        help=f"comma-separated services to act on (default: all of {','.join(stack.SERVICE_NAMES)})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stack command and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.env)
        services = stack.build_services(config.stack, parse_only(args.only))
        return HANDLERS[args.command](config, services)
    except (StackError, ConfigError, RuntimeError) as error:
        sys.stderr.write(f"streamrec-stack {args.command}: {error}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
