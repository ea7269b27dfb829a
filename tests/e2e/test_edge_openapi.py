"""The OpenAPI document: generated from the protos, committed, served."""

import json

import pytest
import schemathesis

from services.common import methods, openapi
from services.launcher.edge_guards import API_DESCRIPTION_FILE
from services.launcher.stack import DESCRIPTOR


@pytest.fixture(scope="module")
def document() -> dict:
    return openapi.build_document(DESCRIPTOR.read_bytes())


class TestDocument:
    def test_committed_file_is_current(self):
        """docs/openapi.json is what `make openapi` writes today."""
        generated = openapi.render(DESCRIPTOR.read_bytes())

        assert generated == API_DESCRIPTION_FILE.read_text(), (
            "docs/openapi.json is stale: run `make openapi`"
        )

    def test_every_rest_binding_described(self, document):
        described = {
            (verb.upper(), path)
            for path, operations in document["paths"].items()
            for verb in operations
        }
        for method in methods.public_methods():
            if method.http is None:
                continue
            path = method.http.template.replace("=*}", "}")
            assert (method.http.method, path) in described, method.action

    def test_request_bodies_reject_unknown_fields(self, document):
        review = document["paths"]["/v1/cds/clinical-review"]["post"]
        schema = review["requestBody"]["content"]["application/json"]

        assert schema["schema"]["additionalProperties"] is False
        assert "medications" in schema["schema"]["properties"]

    def test_security_follows_policy(self, document):
        paths = document["paths"]

        assert [{"apiKey": []}] == paths["/v1/audit"]["get"]["security"]
        operator = paths["/v1/operator/organizations"]["post"]
        assert [{"operatorToken": []}] == operator["security"]
        assert [] == paths["/v1/billing/stripe/webhook"]["post"]["security"]
        assert [] == paths["/v1/openapi.json"]["get"]["security"]

    def test_path_fields_not_in_body(self, document):
        rotate = document["paths"]["/v1/keys/{key_id}:rotate"]["post"]
        body = rotate["requestBody"]["content"]["application/json"]

        assert "keyId" not in body["schema"]["properties"]
        assert ["key_id"] == [p["name"] for p in rotate["parameters"]]

    def test_schemathesis_loads_document(self, document):
        schema = schemathesis.openapi.from_dict(document)

        operations = [result.ok() for result in schema.get_all_operations()]

        assert len(operations) >= len(document["paths"])


@pytest.mark.e2e
def test_served_document_is_committed(edge):
    response = edge.request("GET", "/v1/openapi.json")

    assert 200 == response.status
    assert json.loads(API_DESCRIPTION_FILE.read_text()) == response.json()
