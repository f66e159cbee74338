"""The scorer against its own OpenAPI document, with schemathesis (MovieLens champion under gunicorn).

The schemathesis CLI reads ``/openapi.json`` from the running scorer. For every documented operation
it sends boundary and invalid values (coverage phase) and generated requests (fuzzing phase), valid
and invalid, and runs every built-in check on each response. The checks ask for no 5xx, a documented
status code, content type and headers, and a body that matches the response schema. Invalid input
must be rejected and valid input accepted, an undocumented method must get 405 with an ``Allow``
header, and with API keys set no request may succeed without a valid key. The run is seeded and
derandomized, so a failure comes back on every run with the same requests.

The CLI is used, not ``schemathesis.pytest.from_fixture``: the lazy loader of schemathesis 4.32.5
reads ``Node._nodeid``, which pytest 9.2 no longer has. The CLI also runs the coverage phase, which
is where undocumented methods are tried.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import schemathesis

from tests.integration.test_serving import Gunicorn

pytestmark = [pytest.mark.integration, pytest.mark.spark]

# Generated requests per operation in the fuzzing phase. The coverage phase adds its own.
MAX_EXAMPLES = 50
SEED = 20_250_601
REQUEST_TIMEOUT_S = 10
RUN_TIMEOUT_S = 180
API_KEY = "schema-test-key"
DOCUMENTED_OPERATIONS = 4


@pytest.fixture(scope="module")
def scorers(movielens_champion, tmp_path_factory) -> dict:
    """The scorer under gunicorn twice, started and stopped side by side.

    ``open`` runs without API keys (whatever the environment sets) and ``keyed`` with one.
    """
    keys_env = movielens_champion.serving.api_keys_env
    servers = {name: Gunicorn(movielens_champion, tmp_path_factory.mktemp(f"{name}-scorer"), workers=1)
               for name in ("open", "keyed")}
    servers["open"].env.pop(keys_env, None)
    servers["keyed"].env[keys_env] = API_KEY
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        try:
            list(pool.map(Gunicorn.start, servers.values()))
            yield servers
        finally:
            list(pool.map(Gunicorn.stop, servers.values()))


def run_schemathesis(server: Gunicorn, folder, api_key: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``schemathesis run`` against the server's /openapi.json and return the process and its JSON report."""
    settings = [
        f"seed = {SEED}",
        "workers = 1",
        f"request-timeout = {REQUEST_TIMEOUT_S}",
        "continue-on-failure = true",
        "[cache]",
        "enabled = false",
        "[generation]",
        'mode = "all"',
        f"max-examples = {MAX_EXAMPLES}",
        "deterministic = true",
        'database = "none"',
        "[checks]",
        "enabled = true",
    ]
    if api_key is not None:
        settings += ["[auth.openapi.ApiKeyAuth]", f'api_key = "{api_key}"']
    config = folder / "schemathesis.toml"
    config.write_text("\n".join(settings) + "\n", encoding="utf-8")
    report = folder / "report.json"

    # The test's own folder is the working directory, so any file the CLI writes stays out of the repository.
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", "--no-color",
         "--report", "json", "--report-json-path", str(report), f"http://127.0.0.1:{server.port}/openapi.json"],
        cwd=folder, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert report.exists(), (f"schemathesis wrote no report (exit code {run.returncode}):\n"
                             f"{run.stdout[-5000:]}\n{run.stderr[-3000:]}")
    return run, json.loads(report.read_text(encoding="utf-8"))


def assert_conforms(run: subprocess.CompletedProcess, report: dict) -> None:
    output = f"{run.stdout[-8000:]}\n{run.stderr[-2000:]}"
    assert run.returncode == 0, output
    assert report["failures"] == [], output
    assert report["errors"] == [], output
    assert report["operations"]["tested"] == DOCUMENTED_OPERATIONS, report["operations"]
    assert report["phases"]["coverage"]["status"] == "success", report["phases"]
    assert report["phases"]["fuzzing"]["status"] == "success", report["phases"]
    assert not any(report["warnings"].values()), report["warnings"]
    # Valid requests were accepted on every operation. schemathesis leaves 401s out of this count, so a run
    # whose requests all got 401 fails here.
    accepted = {operation: rates["fuzzing"]["accepted"] for operation, rates in report["valid_rates"].items()}
    assert len(accepted) == DOCUMENTED_OPERATIONS, accepted
    assert all(count > 0 for count in accepted.values()), accepted


def test_scorer_without_keys_conforms(scorers, tmp_path):
    document = json.loads(scorers["open"].get("/openapi.json").data)
    assert "components" not in document
    assert "401" not in document["paths"]["/v1/rank"]["post"]["responses"]

    run, report = run_schemathesis(scorers["open"], tmp_path)
    assert_conforms(run, report)


def test_scorer_with_keys_conforms(scorers, tmp_path):
    document = json.loads(scorers["keyed"].get("/openapi.json").data)
    assert document["components"]["securitySchemes"]["ApiKeyAuth"] == {"type": "apiKey", "in": "header",
                                                                      "name": "X-API-Key"}
    assert "401" in document["paths"]["/v1/rank"]["post"]["responses"]
    assert "401" in document["paths"]["/v1/users/{user_id}/recommendations"]["get"]["responses"]

    run, report = run_schemathesis(scorers["keyed"], tmp_path, API_KEY)
    assert_conforms(run, report)


@pytest.fixture(scope="module")
def schema(scorers):
    """The open scorer's document loaded by schemathesis, for requests its generators never send."""
    config = schemathesis.Config.from_dict({"checks": {"enabled": True}, "cache": {"enabled": False}})
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{scorers['open'].port}/openapi.json", config=config,
                                         timeout=REQUEST_TIMEOUT_S)


# Python's JSON parser, which Flask uses, reads these literals, and int() of the infinite ones raises OverflowError.
@pytest.mark.parametrize("k", ["Infinity", "-Infinity", "1e400", "NaN"])
def test_non_finite_k_is_400(schema, k):
    body = f'{{"user_id": "414", "candidates": ["1", "2"], "k": {k}}}'.encode()
    case = schema["/v1/rank"]["POST"].Case(body=body, media_type="application/json")
    response = case.call_and_validate(timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "k"


def test_oversized_body_is_413(schema, movielens_champion):
    padding = "x" * movielens_champion.serving.max_body_bytes
    case = schema["/v1/rank"]["POST"].Case(body={"user_id": "414", "candidates": ["1"], "padding": padding},
                                           media_type="application/json")
    response = case.call_and_validate(timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_user_id_with_slash_is_404(schema):
    case = schema["/v1/users/{user_id}/recommendations"]["GET"].Case(path_parameters={"user_id": "414/1"})
    response = case.call_and_validate(timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
