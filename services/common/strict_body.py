"""Check a request body against its RPC's message type, strictly.

Envoy's JSON transcoder drops fields it does not know and still answers
200, so a misspelled `allergies` would give a review without the allergies.
The auth decision therefore receives the body and checks it here first:
every JSON field must exist, hold the right type and fit its range, and
every enum value must be known, as the transcoder's proto3 JSON parser
would read them. Native gRPC bodies are decompressed as their
`grpc-encoding` header says, parsed, and must carry no field the message
type lacks. In both, no string may contain the NUL character, which
PostgreSQL text cannot hold, no list may hold more than MAX_REPEATED_ITEMS
items, and no list of enum values may name one twice. Violations name the
field by its JSON path, and never quote a value, which may be patient data.
"""

import json
import math
import re
import zlib
from collections.abc import Callable

from google.protobuf import (
    descriptor,
    json_format,
    message_factory,
    unknown_fields,
)
from google.protobuf.message import DecodeError

from services.common.edge_replies import MAX_REQUEST_BYTES
from services.common.errors import FieldViolation

FieldDescriptor = descriptor.FieldDescriptor
# Well-known types whose JSON form is not an object of their fields.
_SPECIAL_JSON_TYPES = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
        "google.protobuf.Any",
        "google.protobuf.BoolValue",
        "google.protobuf.BytesValue",
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int32Value",
        "google.protobuf.Int64Value",
        "google.protobuf.StringValue",
        "google.protobuf.UInt32Value",
        "google.protobuf.UInt64Value",
    }
)
_INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOAT_MAX = 3.4028234663852886e38
_NAMED_FLOATS = frozenset({"NaN", "Infinity", "-Infinity"})
# A body bound to this type reaches the service byte for byte, unchecked.
_RAW_BODY_TYPE = "google.api.HttpBody"
# Keys longer than this are cut in messages.
_MAX_NAME_IN_MESSAGE = 64
# Bodies nested deeper than any message type are rejected as such.
_MAX_DEPTH = 32
# Largest request message, decompressed, that the edge lets through: its
# body limit, applied again after decompression.
MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES
# Maximum number of items of any list in a request. The longest lists the
# API documents (medications, conditions, allergies, IP allowlist ranges)
# allow 100, and the services check their own limits too.
MAX_REPEATED_ITEMS = 100
# zlib window bits of each gRPC message encoding: "deflate" is the zlib
# format (RFC 1950) and "gzip" the gzip format (RFC 1952), as the HTTP
# content codings of the same names are.
_ENCODING_WINDOW_BITS = {
    "gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}
# An integer in a JSON string, as proto3 JSON parsers read it: ASCII
# digits with an optional sign. Python's int() would also take " 10 ",
# "1_0" and other scripts' digits, which the transcoder rejects, quoting
# the value.
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
# UTF-16 surrogates: json.loads turns a lone "\ud800" escape into one,
# which is not a Unicode scalar value and which proto3 JSON rejects.
_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON string, or one bracket outside strings.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class MessageTooLarge(Exception):
    """A gRPC request message decompresses to more than MAX_MESSAGE_BYTES."""


class _InvalidCompression(ValueError):
    pass


class _DuplicateKey(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value

    return result


def _join(path: str, name: str) -> str:
    # A surrogate cannot be encoded in the UTF-8 of the error response.
    name = _SURROGATE.sub("?", name[:_MAX_NAME_IN_MESSAGE])

    return f"{path}.{name}" if path else name


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def nesting_depth_exceeds(text: str, max_depth: int) -> bool:
    """Tell whether JSON text nests arrays and objects deeper than
    `max_depth`, without parsing it.

    The check is linear in the text, so it can run before a recursive
    parser would exhaust Python's stack.
    """
    depth = 0
    for token in _JSON_TOKEN.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif bracket in "]}":
            depth -= 1

    return False


def _fields_by_json_name(
    message_type: descriptor.Descriptor,
) -> dict[str, FieldDescriptor]:
    fields = {}
    for field in message_type.fields:
        fields[field.json_name] = field
        fields[field.name] = field

    return fields


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return "an enum value"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return "an object"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true or false"
    if field.type == FieldDescriptor.TYPE_STRING:
        return "a string"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return "a base64 string"
    if field.type in _INTEGER_RANGES:
        return "a whole number"

    return "a number"


class _Checker:
    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field or "body", description))

    def message(
        self,
        value: object,
        message_type: descriptor.Descriptor,
        path: str,
        depth: int = 0,
    ) -> None:
        if depth > _MAX_DEPTH:
            self.add(path, "is nested too deeply")
            return
        if message_type.full_name in _SPECIAL_JSON_TYPES:
            self._well_known(value, message_type, path)
            return
        if not isinstance(value, dict):
            self.add(path, "must be a JSON object")
            return
        fields = _fields_by_json_name(message_type)
        oneofs: dict[str, str] = {}
        for key, item in value.items():
            field = fields.get(key)
            field_path = _join(path, key)
            if field is None:
                self.add(
                    field_path,
                    f"unknown field in {message_type.name}: check its "
                    "spelling against the API reference",
                )
                continue
            if item is None:
                continue
            oneof = field.containing_oneof
            if oneof is not None and not oneof.name.startswith("_"):
                if oneof.name in oneofs:
                    self.add(
                        field_path,
                        f"cannot be set together with {oneofs[oneof.name]}",
                    )
                oneofs[oneof.name] = key
            self.field(item, field, field_path, depth)

    def field(
        self, value: object, field: FieldDescriptor, path: str, depth: int
    ) -> None:
        if (
            field.message_type is not None
            and field.message_type.GetOptions().map_entry
        ):
            if not isinstance(value, dict):
                self.add(path, "must be a JSON object")
                return
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                self.single(item, value_field, _join(path, key), depth + 1)
            return
        if field.is_repeated:
            if not isinstance(value, list):
                self.add(path, "must be a JSON list")
                return
            if len(value) > MAX_REPEATED_ITEMS:
                self.add(path, f"must have at most {MAX_REPEATED_ITEMS} items")
                return
            for index, item in enumerate(value):
                self.single(item, field, f"{path}[{index}]", depth + 1)
            if field.type == FieldDescriptor.TYPE_ENUM:
                self._enum_repeats(value, field, path)
            return
        self.single(value, field, path, depth)

    def single(
        self, value: object, field: FieldDescriptor, path: str, depth: int
    ) -> None:
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            self.message(value, field.message_type, path, depth + 1)
        elif kind == FieldDescriptor.TYPE_ENUM:
            self._enum(value, field, path)
        elif kind == FieldDescriptor.TYPE_BOOL:
            if not isinstance(value, bool):
                self.add(path, "must be true or false")
        elif kind == FieldDescriptor.TYPE_STRING:
            if not isinstance(value, str):
                self.add(path, "must be a string")
            elif "\x00" in value:
                # PostgreSQL text cannot hold it, and no field needs it.
                self.add(path, "must not contain the NUL character")
            elif _has_surrogate(value):
                self.add(
                    path,
                    "must be valid Unicode: a \\ud800 to \\udfff escape "
                    "must be half of a surrogate pair",
                )
        elif kind == FieldDescriptor.TYPE_BYTES:
            if not isinstance(value, str):
                self.add(path, "must be a base64 string")
        elif kind in _INTEGER_RANGES:
            self._integer(value, kind, path)
        else:
            self._float(value, kind, path)

    def _enum(self, value: object, field: FieldDescriptor, path: str) -> None:
        enum = field.enum_type
        names = [item.name for item in enum.values]
        if isinstance(value, str):
            # The edge parses enum names without regard to ASCII case. Only
            # ASCII: str.upper() maps "ſ" to "S", which the edge does not.
            if value.isascii() and value.upper() in names:
                return
        elif isinstance(value, int) and not isinstance(value, bool):
            if value in enum.values_by_number:
                return
        allowed = ", ".join(
            name for name in names if not name.endswith("_UNSPECIFIED")
        )
        self.add(path, f"unknown value: use one of {allowed}")

    def _enum_repeats(
        self, values: list, field: FieldDescriptor, path: str
    ) -> None:
        """Reject a list of enum values that names one value twice."""
        seen = set()
        for index, value in enumerate(values):
            if isinstance(value, str) and value.isascii():
                value = value.upper()
            elif isinstance(value, int) and value in (
                field.enum_type.values_by_number
            ):
                value = field.enum_type.values_by_number[value].name
            if value in seen:
                self.add(
                    f"{path}[{index}]",
                    "repeats an earlier item: list each value once",
                )
                return
            seen.add(value)

    def _integer(self, value: object, kind: int, path: str) -> None:
        number = value
        if isinstance(value, str):
            unsigned = _INTEGER_RANGES[kind][0] == 0
            if not _INTEGER_TEXT.fullmatch(value) or (
                unsigned and value.startswith("-")
            ):
                self.add(path, "must be a whole number")
                return
            number = int(value)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            self.add(path, "must be a whole number")
            return
        if isinstance(number, float):
            if not number.is_integer():
                self.add(path, "must be a whole number")
                return
            number = int(number)
        low, high = _INTEGER_RANGES[kind]
        if not low <= number <= high:
            self.add(path, f"must be {low} to {high}")

    def _float(self, value: object, kind: int, path: str) -> None:
        if isinstance(value, str) and value in _NAMED_FLOATS:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(path, "must be a number")
            return
        if kind == FieldDescriptor.TYPE_FLOAT and abs(value) > _FLOAT_MAX:
            self.add(path, "is out of range for a float")
        elif not math.isfinite(float(value)):
            self.add(path, "must be a finite number")

    def _well_known(
        self, value: object, message_type: descriptor.Descriptor, path: str
    ) -> None:
        message = message_factory.GetMessageClass(message_type)()
        try:
            json_format.ParseDict(value, message)
        except (json_format.ParseError, ValueError, TypeError):
            self.add(path, f"must be a valid {message_type.name}")


