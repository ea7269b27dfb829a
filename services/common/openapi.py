"""Generate the OpenAPI 3 document of the REST API from the descriptor set.

Usage: python -m services.common.openapi DESCRIPTOR_SET OUTPUT_FILE

Every RPC with a `google.api.http` annotation becomes an operation. Path
variables become path parameters, and the other fields of a body-less
request become query parameters. A `body: "*"` request takes the message,
less its path fields, as a JSON body that rejects unknown properties, as
the edge does. The `(arxio.common.v1.policy)` option sets each operation's
security scheme. Descriptions are the protos' leading comments.
"""

import json
import re
import sys
from pathlib import Path

# Imported for its extension of MethodOptions, which parsing then keeps.
from arxio.common.v1 import policy_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

OPENAPI_VERSION = "3.0.3"
API_DESCRIPTION_PATH = "/v1/openapi.json"
STATUS_SCHEMA = "google.rpc.Status"
# Packages whose HTTP-annotated services make up the public API.
API_PACKAGE_PREFIX = "arxio."

FieldProto = descriptor_pb2.FieldDescriptorProto
Authentication = policy_pb2.MethodPolicy.Authentication

# Field numbers in descriptor.proto, for source_code_info paths.
_MESSAGE_TYPE, _ENUM_TYPE, _SERVICE = 4, 5, 6
_FIELD, _NESTED_TYPE, _NESTED_ENUM, _METHOD = 2, 3, 4, 2

_SCALARS = {
    FieldProto.TYPE_STRING: {"type": "string"},
    FieldProto.TYPE_BOOL: {"type": "boolean"},
    FieldProto.TYPE_BYTES: {"type": "string", "format": "byte"},
    FieldProto.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldProto.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldProto.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_UINT32: {
        "type": "integer",
        "format": "int64",
        "minimum": 0,
        "maximum": 2**32 - 1,
    },
    FieldProto.TYPE_FIXED32: {
        "type": "integer",
        "format": "int64",
        "minimum": 0,
        "maximum": 2**32 - 1,
    },
    # The proto3 JSON mapping writes 64-bit integers as strings.
    FieldProto.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldProto.TYPE_FIXED64: {"type": "string", "format": "uint64"},
}
# Well-known types with a JSON form of their own.
_WELL_KNOWN = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {
        "type": "string",
        "description": "Seconds with an `s` suffix, for example `1.5s`.",
    },
    ".google.protobuf.FieldMask": {"type": "string"},
    ".google.protobuf.Struct": {"type": "object"},
    ".google.protobuf.Value": {},
    ".google.protobuf.ListValue": {"type": "array", "items": {}},
    ".google.protobuf.Empty": {"type": "object"},
    ".google.protobuf.Any": {"type": "object"},
    ".google.protobuf.BoolValue": {"type": "boolean"},
    ".google.protobuf.StringValue": {"type": "string"},
    ".google.protobuf.BytesValue": {"type": "string", "format": "byte"},
    ".google.protobuf.DoubleValue": {"type": "number"},
    ".google.protobuf.FloatValue": {"type": "number"},
    ".google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    ".google.protobuf.UInt32Value": {"type": "integer", "minimum": 0},
    ".google.protobuf.Int64Value": {"type": "string", "format": "int64"},
    ".google.protobuf.UInt64Value": {"type": "string", "format": "uint64"},
}
# A body of this type reaches the service unparsed: any JSON document.
_RAW_BODY = ".google.api.HttpBody"

_SECURITY_SCHEMES = {
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An organization's API key. Never put it in a URL.",
    },
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The deployment's operator credential.",
    },
    "ehrJwt": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A CDS Hooks JWT from an EHR issuer registered to "
        "the organization.",
    },
}
_SECURITY = {
    Authentication.API_KEY: [{"apiKey": []}],
    Authentication.OPERATOR: [{"operatorToken": []}],
    # Stripe's signature header, which the service verifies.
    Authentication.WEBHOOK_SIGNATURE: [],
    Authentication.CDS_HOOKS: [{"apiKey": []}, {"ehrJwt": []}],
}
# Error statuses every operation can return, with what causes them.
_ERRORS = {
    "400": "Invalid request: the details name each invalid field.",
    "401": "Missing or invalid credential.",
    "403": "The credential may not make this call.",
    "404": "No such method or resource.",
    "413": "The body exceeds the route's limit (64 KiB for most routes).",
    "415": "The body is not application/json.",
    "429": "The organization's daily request limit is reached.",
    "503": "A service is unavailable: retry shortly.",
}
_VARIABLE = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_.]*)(?:=[^}]*)?\}")


