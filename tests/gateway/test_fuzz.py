"""Property-based fuzzing of the OpenAPI schema (schemathesis + hypothesis): no generated
request makes a 500, and every response matches its documented status codes and schema."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.gateway.conftest import WORKER_TOKEN, RunningGateway


def test_api_never_fails_with_500(gateway: RunningGateway) -> None:
    key = gateway.key("fuzz", ["inference", "admin"])
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Bearer {key}"})
            assert response.status_code < 500, (case.as_curl_command(), response.text)
            # Schema-valid bodies may still be 400 for the selected model (the spec's 400),
            # so the positive-data check does not apply; every other check does.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()


def internal_schema() -> dict[str, Any]:
    """The worker API's OpenAPI (hidden from the public docs), long-polls capped for speed."""
    import copy

    from fastapi.openapi.utils import get_openapi
    from remotegpu_gateway import internal

    routes = []
    for route in internal.router.routes:
        r = copy.copy(route)
        r.include_in_schema = True  # type: ignore[attr-defined]
        routes.append(r)
    schema = get_openapi(title="internal", version="1", routes=routes)
    schema["components"]["schemas"]["LeaseRequest"]["properties"]["wait_seconds"]["maximum"] = 0.2
    for param in schema["paths"]["/internal/v1/queue"]["get"]["parameters"]:
        if param["name"] == "wait_seconds":
            param["schema"]["maximum"] = 0.2
    return schema


def test_worker_api_never_fails_with_500(gateway: RunningGateway) -> None:
    schema = schemathesis.openapi.from_dict(internal_schema())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8  # the worker API, cold-start phase reports included
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            # Long-polls default to 20 s: keep generated ones short.
            if isinstance(case.body, dict) and "worker_id" in case.body:
                case.body["wait_seconds"] = 0.1
            if isinstance(case.query, dict) and case.operation.path.endswith("/queue"):
                case.query["wait_seconds"] = 0.1
            response = case.call(
                base_url=gateway.url, headers={"Authorization": f"Bearer {WORKER_TOKEN}"}, timeout=10
            )
            assert response.status_code < 500, (case.as_curl_command(), response.text)

        check()
