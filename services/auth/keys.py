"""API key format: `arx_`, 32 random base62 characters and a checksum.

The 32 characters carry about 190 bits of randomness. The last 6 characters
are a base62 CRC-32 of the rest, so secret scanners can recognize a leaked
key and a mistyped key is rejected without a database query. Only the key's
SHA-256 hash is stored.
"""

import hashlib
import re
import secrets
import string
import zlib

PREFIX = "arx_"
# The operator credential's prefix, so a scanner and the auth decision can
# recognize one that leaked into a URL.
OPERATOR_TOKEN_PREFIX = "arxop_"
_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
_RANDOM_LENGTH = 32
_CHECKSUM_LENGTH = 6
KEY_LENGTH = len(PREFIX) + _RANDOM_LENGTH + _CHECKSUM_LENGTH
_KEY_PATTERN = re.compile(
    re.escape(PREFIX) + f"[0-9A-Za-z]{{{_RANDOM_LENGTH + _CHECKSUM_LENGTH}}}",
    re.ASCII,
)


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(_ALPHABET[remainder])

    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECKSUM_LENGTH)


def generate_key() -> str:
    body = PREFIX + "".join(
        secrets.choice(_ALPHABET) for _ in range(_RANDOM_LENGTH)
    )

    return body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """Check prefix, length, alphabet and checksum, without a lookup."""
    if _KEY_PATTERN.fullmatch(key) is None:
        return False
    body, checksum = key[:-_CHECKSUM_LENGTH], key[-_CHECKSUM_LENGTH:]

    return secrets.compare_digest(checksum, _checksum(body))


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


KEY_ID_PREFIX = "key_"
_KEY_ID_HEX_DIGITS = 16
_KEY_ID_PATTERN = re.compile(
    re.escape(KEY_ID_PREFIX) + f"[0-9a-f]{{{_KEY_ID_HEX_DIGITS}}}", re.ASCII
)
# The form of a key id, as error messages describe it.
KEY_ID_FORMAT = (
    f"{KEY_ID_PREFIX} and {_KEY_ID_HEX_DIGITS} lowercase hex digits"
)


def new_key_id() -> str:
    """Return a short public id for a key, safe to log and to audit."""
    return KEY_ID_PREFIX + secrets.token_hex(_KEY_ID_HEX_DIGITS // 2)


def is_key_id(value: str) -> bool:
    """Check that `value` has the form of the ids `new_key_id` returns."""
    return _KEY_ID_PATTERN.fullmatch(value) is not None
