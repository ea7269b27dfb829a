"""Check a request body against its RPC's message type, strictly.

Envoy's JSON transcoder drops fields it does not know and still answers
200, so a misspelled `allergies` would give a review without the allergies.
The auth decision therefore receives the body and checks it here first:
every JSON field must exist, hold the right type and fit its range, and
every enum value must be known. Native gRPC bodies are parsed and must
carry no field the message type lacks. In both, no string may contain the
NUL character, which PostgreSQL text cannot hold. Violations name the
field by its JSON path, and never quote a value, which may be patient data.
"""

import json
import math
from collections.abc import Callable

from google.protobuf import (
    descriptor,
    json_format,
    message_factory,
    unknown_fields,
)
from google.protobuf.message import DecodeError

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
    name = name[:_MAX_NAME_IN_MESSAGE]

    return f"{path}.{name}" if path else name


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
            for index, item in enumerate(value):
                self.single(item, field, f"{path}[{index}]", depth + 1)
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
            # The edge parses enum names without regard to case.
            if value.upper() in names:
                return
        elif isinstance(value, int) and not isinstance(value, bool):
            if value in enum.values_by_number:
                return
        allowed = ", ".join(
            name for name in names if not name.endswith("_UNSPECIFIED")
        )
        self.add(path, f"unknown value: use one of {allowed}")

    def _integer(self, value: object, kind: int, path: str) -> None:
        number = value
        if isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                self.add(path, "must be a whole number")
                return
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
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as error:
        return [
            FieldViolation(
                str(error)[:_MAX_NAME_IN_MESSAGE], "appears twice in an object"
            )
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
    body: bytes, message_type: descriptor.Descriptor
) -> list[FieldViolation]:
    """Check a native gRPC body: each framed message must parse and carry
    no unknown field."""
    message_class: Callable = message_factory.GetMessageClass(message_type)
    violations = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < 5:
            return [FieldViolation("body", "is not a complete gRPC frame")]
        compressed = body[offset]
        length = int.from_bytes(body[offset + 1 : offset + 5], "big")
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(payload) != length:
            return [FieldViolation("body", "is not a complete gRPC frame")]
        if compressed:
            # NOTE: compressed messages are checked by the service only.
            continue
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
        violations += _nul_strings(message, "")

    return violations


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


def _nul_strings(message, path: str) -> list[FieldViolation]:
    """Name the string fields of a parsed message that contain NUL.

    JSON bodies get the same check in _Checker.single.
    """
    violations = []
    for field, value in message.ListFields():
        field_path = _join(path, field.json_name)
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if field.is_repeated else [value]
            if any("\x00" in item for item in values):
                violations.append(
                    FieldViolation(
                        field_path, "must not contain the NUL character"
                    )
                )
        elif field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        elif field.message_type.GetOptions().map_entry:
            continue
        elif field.is_repeated:
            for index, item in enumerate(value):
                violations += _nul_strings(item, f"{field_path}[{index}]")
        else:
            violations += _nul_strings(value, field_path)

    return violations
