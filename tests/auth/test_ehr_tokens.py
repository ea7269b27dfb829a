"""CDS Hooks JWT verification against a registered issuer's keys."""

import asyncio
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.auth.ehr_store import TrustedIssuer
from services.auth.ehr_tokens import (
    EhrTokenVerifier,
    TokenRejected,
    audiences,
)
from services.auth.store import Credential

BASE_URL = "https://cds.example.org"
PATH = "/cds-services/arxio-order-sign"
ISSUER = "https://ehr.example.org"
JWKS_URL = "https://ehr.example.org/jwks.json"


class FakeStore:
    def __init__(self) -> None:
        self.used: set[tuple[str, str]] = set()

    async def find_issuer(self, issuer: str) -> TrustedIssuer | None:
        if issuer != ISSUER:
            return None

        return TrustedIssuer(
            issuer_id="i1",
            jwks_url=JWKS_URL,
            credential=Credential(
                key_id="ehr_i1",
                org_id="o1",
                scopes=frozenset({"CLINICAL_REVIEW"}),
                plan="pro",
                org_state="active",
                ip_allowlist=(),
            ),
        )

    async def use_token_id(self, issuer, jti, expire_time) -> bool:
        if (issuer, jti) in self.used:
            return False
        self.used.add((issuer, jti))

        return True


class FakeJwks:
    def __init__(self, keys: dict[str, jwt.PyJWK]) -> None:
        self.keys = keys
        self.urls: list[str] = []

    async def key(self, url: str, kid: str) -> jwt.PyJWK:
        self.urls.append(url)
        if kid not in self.keys:
            raise TokenRejected("no such key")

        return self.keys[kid]


def _public_jwk(private_key, algorithm: str, kid: str) -> jwt.PyJWK:
    algorithms = jwt.algorithms
    encoder = (
        algorithms.ECAlgorithm
        if algorithm.startswith("ES")
        else algorithms.RSAAlgorithm
    )
    data = json.loads(encoder.to_jwk(private_key.public_key()))

    return jwt.PyJWK({**data, "kid": kid, "alg": algorithm})


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def verifier(ec_key, rsa_key):
    jwks = FakeJwks(
        {
            "ec": _public_jwk(ec_key, "ES384", "ec"),
            "rsa": _public_jwk(rsa_key, "RS384", "rsa"),
        }
    )

    return EhrTokenVerifier(FakeStore(), jwks, BASE_URL)


def _token(key, algorithm="ES384", kid="ec", headers=None, **claims):
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": BASE_URL + PATH,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        **claims,
    }

    return jwt.encode(
        payload,
        key,
        algorithm=algorithm,
        headers={"kid": kid, "typ": "JWT", **(headers or {})},
    )


def _verify(verifier, token, path=PATH):
    return asyncio.run(verifier.verify(token, path))


