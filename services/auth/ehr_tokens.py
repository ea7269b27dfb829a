"""Verify CDS Hooks JWTs from registered EHRs (CDS Hooks 2.0, RFC 7519).

A token authenticates its call when four checks pass. Its `iss` is a
registered issuer, and its ES384 or RS384 signature verifies with a key
of that issuer's JWK Set. Its `aud` is the URL of the endpoint called.
It has not expired and was not issued in the future, and its `jti` was
not used before. The JWK Set is read only from the issuer's registered
https URL, never from the token's own `jku`, within bounded time and
size, and is cached.
"""

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field

import httpx
import jwt
import structlog

from services.auth.ehr_admin import unusable_address
from services.auth.ehr_store import EhrStore, TrustedIssuer

log = structlog.get_logger()

ALGORITHMS = ("ES384", "RS384")
# Seconds of clock difference tolerated on `exp` and `iat`.
LEEWAY = 60
# This service's own limit on how far in the future `exp` may be, which
# bounds how long used `jti` values are kept. EHRs typically issue
# tokens valid for five minutes.
MAX_TOKEN_LIFETIME = 600
MAX_TOKEN_ID_LENGTH = 200
# JWK Set fetching: the auth decision itself has two seconds (Envoy's
# ext_authz timeout), so the fetch gets less.
JWKS_FETCH_TIMEOUT = 1.5
JWKS_MAX_BYTES = 64 * 1024
JWKS_MAX_REDIRECTS = 2
# Seconds a fetched JWK Set is used before it is fetched again, and the
# shortest interval between fetches when a token names an unknown `kid`.
JWKS_TTL = 300
JWKS_MIN_REFETCH = 30


async def _require_usable_host(host: str) -> None:
    """Refuse a host that resolves to a link-local (metadata), multicast or
    unspecified address, however the registered URL wrote it."""
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError as error:
        raise JwksUnavailable(
            f"JWK Set host {host!r} does not resolve"
        ) from error
    for *_, address in found:
        if unusable_address(ipaddress.ip_address(address[0].split("%")[0])):
            raise JwksUnavailable(
                f"JWK Set host {host!r} resolves to {address[0]}, which is "
                "not a usable server address"
            )


class TokenRejected(Exception):
    """The token does not authenticate the call, for the reason given."""


class JwksUnavailable(Exception):
    """The issuer's JWK Set could not be read and none is cached."""


@dataclass
class _CachedKeys:
    keys: dict[str, jwt.PyJWK]
    fetch_time: float


@dataclass
class JwksCache:
    """JWK Sets by URL, fetched over https only."""

    ssl_context: ssl.SSLContext
    timeout: float = JWKS_FETCH_TIMEOUT
    max_bytes: int = JWKS_MAX_BYTES
    _cache: dict[str, _CachedKeys] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def key(self, url: str, kid: str) -> jwt.PyJWK:
        cached = self._cache.get(url)
        now = time.monotonic()
        stale = cached is None or now - cached.fetch_time > JWKS_TTL
        unknown_kid = cached is not None and kid not in cached.keys
        may_refetch = (
            cached is None or now - cached.fetch_time > JWKS_MIN_REFETCH
        )
        if stale or (unknown_kid and may_refetch):
            cached = await self._refresh(url, cached)
        if kid not in cached.keys:
            raise TokenRejected(
                f"no key {kid[:100]!r} in the issuer's JWK Set"
            )

        return cached.keys[kid]

    async def _refresh(
        self, url: str, cached: _CachedKeys | None
    ) -> _CachedKeys:
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            current = self._cache.get(url)
            if current is not None and current is not cached:
                # Another request refreshed it while this one waited.
                return current
            try:
                async with asyncio.timeout(self.timeout):
                    document = await self._fetch(url)
                keys = _parse_jwks(document)
            except (TimeoutError, httpx.HTTPError, ValueError) as error:
                log.warning(
                    "auth.jwks_fetch_failed",
                    jwks_host=urllib.parse.urlsplit(url).hostname,
                    error=type(error).__name__,
                    reason=str(error)[:200],
                )
                if cached is not None:
                    return cached
                raise JwksUnavailable(str(error)[:200]) from None
            fresh = _CachedKeys(keys, time.monotonic())
            self._cache[url] = fresh

            return fresh

    async def _fetch(self, url: str) -> object:
        """GET a JWK Set, following redirects only within its https host."""
        origin = urllib.parse.urlsplit(url)
        await _require_usable_host(origin.hostname or "")
        async with httpx.AsyncClient(
            verify=self.ssl_context,
            follow_redirects=False,
            trust_env=False,
            timeout=self.timeout,
        ) as client:
            for _ in range(JWKS_MAX_REDIRECTS + 1):
                async with client.stream(
                    "GET", url, headers={"accept": "application/json"}
                ) as response:
                    if response.is_redirect:
                        target = urllib.parse.urljoin(
                            url, response.headers.get("location", "")
                        )
                        parts = urllib.parse.urlsplit(target)
                        if (parts.scheme, parts.netloc) != (
                            "https",
                            origin.netloc,
                        ):
                            raise ValueError(
                                "the JWK Set URL redirects to another host"
                            )
                        url = target
                        continue
                    response.raise_for_status()
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_bytes:
                            raise ValueError(
                                f"the JWK Set is larger than "
                                f"{self.max_bytes} bytes"
                            )

                    return json.loads(body)
        raise ValueError("the JWK Set URL redirects too many times")


