"""The usage-report CronJob runs the billing service's report once per
schedule, with the billing service's identity and settings."""

import pytest

from tests.k8s.manifests import OVERLAYS, find, pod_spec, rendered

COMMAND = ["python", "-m", "services.billing.report_usage"]


def environment(container: dict) -> dict[str, dict | str | None]:
    return {
        entry["name"]: entry.get("value", entry.get("valueFrom"))
        for entry in container["env"]
    }


def secret_names(spec: dict) -> set[str]:
    return {
        volume["secret"]["secretName"]
        for volume in spec["volumes"]
        if "secret" in volume
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
class TestUsageReport:
    def test_runs_report_command(self, overlay):
        """A CronJob beside the retention one runs the one-shot report."""
        objects = rendered(overlay)
        cronjob = find(objects, "CronJob", "usage-report")
        container = pod_spec(cronjob)["containers"][0]

        assert COMMAND == container["command"]
        assert "Forbid" == cronjob["spec"]["concurrencyPolicy"]
        assert "Etc/UTC" == cronjob["spec"]["timeZone"]
        assert find(objects, "CronJob", "audit-retention")

    def test_shares_billing_settings(self, overlay):
        """It uses billing's database role, certificate, auth address,
        Stripe Secret and return URL."""
        objects = rendered(overlay)
        billing_pod = pod_spec(find(objects, "Deployment", "billing"))
        report_pod = pod_spec(find(objects, "CronJob", "usage-report"))
        billing = environment(billing_pod["containers"][0])
        report = environment(report_pod["containers"][0])
        shared = (
            "DATABASE_URL",
            "ARXIO_AUTH_ADDRESS",
            "ARXIO_BILLING_RETURN_URL",
            "STRIPE_API_KEY",
            "STRIPE_PRO_PRICE_ID",
            "ARXIO_TLS_CERT",
        )

        for name in shared:
            assert billing[name] == report[name], name
        assert {"arxio-tls-billing", "arxio-db-ca"} <= secret_names(report_pod)

    def test_service_loop_off(self, overlay):
        """The billing service leaves reports to the CronJob."""
        billing = pod_spec(find(rendered(overlay), "Deployment", "billing"))

        assert (
            "0"
            == environment(billing["containers"][0])[
                "ARXIO_BILLING_USAGE_REPORT_SECONDS"
            ]
        )

    def test_reaches_auth(self, overlay):
        """Its pods may call the auth service, which admits them."""
        objects = rendered(overlay)
        own = find(objects, "NetworkPolicy", "usage-report")
        auth = find(objects, "NetworkPolicy", "auth")
        egress = [
            rule
            for rule in own["spec"]["egress"]
            if {"podSelector": {"matchLabels": {"app": "auth"}}}
            in rule.get("to", [])
        ]
        admitted = [
            peer["podSelector"]["matchLabels"].get("app")
            for rule in auth["spec"]["ingress"]
            for peer in rule["from"]
        ]

        assert [{"protocol": "TCP", "port": 50051}] == egress[0]["ports"]
        assert "usage-report" in admitted
