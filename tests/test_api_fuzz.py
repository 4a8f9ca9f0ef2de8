"""API fuzzing: schemathesis generates requests from the server's own OpenAPI schema and checks the answers.

A real ``dspark serve`` subprocess on a loopback port (with an API key, as deployed), fed schema-valid bodies
(positive) and schema-breaking ones (negative) for every operation. Every answer must be documented and match
its schema, and none may be a 5xx. Bounded: a few dozen examples per operation and mode, and a time budget
after which the remaining examples are skipped.
"""

from __future__ import annotations

import collections
import signal
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from conftest import cli_server  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance)

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 30  # per operation and generation mode
BUDGET_S = 45.0  # examples past this are skipped, so a slow machine cannot stretch the run
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def served(qwen3_bundle, tmp_path_factory):
    template = tmp_path_factory.mktemp("fuzz") / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}")
    with cli_server(qwen3_bundle, "--api-key", KEY, "--chat-template", str(template), "--threads", "1", "--max-batch", "4",
                    "--max-queue", "8", "--log-level", "warning", "--shutdown-timeout", "2") as (proc, url):
        yield url, proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_fuzzed_requests_get_documented_answers_and_no_5xx(served):
    url, proc = served
    schema = schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json", headers=AUTH, timeout=30).json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
                                               "GET /health", "GET /metrics"}
    tried, statuses = collections.Counter(), collections.Counter()
    deadline = time.monotonic() + BUDGET_S
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                if time.monotonic() > deadline:
                    return
                response = case.call(base_url=url, headers=AUTH, timeout=60)
                tried[operation.label, mode.value] += 1
                statuses[operation.label, response.status_code] += 1
                case.validate_response(response, checks=CHECKS)

            run()
    print(f"\nschemathesis: {sum(tried.values())} requests; by operation and mode: {dict(tried)}; "
          f"by status: {dict(statuses)}")
    assert sum(tried.values()) >= 50, tried
    assert proc.poll() is None, "the server died"
    assert httpx.get(url + "/health", timeout=10).status_code == 200
