"""spark-submit.sh: help, argument errors and the command it builds (--dry-run runs nothing)."""

import subprocess

from reccore.config import PROJECT_ROOT

SCRIPT = str(PROJECT_ROOT / "spark-submit.sh")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_jobs():
    result = run("--help")
    assert result.returncode == 0
    assert "ingest" in result.stdout
    assert "bronze-report" in result.stdout


def test_unknown_option_rejected():
    result = run("--bogus", "ingest")
    assert result.returncode == 2
    assert "unknown option --bogus" in result.stderr


def test_unknown_environment_rejected():
    result = run("--env", "nowhere", "ingest")
    assert result.returncode == 2
    assert "no config for environment 'nowhere'" in result.stderr


def test_dry_run_command():
    result = run("--dry-run", "ingest", "--trigger", "available_now")
    assert result.returncode == 0, result.stderr
    command = result.stdout
    assert "/.venv/bin/spark-submit" in command
    assert "--master local\\[2\\]" in command
    assert "delta-spark_" in command
    assert "spark-sql-kafka-0-10_" in command
    assert "--py-files" in command
    assert "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension" in command
    assert "spark.sql.session.timeZone=UTC" in command
    assert command.rstrip().endswith("jobs/run.py ingest --trigger available_now")


def test_unknown_job_fails_in_driver():
    result = subprocess.run([str(PROJECT_ROOT / ".venv" / "bin" / "python"), str(PROJECT_ROOT / "jobs" / "run.py"),
                             "no-such-job"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown job 'no-such-job'; known jobs: backfill, bronze-report, features-stream, ingest, items, online-metrics, parity" in result.stderr