class TestVerify:
    def test_es384_token_authenticates(self, verifier, ec_key):
        """A valid ES384 token names its issuer's organization."""
        issuer = _verify(verifier, _token(ec_key))

        assert "o1" == issuer.credential.org_id
        assert [JWKS_URL] == verifier.jwks.urls

    def test_rs384_token_authenticates(self, verifier, rsa_key):
        """RS384 is the other accepted algorithm."""
        token = _token(rsa_key, algorithm="RS384", kid="rsa")

        assert "o1" == _verify(verifier, token).credential.org_id

    def test_audience_array_accepted(self, verifier, ec_key):
        """aud may be an array holding the endpoint URL."""
        token = _token(ec_key, aud=[BASE_URL + PATH])

        assert "o1" == _verify(verifier, token).credential.org_id

    def test_wrong_audience_rejected(self, verifier, ec_key):
        """A token for another endpoint does not authenticate this one."""
        token = _token(ec_key, aud=BASE_URL + "/cds-services/other")

        with pytest.raises(TokenRejected, match="aud"):
            _verify(verifier, token)

    def test_expired_rejected(self, verifier, ec_key):
        """A token past exp and the leeway is rejected."""
        now = int(time.time())
        token = _token(ec_key, iat=now - 900, exp=now - 120)

        with pytest.raises(TokenRejected, match="expired"):
            _verify(verifier, token)

    def test_replayed_jti_rejected(self, verifier, ec_key):
        """The same token twice: the second use is a replay."""
        token = _token(ec_key)
        _verify(verifier, token)

        with pytest.raises(TokenRejected, match="jti"):
            _verify(verifier, token)

    def test_unknown_issuer_rejected(self, verifier, ec_key):
        """An unregistered iss is rejected before any key is fetched."""
        token = _token(ec_key, iss="https://other-ehr.example.org")

        with pytest.raises(TokenRejected, match="not registered"):
            _verify(verifier, token)
        assert [] == verifier.jwks.urls

    def test_symmetric_algorithm_rejected(self, verifier):
        """HS256 and other shared-secret algorithms are refused."""
        token = _token("a-shared-secret-of-32-bytes-long!", algorithm="HS256")

        with pytest.raises(TokenRejected, match="ES384 or RS384"):
            _verify(verifier, token)

    def test_foreign_jku_rejected(self, verifier, ec_key):
        """A jku other than the registered URL is never followed."""
        token = _token(
            ec_key, headers={"jku": "https://attacker.example/jwks"}
        )

        with pytest.raises(TokenRejected, match="jku"):
            _verify(verifier, token)
        assert [] == verifier.jwks.urls

    def test_long_lived_token_rejected(self, verifier, ec_key):
        """exp far in the future is refused."""
        token = _token(ec_key, exp=int(time.time()) + 86400)

        with pytest.raises(TokenRejected, match="exp"):
            _verify(verifier, token)

    def test_future_iat_rejected(self, verifier, ec_key):
        """A token issued in the future is refused."""
        token = _token(ec_key, iat=int(time.time()) + 600)

        with pytest.raises(TokenRejected, match="iat"):
            _verify(verifier, token)

    def test_missing_jti_rejected(self, verifier, ec_key):
        """jti is required."""
        now = int(time.time())
        token = jwt.encode(
            {
                "iss": ISSUER,
                "aud": BASE_URL + PATH,
                "iat": now,
                "exp": now + 60,
            },
            ec_key,
            algorithm="ES384",
            headers={"kid": "ec"},
        )

        with pytest.raises(TokenRejected, match="jti"):
            _verify(verifier, token)

    def test_wrong_key_signature_rejected(self, verifier):
        """A token signed by another key fails its signature check."""
        other = ec.generate_private_key(ec.SECP384R1())

        with pytest.raises(TokenRejected, match="signature"):
            _verify(verifier, _token(other))

    def test_not_a_jwt(self, verifier):
        """A bearer value that is no JWT is rejected plainly."""
        with pytest.raises(TokenRejected, match="not a JWT"):
            _verify(verifier, "opaque-token")


class TestAudiences:
    def test_feedback_accepts_service_url(self):
        """A feedback call accepts its own URL and its service's URL."""
        assert [
            BASE_URL + PATH + "/feedback",
            BASE_URL + PATH,
        ] == audiences(BASE_URL, PATH + "/feedback")

    def test_query_string_ignored(self):
        """The audience is the endpoint without a query."""
        assert [BASE_URL + "/cds-services"] == audiences(
            BASE_URL + "/", "/cds-services?x=1"
        )


class TestWithoutBaseUrl:
    def test_every_token_rejected(self, ec_key):
        """Without ARXIO_CDS_HOOKS_BASE_URL no JWT authenticates."""
        verifier = EhrTokenVerifier(FakeStore(), FakeJwks({}), None)

        with pytest.raises(TokenRejected, match="ARXIO_CDS_HOOKS_BASE_URL"):
            _verify(verifier, _token(ec_key))
