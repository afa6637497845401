"""Schema fuzzing (RELIABILITY #17): schemathesis generates requests for every route in /openapi.json
(valid bodies and, for the bodies' fields, invalid ones) and sends them to a tiny server in process. No
answer may be a 5xx, and every answer must match what the schema documents for its route: the status
code, the content type and, for JSON, the body's schema.

Left out: schemathesis' check that every schema-valid request is accepted. Some are refused on purpose,
with a documented 400 (a prompt plus max_tokens over the context, more choices than the server holds)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from jaxserver import JAXServer
from tests import tiny


@pytest.fixture(scope="module")
def fuzzed_server(tiny_llama_dir):
    """A server of its own: schemathesis ends the app's lifespan after the test (a pytest hook), which
    shuts the server down, and the session's shared one must live on."""
    server = JAXServer.load(tiny_llama_dir, config=tiny.test_config(max_length=128, max_compile_tokens=8))
    yield server
    server.shutdown(drain_timeout_s=0)
    # The generated requests reached the model, not only the validation in front of it.
    assert server.engine.stats()["tokens_generated"] > 0


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed_server.app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_generated_requests_get_documented_answers_and_no_server_error(case):
    # 128 choices of a whole context's tokens may take longer than schemathesis' default of 10 s.
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
        timeout=120,
    )
