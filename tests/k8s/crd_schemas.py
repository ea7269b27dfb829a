"""Validate custom resources against the schemas in tests/k8s/schemas."""

import functools
from pathlib import Path

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parent / "schemas"
# API groups whose kinds have a schema file here.
CUSTOM_GROUPS = ("cert-manager.io", "postgresql.cnpg.io")


def is_custom(item: dict) -> bool:
    return item["apiVersion"].split("/")[0] in CUSTOM_GROUPS


def _strict(node: object) -> object:
    """Return a copy that rejects properties the schema does not list."""
    if isinstance(node, list):
        return [_strict(entry) for entry in node]
    if not isinstance(node, dict):
        return node
    copy = {key: _strict(value) for key, value in node.items()}
    if "properties" in copy and "additionalProperties" not in copy:
        copy["additionalProperties"] = False

    return copy


@functools.cache
def validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    group, version = api_version.split("/")
    path = SCHEMAS / f"{group}_{version}_{kind}.yaml"
    if not path.exists():
        raise FileNotFoundError(
            f"no schema for {api_version} {kind}: add {path.name} from the "
            "project's published CRD"
        )
    schema = _strict(yaml.safe_load(path.read_text()))

    return jsonschema.Draft202012Validator(schema)


def errors(item: dict) -> list[str]:
    """Return one message per schema error of a custom resource."""
    found = validator(item["apiVersion"], item["kind"]).iter_errors(item)

    return [
        f"{item['kind']}/{item['metadata']['name']} at "
        f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: "
        f"{error.message}"
        for error in found
    ]