class _Descriptors:
    """Index of the messages, enums and comments in a descriptor set."""

    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto]):
        self.files = files
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[str, str] = {}
        for file in files:
            comments = {
                tuple(location.path): location.leading_comments.strip()
                for location in file.source_code_info.location
                if location.leading_comments.strip()
            }
            prefix = f".{file.package}" if file.package else ""
            for index, message in enumerate(file.message_type):
                self._add_message(
                    message, prefix, (_MESSAGE_TYPE, index), comments
                )
            for index, enum in enumerate(file.enum_type):
                self._add_enum(enum, prefix, (_ENUM_TYPE, index), comments)
            for index, service in enumerate(file.service):
                name = f"{prefix}.{service.name}"
                self._comment(name, comments, (_SERVICE, index))
                for number, method in enumerate(service.method):
                    self._comment(
                        f"{name}.{method.name}",
                        comments,
                        (_SERVICE, index, _METHOD, number),
                    )

    def _comment(self, name: str, comments: dict, path: tuple) -> None:
        if path in comments:
            self.comments[name] = comments[path]

    def _add_message(self, message, prefix, path, comments) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = message
        self._comment(name, comments, path)
        for index, field in enumerate(message.field):
            self._comment(
                f"{name}.{field.name}", comments, (*path, _FIELD, index)
            )
        for index, nested in enumerate(message.nested_type):
            self._add_message(
                nested, name, (*path, _NESTED_TYPE, index), comments
            )
        for index, enum in enumerate(message.enum_type):
            self._add_enum(enum, name, (*path, _NESTED_ENUM, index), comments)

    def _add_enum(self, enum, prefix, path, comments) -> None:
        name = f"{prefix}.{enum.name}"
        self.enums[name] = enum
        self._comment(name, comments, path)


class _Generator:
    def __init__(self, descriptors: _Descriptors) -> None:
        self.descriptors = descriptors
        self.schemas: dict[str, dict] = {}

    def _reference(self, type_name: str) -> dict:
        """Return a $ref to a message or enum schema, adding it if new."""
        name = type_name.lstrip(".")
        if name not in self.schemas:
            # Reserve the name first: messages may refer to themselves.
            self.schemas[name] = {}
            if type_name in self.descriptors.enums:
                self.schemas[name] = self._enum_schema(type_name)
            else:
                self.schemas[name] = self.message_schema(type_name)

        return {"$ref": f"#/components/schemas/{name}"}

    def _enum_schema(self, type_name: str) -> dict:
        enum = self.descriptors.enums[type_name]
        schema = {
            "type": "string",
            "enum": [value.name for value in enum.value],
        }
        if type_name in self.descriptors.comments:
            schema["description"] = self.descriptors.comments[type_name]

        return schema

    def field_schema(self, field: FieldProto) -> dict:
        """Return the JSON schema of one field's value."""
        if field.type in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_ENUM):
            message = self.descriptors.messages.get(field.type_name)
            if message is not None and message.options.map_entry:
                value = self._single_schema(message.field[1])
                schema = {"type": "object", "additionalProperties": value}
                return schema
        single = self._single_schema(field)
        if field.label == FieldProto.LABEL_REPEATED:
            return {"type": "array", "items": single}

        return single

    def _single_schema(self, field: FieldProto) -> dict:
        if field.type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[field.type_name])
        if field.type_name == _RAW_BODY:
            return {}
        if field.type in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_ENUM):
            return self._reference(field.type_name)

        return dict(_SCALARS[field.type])

    def message_schema(
        self, type_name: str, exclude: frozenset[str] = frozenset()
    ) -> dict:
        """Return a message's object schema, without the `exclude` fields."""
        message = self.descriptors.messages[type_name]
        properties = {}
        for field in message.field:
            if field.name in exclude:
                continue
            schema = self.field_schema(field)
            comment = self.descriptors.comments.get(
                f"{type_name}.{field.name}"
            )
            if comment:
                if "$ref" in schema:
                    # OpenAPI 3.0 ignores siblings of $ref.
                    schema = {"allOf": [schema]}
                schema["description"] = comment
            properties[field.json_name] = schema
        schema = {
            "type": "object",
            "properties": properties,
            # The edge rejects unknown fields with 400.
            "additionalProperties": False,
        }
        if type_name in self.descriptors.comments:
            schema["description"] = self.descriptors.comments[type_name]

        return schema

    def _query_parameters(
        self, type_name: str, path_fields: set[str]
    ) -> list[dict]:
        parameters = []
        for field in self.descriptors.messages[type_name].field:
            if field.name in path_fields:
                continue
            schema = self.field_schema(field)
            is_message = (
                field.type == FieldProto.TYPE_MESSAGE
                and field.type_name not in _WELL_KNOWN
            )
            if is_message:
                # NOTE: nested messages in query strings are not described.
                continue
            parameter = {
                "name": field.json_name,
                "in": "query",
                "required": False,
                "schema": schema,
            }
            comment = self.descriptors.comments.get(
                f"{type_name}.{field.name}"
            )
            if comment:
                parameter["description"] = comment
            parameters.append(parameter)

        return parameters

    def operation(
        self,
        service_name: str,
        method: descriptor_pb2.MethodDescriptorProto,
        rule: http_pb2.HttpRule,
    ) -> tuple[str, str, dict]:
        """Return the path, the HTTP method and the OpenAPI operation."""
        verb = rule.WhichOneof("pattern")
        template = getattr(rule, verb)
        path_fields = [name for name in _VARIABLE.findall(template)]
        path = _VARIABLE.sub(lambda match: "{" + match[1] + "}", template)
        full_name = f"{service_name}.{method.name}"
        package = service_name.lstrip(".").split(".")
        operation: dict = {
            "operationId": f"{package[1]}.{_snake_case(method.name)}",
            "tags": [package[1]],
        }
        if full_name in self.descriptors.comments:
            operation["description"] = self.descriptors.comments[full_name]
        parameters = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
            }
            for name in path_fields
        ]
        if not rule.body:
            parameters += self._query_parameters(
                method.input_type, set(path_fields)
            )
        if parameters:
            operation["parameters"] = parameters
        if rule.body:
            operation["requestBody"] = self._request_body(
                method.input_type, rule.body, frozenset(path_fields)
            )
        operation["responses"] = self._responses(method.output_type)
        if method.options.HasExtension(policy_pb2.policy):
            policy = method.options.Extensions[policy_pb2.policy]
            operation["security"] = _SECURITY[policy.authentication]

        return path, verb, operation

    def _request_body(
        self, input_type: str, body: str, path_fields: frozenset[str]
    ) -> dict:
        if body == "*":
            schema = self.message_schema(input_type, exclude=path_fields)
        else:
            message = self.descriptors.messages[input_type]
            field = next(item for item in message.field if item.name == body)
            schema = self.field_schema(field)

        return {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }

    def _responses(self, output_type: str) -> dict:
        if output_type == _RAW_BODY:
            success = {}
        else:
            success = self._reference(output_type)
        error = {
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}
                }
            }
        }
        responses = {
            "200": {
                "description": "Success.",
                "content": {"application/json": {"schema": success}},
            }
        }
        for status, description in _ERRORS.items():
            responses[status] = {"description": description, **error}
        responses["default"] = {"description": "Another error.", **error}

        return responses


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _status_schema() -> dict:
    return {
        "type": "object",
        "description": "Every error: a `google.rpc.Status` in JSON. The "
        "details hold a `google.rpc.RequestInfo` with the request id, and "
        "for invalid input a `google.rpc.BadRequest` naming each field.",
        "required": ["code", "message", "details"],
        "properties": {
            "code": {
                "type": "integer",
                "description": "The gRPC status code.",
            },
            "message": {"type": "string"},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["@type"],
                    "properties": {"@type": {"type": "string"}},
                },
            },
        },
    }


