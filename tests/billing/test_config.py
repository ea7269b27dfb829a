"""Billing settings read from the environment."""

import pytest

from services.billing.config import (
    DEFAULT_STRIPE_API_BASE,
    StripeConfig,
    UsageReportConfig,
)
from services.common.config import ConfigError, Environment


def stripe_from(**values: str) -> StripeConfig | None:
    return StripeConfig.from_env(Environment(values))


class TestStripeConfig:
    def test_no_key_means_no_stripe(self):
        assert stripe_from(STRIPE_PRO_PRICE_ID="price_1") is None

    def test_defaults(self):
        config = stripe_from(
            STRIPE_API_KEY="sk_test_1", STRIPE_PRO_PRICE_ID="price_1"
        )

        assert DEFAULT_STRIPE_API_BASE == config.api_base
        assert 2 == config.max_network_retries
        assert config.metered_price_id is None
        assert "arxio_api_requests" == config.meter_event_name

    def test_missing_price_named(self):
        with pytest.raises(ConfigError, match="STRIPE_PRO_PRICE_ID"):
            stripe_from(STRIPE_API_KEY="sk_test_1")

    def test_local_http_base_allowed(self):
        config = stripe_from(
            STRIPE_API_KEY="sk_test_1",
            STRIPE_PRO_PRICE_ID="price_1",
            STRIPE_API_BASE="http://127.0.0.1:12111/",
        )

        assert "http://127.0.0.1:12111" == config.api_base

    @pytest.mark.parametrize(
        "base", ["http://stripe.example.test", "ftp://127.0.0.1", "127.0.0.1"]
    )
    def test_invalid_base_rejected(self, base):
        with pytest.raises(ConfigError, match="STRIPE_API_BASE"):
            stripe_from(
                STRIPE_API_KEY="sk_test_1",
                STRIPE_PRO_PRICE_ID="price_1",
                STRIPE_API_BASE=base,
            )

    @pytest.mark.parametrize(
        "url",
        [
            "https://edge-address-not-set.invalid/",
            "https://api.arxio.invalid./billing",
        ],
    )
    def test_placeholder_return_url_rejected(self, url):
        """The manifests' placeholder fails the settings at start."""
        with pytest.raises(ConfigError, match="placeholder"):
            stripe_from(
                STRIPE_API_KEY="sk_test_1",
                STRIPE_PRO_PRICE_ID="price_1",
                ARXIO_BILLING_RETURN_URL=url,
            )

    @pytest.mark.parametrize(
        ("setting", "url"),
        [
            ("ARXIO_BILLING_RETURN_URL", "http://api.hospital.org/"),
            ("ARXIO_BILLING_SUCCESS_URL", "ftp://api.hospital.org/"),
            ("ARXIO_BILLING_CANCEL_URL", "api.hospital.org/billing"),
        ],
    )
    def test_invalid_return_urls_rejected(self, setting, url):
        with pytest.raises(ConfigError, match=setting):
            stripe_from(
                STRIPE_API_KEY="sk_test_1",
                STRIPE_PRO_PRICE_ID="price_1",
                **{setting: url},
            )

    def test_return_url_defaults_pages(self):
        """Checkout's success and cancel pages default to the return URL."""
        config = stripe_from(
            STRIPE_API_KEY="sk_test_1",
            STRIPE_PRO_PRICE_ID="price_1",
            ARXIO_BILLING_RETURN_URL="https://api.hospital.org/billing",
        )

        assert "https://api.hospital.org/billing" == config.success_url
        assert "https://api.hospital.org/billing" == config.cancel_url
        assert "https://api.hospital.org/billing" == config.portal_return_url

    def test_retries_bounded(self):
        with pytest.raises(ConfigError, match="maximum 5"):
            stripe_from(
                STRIPE_API_KEY="sk_test_1",
                STRIPE_PRO_PRICE_ID="price_1",
                STRIPE_MAX_NETWORK_RETRIES="50",
            )


class TestUsageReportConfig:
    def test_lookback_within_stripe_window(self):
        """Stripe accepts meter events up to 35 days old."""
        with pytest.raises(ConfigError, match="maximum 34"):
            UsageReportConfig.from_env(
                Environment({"ARXIO_BILLING_USAGE_LOOKBACK_DAYS": "40"})
            )

    def test_zero_turns_loop_off(self):
        """0 leaves usage reports to the usage-report CronJob."""
        config = UsageReportConfig.from_env(
            Environment({"ARXIO_BILLING_USAGE_REPORT_SECONDS": "0"})
        )

        assert 0 == config.interval

    def test_tiny_interval_rejected(self):
        with pytest.raises(ConfigError, match="minimum 0.1"):
            UsageReportConfig.from_env(
                Environment({"ARXIO_BILLING_USAGE_REPORT_SECONDS": "0.01"})
            )
