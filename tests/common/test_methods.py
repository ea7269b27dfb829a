"""The RPC table read from the API's descriptors."""

import pytest

from services.common import methods


class TestPublicMethods:
    def test_every_rpc_has_a_policy(self):
        """Each public RPC declares authentication and a resource type."""
        for method in methods.public_methods():
            assert method.authentication != 0, method.grpc_path
            assert method.resource_type, method.grpc_path

    def test_key_methods_name_a_real_scope(self):
        """Every API-key method's scope is an ApiKey.Scope value."""
        from arxio.auth.v1 import keys_pb2

        scopes = set(keys_pb2.ApiKey.Scope.keys())
        for method in methods.public_methods():
            if method.authentication == methods.Authentication.API_KEY:
                assert method.scope in scopes, method.grpc_path

    def test_actions_are_unique(self):
        """No two RPCs share an audit action."""
        actions = [method.action for method in methods.public_methods()]

        assert len(set(actions)) == len(actions)


class TestFindMethod:
    @pytest.mark.parametrize(
        ("http_method", "path", "action"),
        [
            ("POST", "/v1/cds/clinical-review", "cds.clinical_review"),
            ("GET", "/v1/audit?pageSize=5", "audit.list_audit_events"),
            ("POST", "/v1/keys", "auth.create_key"),
            ("GET", "/v1/keys", "auth.list_keys"),
            ("POST", "/v1/keys/key_1:rotate", "auth.rotate_key"),
            ("DELETE", "/v1/keys/key_1", "auth.revoke_key"),
            ("GET", "/v1/billing/usage", "billing.get_usage"),
            (
                "POST",
                "/arxio.cds.v1.ClinicalDecisionSupportService/ClinicalReview",
                "cds.clinical_review",
            ),
        ],
    )
    def test_binding_resolves_to_action(self, http_method, path, action):
        """REST bindings and gRPC paths resolve to their audit action."""
        assert action == methods.find_method(http_method, path).action

    @pytest.mark.parametrize(
        ("http_method", "path"),
        [
            ("GET", "/v1/cds/clinical-review"),
            ("DELETE", "/v1/keys"),
            ("GET", "/v1/keys/a/b"),
            ("POST", "/arxio.internal.v1.AccountService/GetOrganization"),
            ("GET", "/"),
        ],
    )
    def test_unknown_request_resolves_to_none(self, http_method, path):
        """Wrong methods, extra segments and internal RPCs match nothing."""
        assert methods.find_method(http_method, path) is None

    def test_snake_case_of_rpc_names(self):
        """RPC names become snake_case actions."""
        assert "list_audit_events" == methods.snake_case("ListAuditEvents")
