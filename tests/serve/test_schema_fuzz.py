"""schemathesis against the live server's /openapi.json: generated requests (valid and not) never
get a 5xx, and every error has OpenAI's shape. Bounded: 20 derandomized examples per operation, on
loopback. (schemathesis's own pytest plugin does not run under pytest 9, so each operation's
hypothesis strategy is driven directly.)"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from herd.serve import Settings, create_app
from tests.serve.conftest import live_server, make_engine

EXAMPLES = 20


@pytest.fixture(scope="module")
def api_schema(tiny):
    app = create_app(Settings(model_name="tiny", max_model_len=128), make_engine(tiny, max_batch=4, max_seq_len=128))
    with live_server(app) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def test_no_request_gets_a_server_error(api_schema):
    operations = [r.ok() for r in api_schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/health"} <= paths
    calls = []
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(timeout=60)
            calls.append(response.status_code)
            assert response.status_code < 500, \
                f"{case.method} {case.path} {case.body!r:.300} → {response.status_code}: {response.text[:300]}"
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    assert len(calls) >= len(operations) * 5
    assert any(s == 200 for s in calls) and any(400 <= s < 500 for s in calls)
