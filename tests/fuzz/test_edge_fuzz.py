"""Property-based fuzzing of the running edge.

Schemathesis generates valid and invalid requests for every operation of
docs/openapi.json; Hypothesis adds raw requests that no schema describes
(odd methods, paths, content types, bodies and headers, gzip-compressed
native gRPC messages, headers of 8 to 33 KiB). Every response must keep
the edge's promises (tests/fuzz/checks.py): no 5xx, the security headers
and a request id everywhere, and every error a google.rpc.Status JSON body
carrying that request id. Half the raw requests plant a marker value, a
lone surrogate or a loosely written integer in body or query values, and
no error may repeat what they planted.

The run sends at least MIN_REQUESTS requests and stops generating at
TIME_BUDGET_SECONDS. It prints how many it sent.

Credentials: requests carry no key, an unknown key or a valid Enterprise
key (no daily limit). The operator credential is never sent, because
operator methods store URLs that the services would resolve, and a fuzzer
must not aim traffic at hosts it picks.
"""

import gzip
import json
import string
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis
from arxio.cds.v1 import cds_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from services.auth.keys import generate_key
from services.launcher.edge_guards import API_DESCRIPTION_FILE
from tests.fuzz.checks import echo_problems, response_problems
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

    def record(
        self,
        request: str,
        method: str,
        response,
        planted: "Planted | None" = None,
    ) -> None:
        headers = {
            name.lower(): value if isinstance(value, str) else value[0]
            for name, value in response.headers.items()
        }
        problems = response_problems(
            method, response.status_code, headers, response.content
        )
        if planted is not None:
            problems += planted.problems(
                response.status_code, headers, response.content
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
                    # gRPC metadata that a service parses itself.
                    "grpc-timeout",
                    "grpc-encoding",
                    "x-custom-bin",
                ]
            )
        )
        headers[name] = draw(header_values)

    return method, path, headers, draw(raw_bodies)


# Planted values: a marker that stands for patient data, lone surrogates,
# and integers written in ways Python's int() reads but proto3 JSON does
# not (or does: "+7319" and "07319"). Their digits 7319 are out of every
# range, so a range error could quote them too.
MARKER = "zzfuzzmarker"
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
LOOSE_INTEGERS = [
    "7_319",
    " 7319 ",
    "7319 ",
    "\u0667\u0663\u0661\u0669",
    "\uff17\uff13\uff11\uff19",
    "+7319",
    "07319",
    "7319",
    "7.319e3",
]
# What an error must not contain when a request planted a loose integer.
LOOSE_INTEGER_ECHOES = [
    "7319",
    "7_319",
    "\u0667\u0663\u0661\u0669",
    "\uff17\uff13",
]
GRPC_REVIEW_PATH = (
    "/arxio.cds.v1.ClinicalDecisionSupportService/ClinicalReview"
)
# A valid review; one of its leaves gets a planted value.
REVIEW_TEMPLATE = {
    "patient": {"ageYears": 70, "sex": "FEMALE", "weightKg": 60, "egfr": 40},
    "medications": [
        {
            "name": "warfarin",
            "rxnorm": "11289",
            "dose": {"value": 5, "unit": "mg"},
            "route": "oral",
            "frequency": "daily",
        }
    ],
    "conditions": [{"name": "atrial fibrillation", "icd10": "I48"}],
    "allergies": [{"substance": "penicillin", "severity": "SEVERE"}],
    "question": "any interactions?",
}
# Query parameters of GET routes, each with a type the transcoder parses.
MARKED_QUERIES = [
    ("/v1/audit", ["pageSize", "page_size", "startTime", "statusCode"]),
    ("/v1/audit", ["action", "keyId", "pageToken", "endTime"]),
    ("/v1/keys", ["pageSize", "pageToken"]),
    ("/v1/billing/usage", ["startDate", "endDate"]),
]
# Header sizes around the edge's 32 KiB limit and gRPC's old 8 and 16 KiB.
LARGE_HEADER_SIZES = [8_500, 16_500, 24_000, 30_000, 32_400, 33_000]


@dataclass(frozen=True)
class Planted:
    """What a request planted, and so what its error must not repeat."""

    echoes: tuple[str, ...] = (MARKER,)
    # Headers the edge admits must reach the services: no 429 from a
    # service's metadata limit.
    large_headers: bool = False
    # A native gRPC message that no check may let through.
    invalid_message: bool = False

    def problems(self, status: int, headers: dict, body: bytes) -> list[str]:
        # Request ids are hexadecimal and may contain the digits planted.
        body = body.replace(headers.get("x-request-id", "").encode(), b"")
        problems = []
        for echo in self.echoes:
            problems += echo_problems(echo, status, headers, body)
        if self.large_headers and status == 429:
            problems.append("headers the edge admits got 429")
        grpc_status = headers.get("grpc-status")
        if grpc_status == "13":
            problems.append("a gRPC message got INTERNAL, not a client error")
        if self.invalid_message and status < 400 and grpc_status is None:
            problems.append("an invalid gRPC message was accepted")

        return problems


marked_text = st.builds(
    lambda before, surrogate, after: before + MARKER + surrogate + after,
    st.text(string.ascii_letters + " ", max_size=4),
    st.sampled_from(["", *LONE_SURROGATES]),
    st.text(max_size=4),
)
planted_values = st.one_of(
    marked_text,
    st.sampled_from(LOOSE_INTEGERS),
    st.sampled_from(LONE_SURROGATES).map(lambda text: MARKER + text),
)


