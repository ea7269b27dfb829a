"""Property-based fuzzing of the running edge.

Schemathesis generates valid and invalid requests for every operation of
docs/openapi.json; Hypothesis adds raw requests that no schema describes
(odd methods, paths, content types, bodies and headers). Every response
must keep the edge's promises (tests/fuzz/checks.py): no 5xx, the security
headers and a request id everywhere, and every error a google.rpc.Status
JSON body carrying that request id.

The run sends at least MIN_REQUESTS requests and stops generating at
TIME_BUDGET_SECONDS. It prints how many it sent.

Credentials: requests carry no key, an unknown key or a valid Enterprise
key (no daily limit). The operator credential is never sent, because
operator methods store URLs that the services would resolve, and a fuzzer
must not aim traffic at hosts it picks.
"""

import json
import string
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from services.auth.keys import generate_key
from services.launcher.edge_guards import API_DESCRIPTION_FILE
from tests.fuzz.checks import response_problems
from tests.suite import Organization

pytestmark = pytest.mark.e2e

MIN_REQUESTS = 10_000
# Generated cases per operation and generation mode; the raw phase tops
# the count up to MIN_REQUESTS, with at least MIN_RAW_REQUESTS.
SCHEMA_CASES = 110
MIN_RAW_REQUESTS = 2_000
# Requests in flight at once.
SENDERS = 6
TIME_BUDGET_SECONDS = 300.0
REQUEST_TIMEOUT_SECONDS = 30
# Failures kept for the report; the count covers them all.
MAX_REPORTED = 30
REVIEW_PATH = "/v1/cds/clinical-review"


@dataclass
class Tally:
    """Requests sent and every response that broke a promise."""

    deadline: float
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _fail(self, text: str) -> None:
        self.failure_count += 1
        if len(self.failures) < MAX_REPORTED:
            self.failures.append(text)

    def record_error(self, request: str, error: Exception) -> None:
        """Count a request that got no HTTP response at all."""
        with self.lock:
            self.sent += 1
            self._fail(f"{request} -> {error!r:.300}")

    def record(self, request: str, method: str, response) -> None:
        headers = {
            name.lower(): value if isinstance(value, str) else value[0]
            for name, value in response.headers.items()
        }
        problems = response_problems(
            method, response.status_code, headers, response.content
        )
        with self.lock:
            self.sent += 1
            self.statuses[response.status_code] += 1
            if problems:
                self._fail(
                    f"{request} -> {response.status_code}: {problems} "
                    f"{response.content[:300]!r}"
                )


@pytest.fixture(scope="module")
def tally(stack) -> Tally:
    return Tally(deadline=time.monotonic() + TIME_BUDGET_SECONDS)


@pytest.fixture(scope="module")
def base_url(stack) -> str:
    return f"https://localhost:{stack.edge_port}"


@pytest.fixture(scope="module")
def ca_file(stack) -> str:
    return str(stack.certs_dir / "ca.crt")


@pytest.fixture(scope="module")
def credentials(stack) -> list[dict[str, str]]:
    valid = {"x-api-key": Organization(stack, "enterprise").api_key}

    # Mostly the valid key: most requests should pass authentication and
    # reach the body checks and the services.
    return [valid, valid, valid, {}, {"x-api-key": generate_key()}]


FUZZ_SETTINGS = settings(
    database=None,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def send_all(requests_to_send: list, send, tally: Tally) -> None:
    """Send generated requests from SENDERS threads until the deadline.

    Generation is single-threaded and cheap. Sending is mostly waiting for
    the edge, the services and PostgreSQL, so several requests in flight
    keep both cores busy.
    """
    local = threading.local()

    def send_one(item) -> None:
        if tally.expired():
            return
        if not hasattr(local, "session"):
            local.session = requests.Session()
            # No proxy or CA bundle from the environment: only the
            # suite's edge, trusted through the suite's own CA.
            local.session.trust_env = False
        send(local.session, item)

    with ThreadPoolExecutor(SENDERS) as pool:
        list(pool.map(send_one, requests_to_send))


def without_model_review(case) -> None:
    """Ask for the rules-only review: the model takes seconds a call."""
    if case.operation.path != REVIEW_PATH or not isinstance(case.body, dict):
        return
    options = case.body.get("options")
    if options is None:
        case.body["options"] = {"modelReview": False}
    elif isinstance(options, dict):
        options["modelReview"] = False


def generate_schema_cases(operation, mode, credentials) -> list:
    generated = []

    @settings(FUZZ_SETTINGS, max_examples=SCHEMA_CASES)
    @given(
        case=operation.as_strategy(mode),
        credential=st.sampled_from(credentials),
    )
    def collect(case, credential):
        without_model_review(case)
        generated.append((case, credential))

    collect()

    return generated


def test_schema_operations(base_url, ca_file, credentials, tally):
    """Valid and invalid requests to every documented operation."""
    document = json.loads(API_DESCRIPTION_FILE.read_text())
    schema = schemathesis.openapi.from_dict(document)
    cases = []
    skipped = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                cases += generate_schema_cases(operation, mode, credentials)
            except Unsatisfiable:
                # Nothing in the operation can be made invalid.
                skipped.append(f"{operation.label} ({mode})")

    def send(session, item) -> None:
        case, credential = item
        request = f"{case.method} {case.formatted_path}"
        try:
            response = case.call(
                base_url=base_url,
                session=session,
                headers=credential,
                timeout=REQUEST_TIMEOUT_SECONDS,
                verify=ca_file,
            )
        except (requests.exceptions.InvalidHeader, UnicodeError, ValueError):
            # The client library refused to send it: nothing reached the
            # edge.
            return
        except requests.exceptions.RequestException as error:
            tally.record_error(request, error)
            return
        tally.record(request, case.method, response)

    send_all(cases, send, tally)
    print(
        f"\nschema fuzzing sent {tally.sent} of {len(cases)} generated "
        f"requests in {tally.elapsed():.0f} s; statuses "
        f"{dict(sorted(tally.statuses.items()))}; "
        f"nothing to make invalid in {skipped}"
    )

    assert [] == tally.failures, f"{tally.failure_count} failures"
    assert tally.sent > 0


# Raw requests: what a schema-driven fuzzer does not send.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-16",
    "text/plain",
    "application/xml",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zz",
    "application/grpc",
    "application/grpc+proto",
    "application/grpc-web",
    "application/octet-stream",
    "",
    ";;;",
]
SEGMENT_CHARACTERS = string.ascii_letters + string.digits + "-._~:@!$&'()*+,;="
PERCENT_ESCAPES = ["%00", "%2F", "%2f", "%5C", "%C0", "%FF", "%E2%82%AC"]


