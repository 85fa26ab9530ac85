"""Schemathesis against /openapi.json, bounded: no 5xx, and every response matches the documented schema.

Runs in-process on the WSGI app (seeding off, a fresh location), about 1,000 requests in all.
"""

from __future__ import annotations

import pytest

import schemathesis  # noqa: E402  (test extra)
from hypothesis import HealthCheck, settings  # noqa: E402

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.apps import registry_app  # noqa: E402

# What we promise: never a 5xx, only documented status codes and content types, bodies as documented.
# (Schemathesis' negative-data checks expect 422-style codes; we answer 411/413/415 as HTTP prescribes.)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory):
    location = tmp_path_factory.mktemp("fuzz-registry")
    app = registry_app(location, max_upload_size=1 << 20)
    app.extensions["docket"].started = True  # as under the serve command (/healthz?scope=instance checks it)
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("fuzz_schema")


SENT: list[str] = []


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    response = case.call_and_validate(checks=CHECKS)
    SENT.append(f"{case.method} {case.path} {response.status_code}")


def test_fuzzing_really_ran():
    """Guard against a silently empty run: the module above must have sent hundreds of requests."""
    assert len(SENT) >= 300, SENT[:20]
    assert len({line.split()[1] for line in SENT}) >= 8  # most documented operations were exercised