def leaf_paths(value, path=()) -> list[tuple]:
    if isinstance(value, dict):
        return [
            leaf
            for key, item in value.items()
            for leaf in leaf_paths(item, (*path, key))
        ]
    if isinstance(value, list):
        return [
            leaf
            for index, item in enumerate(value)
            for leaf in leaf_paths(item, (*path, index))
        ]

    return [path]


def planted_for(value: str) -> Planted:
    echoes = [MARKER] if MARKER in value else []
    echoes += [echo for echo in LOOSE_INTEGER_ECHOES if echo in value]

    return Planted(tuple(echoes))


@st.composite
def marked_review(draw) -> tuple:
    body = json.loads(json.dumps(REVIEW_TEMPLATE))
    path = draw(st.sampled_from(leaf_paths(REVIEW_TEMPLATE)))
    value = draw(planted_values)
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    body["options"] = {"modelReview": False}
    # json.dumps writes a lone surrogate as its \u escape.
    data = json.dumps(body).encode()
    headers = {"content-type": "application/json"}

    return "POST", REVIEW_PATH, headers, data, planted_for(value)


@st.composite
def marked_query(draw) -> tuple:
    path, names = draw(st.sampled_from(MARKED_QUERIES))
    name = draw(st.sampled_from(names))
    value = draw(planted_values)
    # Lone surrogates cannot be encoded as UTF-8: send their escape text.
    quoted = urllib.parse.quote(value, safe="", errors="backslashreplace")
    query = f"{name}={quoted}"
    if draw(st.booleans()):
        # The same parameter again, maybe under its other name.
        query += f"&{draw(st.sampled_from(names))}=1"

    return "GET", f"{path}?{query}", {}, None, planted_for(value)


def _uncompressed(data: bytes) -> bytes:
    return data


@st.composite
def compressed_grpc(draw) -> tuple:
    """A native gRPC review, gzip or deflate compressed or claiming to be."""
    question = draw(st.one_of(marked_text, st.just(MARKER + "\x00")))
    # The options first, so a cut message still skips the model, which
    # takes seconds a call. Serialized messages concatenate as a merge.
    message = cds_pb2.ClinicalReviewRequest(
        options=cds_pb2.ReviewOptions(model_review=False)
    ).SerializeToString()
    message += cds_pb2.ClinicalReviewRequest(
        question=question.encode("utf-8", "replace").decode()
    ).SerializeToString()
    invalid = "\x00" in question
    if draw(st.booleans()):
        # Field 99, varint 1: unknown to ClinicalReviewRequest.
        message += bytes([0x98, 0x06, 0x01])
        invalid = True
    compressions = [gzip.compress, zlib.compress, _uncompressed]
    if draw(st.integers(0, 4)) == 0:
        invalid = True
        # Inflates past the 64 KiB message limit. Always compressed, so
        # the generated requests stay small in memory.
        size = draw(st.sampled_from([70_000, 400_000, 2_000_000]))
        message = cds_pb2.ClinicalReviewRequest(
            question="x" * size,
            options=cds_pb2.ReviewOptions(model_review=False),
        ).SerializeToString()
        compressions = compressions[:2]
    encoding = draw(
        st.sampled_from(["gzip", "deflate", "identity", "", "snappy", "GZIP"])
    )
    compress = draw(st.sampled_from(compressions))
    payload = compress(message)
    if draw(st.integers(0, 5)) == 0:
        # Never to nothing: an empty message is a valid review that asks
        # for the model.
        payload = payload[: draw(st.integers(1, len(payload)))]
        if compress is _uncompressed:
            # An uncompressed message cut before its invalid field can be
            # a valid review, so only the other checks apply to it.
            invalid = False
    flag = draw(st.sampled_from([b"\x00", b"\x01", b"\x01", b"\x02"]))
    body = flag + len(payload).to_bytes(4, "big") + payload
    headers = {"content-type": "application/grpc", "te": "trailers"}
    if encoding:
        headers["grpc-encoding"] = encoding

    return (
        "POST",
        GRPC_REVIEW_PATH,
        headers,
        body,
        Planted(invalid_message=invalid),
    )


@st.composite
def large_headers(draw) -> tuple:
    size = draw(st.sampled_from(LARGE_HEADER_SIZES))
    method, path = draw(
        st.sampled_from([("POST", REVIEW_PATH), ("GET", "/v1/billing/usage")])
    )
    headers = {"x-filler": "a" * size}
    body = None
    if method == "POST":
        headers["content-type"] = "application/json"
        body = json.dumps({"options": {"modelReview": False}}).encode()

    return method, path, headers, body, Planted((), large_headers=True)


planted_requests = st.one_of(
    marked_review(), marked_query(), compressed_grpc(), large_headers()
)


def test_raw_requests(base_url, ca_file, credentials, tally):
    """Raw requests top the total up to MIN_REQUESTS."""
    before = tally.sent
    reported = len(tally.failures)
    # A few generated requests are never sent: the client library refuses
    # some header values.
    wanted = max(int((MIN_REQUESTS - tally.sent) * 1.1), MIN_RAW_REQUESTS)
    generated = []

    @settings(FUZZ_SETTINGS, max_examples=wanted)
    @given(
        request=st.one_of(
            raw_requests().map(lambda request: (*request, None)),
            planted_requests,
        ),
        credential=st.sampled_from(credentials),
    )
    def collect(request, credential):
        generated.append((request, credential))

    collect()

    def send(session, item) -> None:
        (method, path, headers, body, planted), credential = item
        if (
            planted is None
            and path.startswith(REVIEW_PATH)
            and credential.get("x-api-key")
        ):
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
            tally.record_error(f"{method} {path} {headers}"[:300], error)
            return
        tally.record(
            f"{method} {path} {headers}"[:300], method, response, planted
        )

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
