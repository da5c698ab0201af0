"""Schemathesis against the live service's OpenAPI spec: no 5xx, every response as documented."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from conftest import start_server


@pytest.fixture(scope="module")
def live_server(trained_run):
    proc, base = start_server(trained_run["model_dir"], "--max-upload-mb", "1")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_every_response_matches_the_spec(live_server):
    from hypothesis import given
    api = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/predict", "POST /v1/explain", "GET /v1/model",
                                                "GET /healthz", "GET /readyz", "GET /metrics"}
    for operation in operations:
        @given(operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            # no 5xx, and every response as documented: status code, content type, body schema,
            # headers. (Whether a schema-valid request must succeed is not asked: an empty list of
            # files is valid by the schema and rightly answered with the documented 400.)
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                           response_schema_conformance, response_headers_conformance])
        check()
