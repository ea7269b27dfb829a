"""A local Stripe-compatible HTTP server for tests, on 127.0.0.1.

It serves the four endpoints billing calls, checks what Stripe itself
would reject (API key, pinned version, idempotency keys, required
parameters) and records every request. A reused idempotency key replays the
first response, as Stripe does, and the same key with other parameters is
an `idempotency_error`. Tests can make the next requests fail.
"""

import itertools
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.billing.config import STRIPE_API_VERSION

API_KEY = "sk_test_arxio_local"

REQUIRED_PARAMETERS = {
    "/v1/customers": ("name", "metadata[org_id]"),
    "/v1/checkout/sessions": (
        "mode",
        "customer",
        "client_reference_id",
        "line_items[0][price]",
        "line_items[0][quantity]",
        "success_url",
        "cancel_url",
        "metadata[org_id]",
        "subscription_data[metadata][org_id]",
    ),
    "/v1/billing_portal/sessions": ("customer", "return_url"),
    "/v1/billing/meter_events": (
        "event_name",
        "identifier",
        "timestamp",
        "payload[stripe_customer_id]",
        "payload[value]",
    ),
}


@dataclass
class RecordedRequest:
    method: str
    path: str
    parameters: dict[str, str]
    headers: dict[str, str]
    # True when the response was a replay of an earlier idempotency key.
    replayed: bool = False
    # HTTP status of the response.
    status: int = 0


@dataclass
class Fault:
    status: int
    error_type: str
    remaining: int


@dataclass
class FakeStripeState:
    requests: list[RecordedRequest] = field(default_factory=list)
    # Requests that Stripe would have rejected, as readable reasons.
    violations: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    # Idempotency key -> (parameters, status, response body).
    responses: dict[str, tuple[dict, int, dict]] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)


def _new_object(state: FakeStripeState, path: str, parameters: dict) -> dict:
    number = next(state.ids)
    if path == "/v1/customers":
        return {
            "id": f"cus_test{number}",
            "object": "customer",
            "name": parameters["name"],
            "metadata": {"org_id": parameters["metadata[org_id]"]},
        }
    if path == "/v1/checkout/sessions":
        return {
            "id": f"cs_test{number}",
            "object": "checkout.session",
            "url": f"https://checkout.stripe.test/c/pay/cs_test{number}",
            "expires_at": int(time.time()) + 86_400,
            "customer": parameters["customer"],
            "mode": parameters["mode"],
        }
    if path == "/v1/billing_portal/sessions":
        return {
            "id": f"bps_test{number}",
            "object": "billing_portal.session",
            "url": f"https://billing.stripe.test/p/session/bps_test{number}",
            "customer": parameters["customer"],
        }

    return {
        "object": "billing.meter_event",
        "event_name": parameters["event_name"],
        "identifier": parameters["identifier"],
        "timestamp": int(parameters["timestamp"]),
        "payload": {
            "stripe_customer_id": parameters["payload[stripe_customer_id]"],
            "value": parameters["payload[value]"],
        },
    }


class _Handler(BaseHTTPRequestHandler):
    server: "FakeStripe"

    def log_message(self, format, *args) -> None:
        pass

    def _reply(self, status: int, body: dict) -> None:
        self.server.state.requests[-1].status = status
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", "req_fake")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, error_type: str, message: str) -> None:
        self._reply(
            status, {"error": {"type": error_type, "message": message}}
        )

    def do_POST(self) -> None:
        state = self.server.state
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length).decode()
        parameters = dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))
        headers = {key.lower(): value for key, value in self.headers.items()}
        recorded = RecordedRequest("POST", self.path, parameters, headers)
        with state.lock:
            state.requests.append(recorded)
            if headers.get("authorization") != f"Bearer {API_KEY}":
                # Stripe returns 401 for an unknown key.
                self._error(401, "invalid_request_error", "Invalid API Key")
                return
            problems = self._problems(headers, parameters)
            state.violations.extend(problems)
            if problems:
                self._error(400, "invalid_request_error", "; ".join(problems))
                return
            for fault in state.faults:
                if fault.remaining > 0:
                    fault.remaining -= 1
                    self._error(fault.status, fault.error_type, "injected")
                    return
            key = headers["idempotency-key"]
            if key in state.responses:
                stored_parameters, status, body = state.responses[key]
                if stored_parameters != parameters:
                    self._error(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used "
                        "with the same parameters they were first used with",
                    )
                    return
                recorded.replayed = True
                self._reply(status, body)
                return
            body = _new_object(state, self.path, parameters)
            state.responses[key] = (parameters, 200, body)
        self._reply(200, body)

    def _problems(self, headers: dict, parameters: dict) -> list[str]:
        problems = []
        if self.path not in REQUIRED_PARAMETERS:
            return [f"unknown endpoint {self.path}"]
        if headers.get("stripe-version") != STRIPE_API_VERSION:
            problems.append(
                f"Stripe-Version {headers.get('stripe-version')!r} is not "
                "the pinned version"
            )
        if not headers.get("idempotency-key"):
            problems.append(f"POST {self.path} without an Idempotency-Key")
        for name in REQUIRED_PARAMETERS[self.path]:
            if not parameters.get(name):
                problems.append(f"POST {self.path} without {name}")

        return problems


class FakeStripe(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = FakeStripeState()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "FakeStripe":
        self._thread.start()

        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def fail_next(
        self, count: int, status: int = 500, error_type: str = "api_error"
    ) -> None:
        """Fail the next `count` valid requests with an HTTP error."""
        with self.state.lock:
            self.state.faults.append(Fault(status, error_type, count))

    def requests_to(self, path: str) -> list[RecordedRequest]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path == path]
