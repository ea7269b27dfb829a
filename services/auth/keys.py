"""API key format: `arx_`, 32 random base62 characters and a checksum.

The 32 characters carry about 190 bits of randomness. The last 6 characters
are a base62 CRC-32 of the rest, so secret scanners can recognize a leaked
key and a mistyped key is rejected without a database query. Only the key's
SHA-256 hash is stored.
"""

import hashlib
import secrets
import string
import zlib

PREFIX = "arx_"
_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
_RANDOM_LENGTH = 32
_CHECKSUM_LENGTH = 6
KEY_LENGTH = len(PREFIX) + _RANDOM_LENGTH + _CHECKSUM_LENGTH


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
    if len(key) != KEY_LENGTH or not key.startswith(PREFIX):
        return False
    if any(character not in _ALPHABET for character in key[len(PREFIX) :]):
        return False
    body, checksum = key[:-_CHECKSUM_LENGTH], key[-_CHECKSUM_LENGTH:]

    return secrets.compare_digest(checksum, _checksum(body))


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key_id() -> str:
    """Return a short public id for a key, safe to log and to audit."""
    return "key_" + secrets.token_hex(8)
