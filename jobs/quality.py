"""Data-quality gates with Great Expectations: a named suite per dataset, run on a Spark DataFrame.

A gate is a list of expectations built in code (so they are reviewed beside the data they
guard), validated in an ephemeral context with no files on disk. ``check`` returns a report, and
``enforce`` raises QualityGateError naming each failed expectation with what it observed. New
datasets add a suite function and register it in ``SUITES``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from pyspark.sql import DataFrame

from reccore.config import Config
from reccore.features import FeatureSet

log = logging.getLogger("jobs.quality")


class QualityGateError(RuntimeError):
    """A dataset failed its gate; the message names every failed expectation."""


@dataclass
class GateReport:
    """The outcome of one gate: each expectation with its result."""

    suite: str
    success: bool
    failures: list = field(default_factory=list)
    evaluated: int = 0
    duration_s: float = 0.0

    def describe(self) -> str:
        return "; ".join(self.failures) if self.failures else "all expectations met"


def training_set_expectations(config: Config, feature_set: FeatureSet) -> list:
    """Return the expectations a training set must meet before a model is trained on it."""
    import great_expectations as gx

    expectations = gx.expectations
    relevances = sorted({0, 1, *(int(value) for value in config.training.relevance_by_rating.values())})
    checks = [expectations.ExpectTableRowCountToBeBetween(min_value=config.training.min_examples)]
    for column in ("example_id", "user_id", "item_id", "label_ms", "label_ingest_ms", "relevance", "source"):
        checks.append(expectations.ExpectColumnValuesToNotBeNull(column=column))
    checks += [
        expectations.ExpectColumnValuesToBeUnique(column="example_id"),
        expectations.ExpectColumnValuesToBeInSet(column="relevance", value_set=relevances),
        expectations.ExpectColumnValuesToBeInSet(column="source", value_set=["event", "sampled"]),
        # Positives must be neither absent nor everything: the share of examples with relevance above 0.
        expectations.ExpectColumnMeanToBeBetween(column="is_positive", min_value=0.01, max_value=0.99),
    ]
    for entity in ("user", "item"):
        # Point in time: a feature row is older than the label and was ingested no later than it.
        checks.append(expectations.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="label_ms", column_B=f"{entity}_newest_ms", or_equal=False, ignore_row_if="either_value_is_missing"))
        checks.append(expectations.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="label_ingest_ms", column_B=f"{entity}_ingest_ms", or_equal=True,
            ignore_row_if="either_value_is_missing"))
    for name in feature_set.names("user")[:1] + feature_set.names("item")[:1]:
        checks.append(expectations.ExpectColumnToExist(column=name))
    return checks


SUITES: dict[str, Callable[[Config, FeatureSet], list]] = {"training_set": training_set_expectations}


def check(frame: DataFrame, suite_name: str, config: Config, feature_set: FeatureSet) -> GateReport:
    """Validate ``frame`` against the named suite and return the report."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from pyspark.sql import functions as F

    if suite_name not in SUITES:
        raise ValueError(f"unknown quality suite {suite_name!r}; known suites: {sorted(SUITES)}")
    started = time.monotonic()
    if suite_name == "training_set":
        frame = frame.withColumn("is_positive", (F.col("relevance") > 0).cast("double"))
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_spark(name="streamrec").add_dataframe_asset(name=suite_name)
    batch = asset.add_batch_definition_whole_dataframe(f"{suite_name}-whole")
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for expectation in SUITES[suite_name](config, feature_set):
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=suite_name))
    outcome = validation.run(batch_parameters={"dataframe": frame})

    report = GateReport(suite_name, bool(outcome.success), evaluated=len(outcome.results))
    for result in outcome.results:
        if result.success:
            continue
        expectation = result.expectation_config
        kwargs = {key: value for key, value in expectation.kwargs.items() if key != "batch_id"}
        details = result.result or {}
        observed = details.get("observed_value")
        unexpected = details.get("unexpected_count")
        sample = details.get("partial_unexpected_list")
        text = f"{expectation.type} {kwargs}"
        if observed is not None:
            text += f": observed {observed}"
        if unexpected:
            text += f": {unexpected} unexpected rows, for example {sample[:3] if sample else []}"
        if result.exception_info and result.exception_info.get("raised_exception"):
            text += f": raised {result.exception_info.get('exception_message')}"
        report.failures.append(text)
    report.duration_s = time.monotonic() - started
    log.info("quality gate %s: %d expectations, %d failed, %.1f s", suite_name, report.evaluated,
             len(report.failures), report.duration_s)
    return report


def enforce(frame: DataFrame, suite_name: str, config: Config, feature_set: FeatureSet) -> GateReport:
    """Validate ``frame`` and raise QualityGateError naming every failed expectation."""
    report = check(frame, suite_name, config, feature_set)
    if not report.success:
        raise QualityGateError(f"quality gate {suite_name} failed {len(report.failures)} of {report.evaluated} "
                               f"expectations: {report.describe()}")
    return report