def _api_description_operation() -> dict:
    return {
        "operationId": "edge.api_description",
        "tags": ["edge"],
        "description": "This document. Needs no credential.",
        "security": [],
        "responses": {
            "200": {
                "description": "The OpenAPI document.",
                "content": {"application/json": {"schema": {}}},
            }
        },
    }


def build_document(descriptor_set: bytes) -> dict:
    """Build the OpenAPI document from a serialized FileDescriptorSet."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file
    descriptors = _Descriptors(list(files))
    generator = _Generator(descriptors)
    paths: dict[str, dict] = {}
    for file in files:
        if not file.package.startswith(API_PACKAGE_PREFIX):
            continue
        for service in file.service:
            service_name = f".{file.package}.{service.name}"
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                path, verb, operation = generator.operation(
                    service_name, method, rule
                )
                paths.setdefault(path, {})[verb] = operation
    paths[API_DESCRIPTION_PATH] = {"get": _api_description_operation()}
    schemas = dict(sorted(generator.schemas.items()))
    schemas[STATUS_SCHEMA] = _status_schema()

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "arxio clinical decision support API",
            "version": "v1",
            "description": "Generated by `make openapi` from the protos' "
            "google.api.http annotations. Every error has the "
            "google.rpc.Status shape; every response carries an "
            "X-Request-ID.",
        },
        "servers": [{"url": "https://localhost:8443"}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }


def render(descriptor_set: bytes) -> str:
    """Return the document as the text `make openapi` writes."""
    return json.dumps(build_document(descriptor_set), indent=2) + "\n"


def main(arguments: list[str]) -> None:
    if len(arguments) != 2:
        raise SystemExit(__doc__)
    source, output = Path(arguments[0]), Path(arguments[1])
    if not source.is_file():
        raise SystemExit(f"{source} is missing: run `make protos` to build it")
    output.write_text(render(source.read_bytes()))
    print(f"wrote {output}")


if __name__ == "__main__":
    main(sys.argv[1:])