def check_json_body(
    body: bytes, message_type: descriptor.Descriptor, body_field: str
) -> list[FieldViolation]:
    """Check a REST body bound to `body_field` ("*" for the whole message)."""
    bound = message_type
    if body_field != "*":
        bound = message_type.fields_by_name[body_field].message_type
    if not body.strip() or (bound and bound.full_name == _RAW_BODY_TYPE):
        return []
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return [
            FieldViolation("body", f"is not valid UTF-8 (byte {error.start})")
        ]
    # Each message level is one object and each list one more level.
    if nesting_depth_exceeds(text, 2 * _MAX_DEPTH):
        return [
            FieldViolation(
                "body", f"is nested more than {2 * _MAX_DEPTH} levels deep"
            )
        ]
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as error:
        return [
            FieldViolation(_join("", str(error)), "appears twice in an object")
        ]
    except RecursionError:
        return [FieldViolation("body", "is nested too deeply")]
    except json.JSONDecodeError as error:
        return [
            FieldViolation(
                "body",
                f"is not valid JSON: {error.msg} at line {error.lineno}, "
                f"column {error.colno}",
            )
        ]
    checker = _Checker()
    if body_field == "*":
        checker.message(value, message_type, "")
    else:
        field = message_type.fields_by_name[body_field]
        checker.field(value, field, field.json_name, 0)

    return checker.violations


