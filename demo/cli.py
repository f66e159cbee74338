"""``python -m demo``: the whole loop on MovieLens in one command (``make demo`` runs it after the set-up).

    python -m demo                          # all ratings, split at 80% by event time; stops what it started
    python -m demo --keep-running           # after the report, keep everything up until Ctrl-C
    python -m demo --from 2016-09-24 --replay-seconds 20   # a smaller slice (the CI test's)

The report goes to standard output; the jobs' logs and Spark's own output go to ``demo.log`` in the
run folder (``--work-dir``, default ``$STREAMREC_HOME/demo``). Each run clears its namespace first:
the run folder's lake and checkpoints, its Kafka topics, its Redis keys and its registered model.
Exit status: 0 when every step passed, 1 when a step failed (the report names it and the log to
read), 2 for invalid options or a run folder in use, 130 when interrupted before the end (with
--keep-running, Ctrl-C after the report ends the run with 0).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from reccore.config import ConfigError, default_home, load_config

log = logging.getLogger("demo.cli")

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# A file that marks a folder as a demo run folder, so that the demo never clears a folder of other data.
MARKER = ".streamrec-demo"
CLEARED = ("lake", "checkpoints", "scorer-metrics")
DESCRIPTION = "The whole loop on MovieLens in one command: events in, features, a model, recommendations out."


def _instant_ms(text: str) -> int:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 date or time (e.g. 2016-09-24)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1)")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def _name(text: str) -> str:
    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid name: use 1 to 40 lower-case letters, digits "
                                         "and hyphens, starting with a letter or digit")
    return text


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--keep-running", action="store_true",
                        help="after the report, keep the stack, the streams and the scorer up until Ctrl-C")
    parser.add_argument("--from", dest="start", type=_instant_ms, metavar="DATE",
                        help="first rating time of the slice, inclusive (ISO-8601; UTC if no offset)")
    parser.add_argument("--to", dest="end", type=_instant_ms, metavar="DATE",
                        help="rating time the slice stops before, exclusive (ISO-8601)")
    parser.add_argument("--split", type=_fraction, default=0.8,
                        help="share of the slice's ratings, by event time, loaded before training (default 0.8)")
    parser.add_argument("--replay-seconds", type=_positive, default=120.0,
                        help="wall-clock seconds over which the rest of the slice is replayed (default 120)")
    parser.add_argument("--request-interval-seconds", type=_positive, default=5.0,
                        help="seconds between rounds of requests during that replay (default 5)")
    parser.add_argument("--show-users", type=int, default=3, help="users whose lists are printed (default 3)")
    parser.add_argument("--name", type=_name, default="demo",
                        help="the run's namespace: topics, Redis prefix and model are named streamrec-NAME-* "
                             "(default demo)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="run folder for the lake, checkpoints and logs (default $STREAMREC_HOME/demo)")
    parser.add_argument("--summary-json", type=Path, default=None,
                        help="also write every step's figures to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml; default local)")
    return parser.parse_args(argv)


class RunFolderError(RuntimeError):
    """An unusable run folder: it contains other data, or another demo uses it."""


def prepare_work_dir(work_dir: Path):
    """Lock the run folder (returns the open lock file) and clear what an earlier run left in it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    marker = work_dir / MARKER
    if not marker.exists() and any(work_dir.iterdir()):
        raise RunFolderError(f"{work_dir} is not empty and is no demo run folder (the {MARKER} file is missing); "
                             "choose another --work-dir")
    marker.touch()
    lock = open(work_dir / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RunFolderError(f"another demo is running in {work_dir}; wait for it to end, or pass another "
                             "--work-dir and --name") from None
    for name in CLEARED:
        shutil.rmtree(work_dir / name, ignore_errors=True)
    return lock


def send_stderr_to(path: Path) -> None:
    """Point file descriptor 2 at ``path``: Python's stderr and every child process's (Spark's JVM) write there."""
    sys.stderr.flush()
    log_file = open(path, "w", encoding="utf-8")
    os.dup2(log_file.fileno(), 2)
    log_file.close()


def _interrupt(_signum, _frame) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the demo stops what it started.
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # MLflow writes each run's URL to standard output, which is the demo's report; the report has the run id.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    work_dir = (args.work_dir or Path(default_home()) / "demo").resolve()
    try:
        lock = prepare_work_dir(work_dir)
    except (RunFolderError, OSError) as error:
        sys.stderr.write(f"demo: {error}\n")
        return 2

    from demo.run import Demo, Options, demo_config, stdout_console

    try:
        config = demo_config(load_config(args.env), args.name, work_dir)
    except ConfigError as error:
        sys.stderr.write(f"demo: {error}\n")
        return 2
    log_path = work_dir / "demo.log"
    send_stderr_to(log_path)
    logging.basicConfig(level=os.environ.get("STREAMREC_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "py4j.clientserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)

    options = Options(name=args.name, work_dir=work_dir, start_ms=args.start, end_ms=args.end, split=args.split,
                      replay_seconds=args.replay_seconds, request_interval_seconds=args.request_interval_seconds,
                      show_users=max(0, args.show_users), keep_running=args.keep_running,
                      progress=not args.no_progress, env=args.env,
                      summary_json=args.summary_json.resolve() if args.summary_json else None)
    log.info("demo options: %s", options)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return Demo(options, config, stdout_console(options.progress), log_path).run()
    finally:
        lock.close()
