#!/usr/bin/env bash
# Submit a streamrec job to Spark.
#
#   ./spark-submit.sh [--env NAME] [--dry-run] JOB [JOB ARGS...]
#
# Packages the code for --py-files, adds the Delta and Kafka jars and Delta's Spark settings, passes
# the config environment, and runs the real spark-submit: pyspark's own in .venv locally, or the one
# named by STREAMREC_SPARK_SUBMIT (on EMR: STREAMREC_SPARK_SUBMIT=spark-submit).
#
# SIGTERM or SIGINT, sent to this script or to its process group, reaches only the Python driver,
# which stops after the current micro-batch. The JVM ignores both, so it cannot cut the batch short.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV_NAME="${STREAMREC_ENV:-local}"
DRY_RUN=0

usage() {
  cat <<USAGE
usage: ./spark-submit.sh [--env NAME] [--dry-run] JOB [JOB ARGS...]

  --env NAME   config environment, conf/NAME.yaml (default: \$STREAMREC_ENV or local)
  --dry-run    print the spark-submit command instead of running it
  JOB ARGS     passed to the job; './spark-submit.sh JOB --help' shows them

jobs:
USAGE
  local job description
  while IFS=$'\t' read -r job description; do
    printf '  %-16s %s\n' "$job" "$description"
  done < <(python3 - "$ROOT/jobs/run.py" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1], encoding="utf-8").read())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "JOBS":
        for key, value in ast.literal_eval(node.value).items():
            print(f"{key}\t{value[1]}")
PY
)
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --env) [[ $# -ge 2 ]] || { echo "error: --env needs a value" >&2; exit 2; }; ENV_NAME="$2"; shift 2 ;;
    --env=*) ENV_NAME="${1#--env=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1 (see ./spark-submit.sh --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
JOB="$1"; shift

if [[ ! -f "$ROOT/conf/$ENV_NAME.yaml" ]]; then
  echo "error: no config for environment '$ENV_NAME' (expected conf/$ENV_NAME.yaml)" >&2
  exit 2
fi
export STREAMREC_ENV="$ENV_NAME"
# The driver imports the code from the --py-files zip, so these variables give it the config and state folders.
export STREAMREC_CONF_DIR="${STREAMREC_CONF_DIR:-$ROOT/conf}"
export STREAMREC_HOME="${STREAMREC_HOME:-$ROOT/.work}"

if [[ -n "${STREAMREC_SPARK_SUBMIT:-}" ]]; then
  SPARK_SUBMIT="$STREAMREC_SPARK_SUBMIT"
  PY="${STREAMREC_PYTHON:-python3}"
else
  # Local: first use sets up .venv and the jar cache.
  [[ -x "$ROOT/.venv/bin/spark-submit" && -f "$ROOT/.venv/.streamrec-installed" ]] || "$ROOT/scripts/bootstrap"
  SPARK_SUBMIT="$ROOT/.venv/bin/spark-submit"
  PY="$ROOT/.venv/bin/python"
fi
# Bind the driver to loopback unless SPARK_LOCAL_IP names another address.
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$PY}"
export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$PY}"

MASTER="$("$PY" -m reccore.config --env "$ENV_NAME" spark.master)"
JARS="${STREAMREC_JARS:-$("$PY" -m jobs.jars --print)}"
DIST="${STREAMREC_HOME:-$ROOT/.work}/dist"
mkdir -p "$DIST"
# A job killed by SIGKILL cannot remove its zip and pid file: clear those older than a day.
find "$DIST" -maxdepth 1 -type f \( -name 'streamrec-*.zip' -o -name 'driver-*.pid' \) -mmin +1440 -delete 2>/dev/null || true
ZIP="$(mktemp "$DIST/streamrec-XXXXXX.zip")"
"$PY" -m jobs.package "$ZIP"

COMMAND=(
  "$SPARK_SUBMIT"
  --master "$MASTER"
  --name "streamrec-$JOB"
  --jars "$JARS"
  --py-files "$ZIP"
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog
  --conf spark.sql.session.timeZone=UTC
  --conf "spark.executorEnv.STREAMREC_ENV=$ENV_NAME"
  --driver-java-options "-Dlog4j2.configurationFile=file:${STREAMREC_LOG4J2:-$ROOT/conf/log4j2.properties}"
  "$ROOT/jobs/run.py" "$JOB" "$@"
)

if [[ $DRY_RUN -eq 1 ]]; then
  # A command that runs as printed: the environment the script sets, then spark-submit. The zip
  # is kept for it (cleared after a day like any other).
  printf 'env'
  for name in STREAMREC_ENV STREAMREC_CONF_DIR STREAMREC_HOME SPARK_LOCAL_IP PYSPARK_PYTHON PYSPARK_DRIVER_PYTHON; do
    printf ' %s=%q' "$name" "${!name}"
  done
  printf ' \\\n  '
  printf '%q ' "${COMMAND[@]}"; printf '\n'
  exit 0
fi

PID_FILE="$(mktemp "$DIST/driver-XXXXXX.pid")"
export STREAMREC_DRIVER_PID_FILE="$PID_FILE"
cleanup() { rm -f "$PID_FILE" "$ZIP"; }
trap cleanup EXIT

# The JVM inherits SIGTERM/SIGINT as ignored; the trap below hands them to the Python driver.
( trap '' TERM INT; exec "${COMMAND[@]}" ) &
CHILD=$!

forward_stop() {
  local driver
  driver="$(cat "$PID_FILE" 2>/dev/null || true)"
  if [[ -n "$driver" ]] && kill -0 "$driver" 2>/dev/null; then
    kill -TERM "$driver" 2>/dev/null || true
  else
    # No driver yet: nothing has been read or written, so stopping the JVM outright is safe.
    kill -KILL "$CHILD" 2>/dev/null || true
  fi
}
trap forward_stop TERM INT

# wait returns early when a trapped signal arrives; the last wait collects the real exit status.
while kill -0 "$CHILD" 2>/dev/null; do
  wait "$CHILD" || true
done
STATUS=0
wait "$CHILD" || STATUS=$?
exit "$STATUS"