def documented_paths() -> list[str]:
    document = json.loads(API_DESCRIPTION_FILE.read_text())

    return list(document["paths"])


@st.composite
def raw_paths(draw) -> str:
    template = draw(st.sampled_from([*documented_paths(), "/", "/v1"]))
    segment = st.one_of(
        st.text(SEGMENT_CHARACTERS, min_size=1, max_size=20),
        st.sampled_from(PERCENT_ESCAPES),
        st.sampled_from(["..", ".", "", "%2e%2e"]),
    )
    path = template
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + draw(segment) + path[end + 1 :]
    if draw(st.booleans()):
        path += "/" + draw(segment)
    if draw(st.integers(0, 3)) == 0:
        key = draw(st.text(SEGMENT_CHARACTERS, min_size=1, max_size=10))
        value = draw(st.one_of(segment, st.just("")))
        path += f"?{key}={value}"

    return path


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
raw_bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.just(b'{"medications": [' * 200),
    st.just(b"\xff\xfe{}"),
)
header_values = st.text(
    string.ascii_letters + string.digits + " -_/;=,.:", max_size=40
)


@st.composite
def raw_requests(draw) -> tuple[str, str, dict[str, str], bytes | None]:
    method = draw(st.sampled_from(METHODS))
    path = draw(raw_paths())
    headers = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers["content-type"] = content_type
    for _ in range(draw(st.integers(0, 3))):
        name = draw(
            st.sampled_from(
                [
                    "x-request-id",
                    "x-org-id",
                    "x-forwarded-for",
                    "origin",
                    "te",
                    "accept",
                    "authorization",
                    "x_api_key",
                    "x-custom",
                ]
            )
        )
        headers[name] = draw(header_values)

    return method, path, headers, draw(raw_bodies)


def test_raw_requests(base_url, ca_file, credentials, tally):
    """Raw requests top the total up to MIN_REQUESTS."""
    before = tally.sent
    reported = len(tally.failures)
    # A few generated requests are never sent: the client library refuses
    # some header values.
    wanted = max(int((MIN_REQUESTS - tally.sent) * 1.1), MIN_RAW_REQUESTS)
    generated = []

    @settings(FUZZ_SETTINGS, max_examples=wanted)
    @given(request=raw_requests(), credential=st.sampled_from(credentials))
    def collect(request, credential):
        generated.append((request, credential))

    collect()

    def send(session, item) -> None:
        (method, path, headers, body), credential = item
        if path.startswith(REVIEW_PATH) and credential.get("x-api-key"):
            body = rules_only(body)
        try:
            response = session.request(
                method,
                base_url + path,
                headers=credential | headers,
                data=body,
                timeout=REQUEST_TIMEOUT_SECONDS,
                allow_redirects=False,
                verify=ca_file,
            )
        except (requests.exceptions.InvalidHeader, UnicodeError, ValueError):
            return
        except requests.exceptions.RequestException as error:
            tally.record_error(f"{method} {path} {headers}", error)
            return
        tally.record(f"{method} {path} {headers}", method, response)

    send_all(generated, send, tally)
    print(
        f"\nraw fuzzing sent {tally.sent - before} requests; "
        f"{tally.sent} in all, in {tally.elapsed():.0f} s"
    )

    assert [] == tally.failures[reported:], f"{tally.failure_count} failures"
    assert tally.sent >= MIN_REQUESTS, (
        f"only {tally.sent} requests in {TIME_BUDGET_SECONDS} s"
    )


def rules_only(body: bytes | None) -> bytes | None:
    """Turn the model review off in a review body that may pass the checks.

    An empty body is a valid review of nothing, which would wait seconds
    for the model.
    """
    if not body or not body.strip():
        return json.dumps({"options": {"modelReview": False}}).encode()
    try:
        value = json.loads(body)
    except ValueError:
        return body
    if not isinstance(value, dict):
        return body
    options = value.get("options")
    if isinstance(options, dict):
        options["modelReview"] = False
    elif options is None:
        value["options"] = {"modelReview": False}

    return json.dumps(value).encode()