def _parse_jwks(document: object) -> dict[str, jwt.PyJWK]:
    if not isinstance(document, dict):
        raise ValueError("the JWK Set is not a JSON object")
    try:
        keys = jwt.PyJWKSet.from_dict(document).keys
    except jwt.PyJWKSetError as error:
        raise ValueError(f"the JWK Set has no usable key: {error}") from None

    return {key.key_id: key for key in keys if key.key_id}


def audiences(base_url: str, path: str) -> list[str]:
    """Return the `aud` values a token for a hooks REST path may carry.

    The endpoint's own URL; a feedback call also accepts the URL of the
    service it reports on.
    """
    endpoint = base_url.rstrip("/") + path.split("?", 1)[0]
    accepted = [endpoint]
    if endpoint.endswith("/feedback"):
        accepted.append(endpoint.removesuffix("/feedback"))

    return accepted


@dataclass
class EhrTokenVerifier:
    store: EhrStore
    jwks: JwksCache
    # The public https base URL of this deployment's edge, which `aud`
    # names, such as https://cds.example.org; None rejects every token.
    base_url: str | None
    clock: object = field(default=time.time)

    async def verify(self, token: str, path: str) -> TrustedIssuer:
        """Return the issuer that a valid token authenticates.

        Raises TokenRejected with the reason, or JwksUnavailable.
        """
        if self.base_url is None:
            raise TokenRejected(
                "CDS Hooks JWTs are not accepted by this deployment "
                "(ARXIO_CDS_HOOKS_BASE_URL is not set): use an API key"
            )
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRejected("the bearer token is not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise TokenRejected(
                f"JWT algorithm {str(algorithm)[:20]!r} is not accepted: "
                "sign with ES384 or RS384"
            )
        if str(header.get("typ", "JWT")).upper() != "JWT":
            raise TokenRejected("the JWT header's typ must be JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("the JWT header has no kid")
        issuer_name = unverified.get("iss")
        if not isinstance(issuer_name, str) or not issuer_name:
            raise TokenRejected("the JWT has no iss claim")
        issuer = await self.store.find_issuer(issuer_name)
        if issuer is None:
            raise TokenRejected(
                f"JWT issuer {issuer_name[:200]!r} is not registered: ask "
                "the operator to register the EHR's issuer and JWK Set URL"
            )
        jku = header.get("jku")
        if jku is not None and jku != issuer.jwks_url:
            raise TokenRejected(
                "the JWT's jku is not the issuer's registered JWK Set URL"
            )

        key = await self.jwks.key(issuer.jwks_url, kid)
        claims = self._decode(token, key, algorithm, issuer_name, path)
        if not await self.store.use_token_id(
            issuer_name,
            claims["jti"],
            datetime.datetime.fromtimestamp(claims["exp"], datetime.UTC),
        ):
            raise TokenRejected(
                "the JWT's jti was already used: send a new token with "
                "each call"
            )

        return issuer

    def _decode(
        self,
        token: str,
        key: jwt.PyJWK,
        algorithm: str,
        issuer_name: str,
        path: str,
    ) -> dict:
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[algorithm],
                audience=audiences(self.base_url, path),
                issuer=issuer_name,
                leeway=LEEWAY,
                options={"require": ["iss", "aud", "exp", "iat", "jti"]},
            )
        except jwt.InvalidAudienceError:
            raise TokenRejected(
                "the JWT's aud is not this endpoint's URL, "
                f"{audiences(self.base_url, path)[0]}"
            ) from None
        except jwt.ExpiredSignatureError:
            raise TokenRejected("the JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("the JWT's iat is in the future") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("the JWT's signature is invalid") from None
        except jwt.PyJWTError as error:
            raise TokenRejected(f"the JWT is invalid: {error}") from None
        except (TypeError, ValueError):
            # A key of one type named for an algorithm of another, such as
            # an EC key with RS384: the library raises outside its errors.
            raise TokenRejected(
                "the JWT's algorithm does not fit the key its kid names"
            ) from None
        if not isinstance(claims["iat"], int | float) or (
            claims["iat"] > self.clock() + LEEWAY
        ):
            raise TokenRejected("the JWT's iat is in the future")
        jti = claims["jti"]
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_TOKEN_ID_LENGTH:
            raise TokenRejected(
                f"the JWT's jti must be a string of 1 to "
                f"{MAX_TOKEN_ID_LENGTH} characters"
            )
        if claims["exp"] > self.clock() + MAX_TOKEN_LIFETIME + LEEWAY:
            raise TokenRejected(
                f"the JWT's exp is more than {MAX_TOKEN_LIFETIME} seconds "
                "away: issue short-lived tokens"
            )

        return claims
