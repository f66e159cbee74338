"""Resolve Maven Central artifacts with their dependencies into a cache folder, once.

Both the Kafka broker (devstack) and the Spark jobs' jars (jobs.jars) come through here. A folder
that has a ``.complete`` marker is never resolved again, so later runs need no network.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable
from xml.sax.saxutils import escape

log = logging.getLogger(__name__)

# A version starts with digits and a dot ("3.9.2", "33.0"); "0" in "spark-sql-kafka-0-10" does not.
_VERSION_START = re.compile(r"\d+\.\d")

COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    """Return the jar cache folder (STREAMREC_JAR_CACHE, default ~/.cache/streamrec/jars)."""
    configured = os.environ.get("STREAMREC_JAR_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "streamrec" / "jars"


def _pom(coordinates: Iterable[str]) -> str:
    dependencies = []
    for coordinate in coordinates:
        parts = coordinate.split(":")
        if len(parts) != 3:
            raise ValueError(f"Maven coordinate {coordinate!r} must be group:artifact:version")
        group, artifact, version = (escape(part) for part in parts)
        dependencies.append(f"<dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
                            f"<version>{version}</version></dependency>")
    return ("<project xmlns=\"http://maven.apache.org/POM/4.0.0\"><modelVersion>4.0.0</modelVersion>"
            "<groupId>streamrec.local</groupId><artifactId>jar-resolver</artifactId><version>1</version>"
            "<packaging>pom</packaging><dependencies>" + "".join(dependencies) + "</dependencies></project>")


def resolve(name: str, coordinates: list[str], exclude_names: Iterable[str] = ()) -> Path:
    """Copy ``coordinates`` and their runtime dependencies into ``cache_root()/name``.

    ``exclude_names`` are artifact ids (without version) to leave out, for example the jars that
    pyspark already ships. Returns the folder. Raises RuntimeError naming the Maven log on failure.
    """
    target = cache_root() / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    if shutil.which("mvn") is None:
        raise RuntimeError("mvn is not installed; install Maven (apt-get install maven) to fetch "
                           f"{', '.join(coordinates)} from Maven Central")

    excluded = set(exclude_names)
    log.info("resolving %s from Maven Central into %s", ", ".join(coordinates), target)
    with tempfile.TemporaryDirectory(prefix="streamrec-mvn-") as work:
        work_dir = Path(work)
        (work_dir / "pom.xml").write_text(_pom(coordinates), encoding="utf-8")
        staging = work_dir / "jars"
        command = ["mvn", "-B", "-q", "-f", str(work_dir / "pom.xml"), "dependency:copy-dependencies",
                   f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log_path = cache_root() / f"{name}.maven.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(result.stdout + result.stderr, encoding="utf-8")
            raise RuntimeError(f"Maven could not resolve {', '.join(coordinates)} (exit {result.returncode}); "
                               f"see {log_path}")

        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        kept = 0
        for jar in sorted(staging.glob("*.jar")):
            if artifact_id(jar.name) in excluded:
                continue
            shutil.copy2(jar, partial / jar.name)
            kept += 1
        (partial / COMPLETE_MARKER).write_text("\n".join(coordinates) + "\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    log.info("resolved %d jars into %s", kept, target)
    return target


def artifact_id(jar_name: str) -> str:
    """Return the artifact id of a jar file name: ``kafka-clients-3.9.2.jar`` -> ``kafka-clients``."""
    stem = jar_name[:-4] if jar_name.endswith(".jar") else jar_name
    parts = stem.split("-")
    for index in range(1, len(parts)):
        if _VERSION_START.match(parts[index]):
            return "-".join(parts[:index])
    return stem


def jars_in(folder: Path) -> list[Path]:
    """Return the jars of a resolved folder, sorted by name."""
    return sorted(folder.glob("*.jar"))