def check_grpc_body(
    body: bytes, message_type: descriptor.Descriptor, encoding: str = ""
) -> list[FieldViolation]:
    """Check a native gRPC body: each framed message must parse and carry
    no unknown field.

    `encoding` is the request's `grpc-encoding` header, which names the
    compression of the frames whose compressed flag is set. Raises
    MessageTooLarge when the messages decompress to more than
    MAX_MESSAGE_BYTES together; decompression stops one byte past it.
    """
    message_class: Callable = message_factory.GetMessageClass(message_type)
    violations = []
    offset = 0
    decompressed = 0
    while offset < len(body):
        if len(body) - offset < 5:
            return [FieldViolation("body", "is not a complete gRPC frame")]
        compressed = body[offset]
        length = int.from_bytes(body[offset + 1 : offset + 5], "big")
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(payload) != length or compressed > 1:
            return [FieldViolation("body", "is not a complete gRPC frame")]
        if compressed:
            try:
                payload = _decompress(
                    payload, encoding, MAX_MESSAGE_BYTES - decompressed
                )
            except _InvalidCompression as error:
                return [FieldViolation("body", str(error))]
        decompressed += len(payload)
        message = message_class()
        try:
            message.ParseFromString(payload)
        except DecodeError:
            return [
                FieldViolation(
                    "body", f"is not a valid {message_type.name} message"
                )
            ]
        violations += _unknown_fields(message, "")
        violations += _message_violations(message, "")

    return violations


