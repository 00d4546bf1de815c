"""Schemathesis against /openapi.json of the running API: no generated request gets a 5xx, and
every answer matches the schema (status code documented, content type, body shape)."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_api import TOKEN, Api, api  # noqa: F401  (the fixture)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_no_request_from_the_schema_gets_a_server_error(api: Api) -> None:  # noqa: F811
    api.poll_with()
    api.poll_with(enabled=False)
    schema = schemathesis.openapi.from_url(api.base + "/openapi.json")
    operations: list[APIOperation[Any, Any, Any, Any]] = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # a part of the schema Schemathesis cannot use
        operations.append(result.ok())
    assert len(operations) >= 9
    calls = 0
    for operation in operations:

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case[APIOperation[Any, Any, Any, Any]]) -> None:
            nonlocal calls
            response = case.call(base_url=api.base, headers={"Authorization": f"Bearer {TOKEN}"})
            calls += 1
            assert response.status_code < 500, (case.path, case.query, response.text)
            case.validate_response(response, checks=CHECKS)

        check()
    assert calls > 50
