"""Opaque page tokens for keyset pagination, as Google's API guide uses."""

import base64
import binascii
import datetime
import json
import uuid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Tokens from encode_token stay far below this.
MAX_TOKEN_LENGTH = 512


class InvalidPageToken(ValueError):
    pass


def page_size(requested: int) -> int:
    """Apply the default and the maximum to a request's `page_size`."""
    if not 0 <= requested <= MAX_PAGE_SIZE:
        raise ValueError(
            f"must be 0 to {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})"
        )
    if requested == 0:
        return DEFAULT_PAGE_SIZE

    return requested


def encode_token(time: datetime.datetime, identifier: str) -> str:
    raw = json.dumps([time.isoformat(), identifier]).encode()

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(
    token: str, identifier_is_uuid: bool = False
) -> tuple[datetime.datetime, str] | None:
    """Decode a token from `encode_token`; an empty token is the first page.

    Tokens are not secret: a client may craft one, so every part is
    checked before it reaches a query.
    """
    if not token:
        return None
    invalid = InvalidPageToken(
        "pageToken is invalid: pass the nextPageToken of the previous page "
        "unchanged"
    )
    if len(token) > MAX_TOKEN_LENGTH:
        raise invalid
    try:
        padded = token + "=" * (-len(token) % 4)
        time, identifier = json.loads(base64.urlsafe_b64decode(padded))
        parsed = datetime.datetime.fromisoformat(time)
        if identifier_is_uuid:
            # uuid.UUID also reads forms PostgreSQL does not, such as
            # "urn:uuid:..."; pass on the canonical text only.
            identifier = str(uuid.UUID(identifier))
    except (
        ValueError,
        TypeError,
        AttributeError,
        RecursionError,
        binascii.Error,
    ) as error:
        raise invalid from error
    if not isinstance(identifier, str) or parsed.tzinfo is None:
        raise invalid

    return parsed, identifier