def _decompress(payload: bytes, encoding: str, limit: int) -> bytes:
    """Decompress one gRPC message, reading at most `limit` + 1 bytes out.

    Raises MessageTooLarge past `limit`, and _InvalidCompression with a
    message for the client when the encoding is missing or unsupported, or
    the data is not valid for it.
    """
    # gRPC servers match encoding names exactly: "GZIP" is unknown to them.
    name = encoding
    if name in ("", "identity"):
        raise _InvalidCompression(
            "is a compressed message, but the grpc-encoding header names no "
            "compression: send grpc-encoding: gzip or deflate with it"
        )
    window_bits = _ENCODING_WINDOW_BITS.get(name)
    if window_bits is None:
        raise _InvalidCompression(
            "is compressed with an unsupported grpc-encoding: use gzip, "
            "deflate or identity, in lower case"
        )
    decompressor = zlib.decompressobj(window_bits)
    try:
        message = decompressor.decompress(payload, max(limit, 0) + 1)
    except zlib.error:
        raise _InvalidCompression(f"is not valid {name} data") from None
    if len(message) > limit:
        raise MessageTooLarge(
            "request message too large: it decompresses to more than "
            f"{MAX_MESSAGE_BYTES // 1024} KiB, the limit of a gRPC request"
        )
    if not decompressor.eof or decompressor.unused_data:
        raise _InvalidCompression(f"is not valid {name} data")

    return message


def _unknown_fields(message, path: str) -> list[FieldViolation]:
    violations = []
    for unknown in unknown_fields.UnknownFieldSet(message):
        violations.append(
            FieldViolation(
                _join(path, f"#{unknown.field_number}"),
                f"field number {unknown.field_number} is unknown to "
                f"{message.DESCRIPTOR.name}: update the client's API "
                "definitions",
            )
        )
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for index, item in enumerate(value):
                violations += _unknown_fields(
                    item, f"{_join(path, field.json_name)}[{index}]"
                )
        else:
            violations += _unknown_fields(value, _join(path, field.json_name))

    return violations


def _message_violations(message, path: str) -> list[FieldViolation]:
    """Name the fields of a parsed message that break the JSON body rules.

    Strings must not contain NUL, lists must hold at most
    MAX_REPEATED_ITEMS items, and lists of enum values must not repeat
    one. JSON bodies get the same checks in _Checker.
    """
    violations = []
    for field, value in message.ListFields():
        field_path = _join(path, field.json_name)
        if field.is_repeated and len(value) > MAX_REPEATED_ITEMS:
            violations.append(
                FieldViolation(
                    field_path, f"must have at most {MAX_REPEATED_ITEMS} items"
                )
            )
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if field.is_repeated else [value]
            if any("\x00" in item for item in values):
                violations.append(
                    FieldViolation(
                        field_path, "must not contain the NUL character"
                    )
                )
        elif field.type == FieldDescriptor.TYPE_ENUM:
            if field.is_repeated and len(set(value)) != len(value):
                violations.append(
                    FieldViolation(
                        field_path,
                        "repeats an item: list each value once",
                    )
                )
        elif field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        elif field.message_type.GetOptions().map_entry:
            continue
        elif field.is_repeated:
            for index, item in enumerate(value):
                violations += _message_violations(
                    item, f"{field_path}[{index}]"
                )
        else:
            violations += _message_violations(value, field_path)

    return violations
