"""Settings of the billing service, read once from the environment."""

import urllib.parse
from dataclasses import dataclass

from services.common.config import ConfigError, Environment, ServerConfig

# Stripe API version every request pins, so that a change of the account's
# default version on Stripe's side cannot change the shapes this service
# reads. It is the version stripe-python 16.1.0 is generated for; the
# webhook endpoint in Stripe's dashboard must use the same version.
STRIPE_API_VERSION = "2026-10-28.endive"
DEFAULT_STRIPE_API_BASE = "https://api.stripe.com"
# Stripe's own default for the signature timestamp's age, in seconds.
DEFAULT_WEBHOOK_TOLERANCE = 300
# Shortest interval in seconds of the in-process usage report loop.
MIN_USAGE_REPORT_SECONDS = 0.1


def _base_url(env: Environment, name: str, default: str) -> str:
    value = env.text(name, default).rstrip("/")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ConfigError(
            f"{name}={value!r} is invalid: expected a base URL such as "
            f"{default}"
        )
    if parts.scheme == "http" and parts.hostname not in (
        "127.0.0.1",
        "::1",
        "localhost",
    ):
        raise ConfigError(
            f"{name}={value!r} is invalid: plain http is allowed only for a "
            "local test server on 127.0.0.1, ::1 or localhost"
        )

    return value


def _return_url(env: Environment, name: str, default: str) -> str:
    """Read a page that Stripe sends the user back to.

    Rejects plain http except on loopback, and a host under `.invalid`
    (reserved by RFC 2606), which the Kubernetes manifests ship as a
    placeholder until the operator sets the edge's public address.
    """
    value = env.text(name, default)
    parts = urllib.parse.urlsplit(value)
    host = (parts.hostname or "").rstrip(".")
    if host == "invalid" or host.endswith(".invalid"):
        raise ConfigError(
            f"{name}={value!r} is a placeholder: set it to a page under the "
            "edge's public https address, for example "
            "https://api.hospital.example/"
        )
    loopback = host in ("127.0.0.1", "::1", "localhost")
    if not host or parts.scheme not in ("https", "http"):
        raise ConfigError(
            f"{name}={value!r} is invalid: expected an absolute https URL "
            "such as https://api.hospital.example/"
        )
    if parts.scheme == "http" and not loopback:
        raise ConfigError(
            f"{name}={value!r} is invalid: plain http is allowed only for "
            "127.0.0.1, ::1 or localhost; use https"
        )

    return value


@dataclass(frozen=True)
class StripeConfig:
    """Outbound Stripe settings; present only when an API key is set."""

    api_key: str
    # Base URL of Stripe's API: a local Stripe-compatible server in tests.
    api_base: str
    # Price of the Pro plan's flat fee, which checkout sells.
    pro_price_id: str
    # Metered price linked to the usage meter; None sells no metered item.
    metered_price_id: str | None
    # `event_name` of the Stripe meter that receives daily request counts.
    meter_event_name: str
    # Pages Stripe sends the user to after checkout or from the portal.
    success_url: str
    cancel_url: str
    portal_return_url: str
    # Retries of a failed network call; Stripe's SDK backs off between them.
    max_network_retries: int
    # Seconds one HTTP attempt may take.
    request_timeout: float

    @classmethod
    def from_env(cls, env: Environment) -> "StripeConfig | None":
        api_key = env.optional("STRIPE_API_KEY")
        if api_key is None:
            return None
        # The default suits `make run` only; the Kubernetes manifests set
        # a placeholder that this check rejects until the operator sets it.
        return_url = _return_url(
            env, "ARXIO_BILLING_RETURN_URL", "https://localhost:8443/"
        )

        return cls(
            api_key=api_key,
            api_base=_base_url(
                env, "STRIPE_API_BASE", DEFAULT_STRIPE_API_BASE
            ),
            pro_price_id=env.text("STRIPE_PRO_PRICE_ID"),
            metered_price_id=env.optional("STRIPE_METERED_PRICE_ID"),
            meter_event_name=env.text(
                "STRIPE_METER_EVENT_NAME", "arxio_api_requests"
            ),
            success_url=_return_url(
                env, "ARXIO_BILLING_SUCCESS_URL", return_url
            ),
            cancel_url=_return_url(
                env, "ARXIO_BILLING_CANCEL_URL", return_url
            ),
            portal_return_url=return_url,
            max_network_retries=env.integer(
                "STRIPE_MAX_NETWORK_RETRIES", 2, minimum=0, maximum=5
            ),
            request_timeout=env.number(
                "STRIPE_REQUEST_TIMEOUT_SECONDS", 10.0, minimum=1
            ),
        )


@dataclass(frozen=True)
class UsageReportConfig:
    """The periodic job that sends daily usage to Stripe's meter."""

    # Seconds between runs of the billing service's own loop; 0 turns the
    # loop off, for deployments that run `python -m
    # services.billing.report_usage` on a schedule instead.
    interval: float
    # Days back from yesterday that a run reports, so a job that was down
    # catches up. Stripe accepts meter events up to 35 days old.
    lookback_days: int
    # Seconds after midnight UTC before a finished day counts as final, so
    # requests counted just before midnight are included.
    settle_seconds: int

    @classmethod
    def from_env(cls, env: Environment) -> "UsageReportConfig":
        interval = env.number(
            "ARXIO_BILLING_USAGE_REPORT_SECONDS", 3600.0, minimum=0
        )
        if 0 < interval < MIN_USAGE_REPORT_SECONDS:
            raise ConfigError(
                f"ARXIO_BILLING_USAGE_REPORT_SECONDS={interval} is below the "
                f"minimum {MIN_USAGE_REPORT_SECONDS}: set a longer interval, "
                "or 0 to turn the loop off"
            )

        return cls(
            interval=interval,
            lookback_days=env.integer(
                "ARXIO_BILLING_USAGE_LOOKBACK_DAYS", 30, minimum=1, maximum=34
            ),
            settle_seconds=env.integer(
                "ARXIO_BILLING_USAGE_SETTLE_SECONDS",
                600,
                minimum=0,
                maximum=86_400,
            ),
        )


@dataclass(frozen=True)
class BillingConfig:
    server: ServerConfig
    database_url: str
    # host:port of the auth service, whose certificate must name that host.
    auth_address: str
    # Secret of Stripe's webhook endpoint (`whsec_...`); None rejects every
    # webhook delivery.
    webhook_secret: str | None
    # Seconds a webhook signature's timestamp may be from now, either way.
    webhook_tolerance: int
    stripe: StripeConfig | None
    usage_report: UsageReportConfig

    @classmethod
    def from_env(cls, env: Environment) -> "BillingConfig":
        return cls(
            server=ServerConfig.from_env(env, default_port=50054),
            database_url=env.text("DATABASE_URL"),
            auth_address=env.text("ARXIO_AUTH_ADDRESS", "127.0.0.1:50051"),
            webhook_secret=env.optional("STRIPE_WEBHOOK_SECRET"),
            webhook_tolerance=env.integer(
                "STRIPE_WEBHOOK_TOLERANCE_SECONDS",
                DEFAULT_WEBHOOK_TOLERANCE,
                minimum=1,
                maximum=3600,
            ),
            stripe=StripeConfig.from_env(env),
            usage_report=UsageReportConfig.from_env(env),
        )
