"""Read the knowledge base's JSON files with errors that name the entry.

Every entry of every module is a JSON object with an `id` and a `source`.
`Entry` reads its fields with type checks, so a malformed file fails at
load with its file name, the entry's id and the field.
"""

import json
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from arxio.cds.v1 import cds_pb2

Severity = cds_pb2.Finding.Severity
SEVERITIES = {
    name: Severity.Value(name)
    for name in ("INFO", "MINOR", "MODERATE", "MAJOR", "CONTRAINDICATED")
}


class Source(NamedTuple):
    """Citation of an entry: a short label, the reference and a link.

    A named tuple rather than a dataclass, because screening hashes the
    source of every finding, and a tuple hashes without a Python call.
    """

    label: str
    citation: str
    url: str = ""

    def to_proto(self) -> cds_pb2.Source:
        return cds_pb2.Source(
            label=self.label, citation=self.citation, url=self.url
        )


def read_module(directory: Path, module: str) -> dict[str, Any]:
    path = directory / f"{module}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path.name}: file not found in {directory}"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path.name}: invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object at top level")

    return data


def entry_list(data: dict[str, Any], file: str, key: str) -> list[Any]:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise ValueError(f"{file}: expected a list under {key!r}")

    return entries


class Entry:
    """One JSON entry, with errors that name its file and id."""

    def __init__(self, file: str, entry_id: str, data: Any) -> None:
        self.file = file
        self.id = entry_id
        if not isinstance(data, dict):
            self.fail("expected a JSON object")
        self.data: dict[str, Any] = data

    @classmethod
    def with_id(cls, file: str, data: Any, position: int) -> "Entry":
        entry = cls(file, f"entry #{position}", data)
        entry.id = entry.text("id")

        return entry

    def child(self, key: str) -> "Entry":
        """Return the object under `key`, failing if it is not an object."""
        value = self.data.get(key)
        if not isinstance(value, dict):
            self.fail(f"{key!r} is missing or not a JSON object")

        return Entry(self.file, self.id, value)

    def fail(self, problem: str) -> NoReturn:
        raise ValueError(f"{self.file}: {self.id}: {problem}")

    def allow(self, *keys: str) -> None:
        unknown = sorted(set(self.data) - set(keys))
        if unknown:
            self.fail(f"unknown field(s) {', '.join(unknown)}")

    def text(self, key: str, required: bool = True) -> str:
        value = self.data.get(key, "")
        if not isinstance(value, str) or (required and not value.strip()):
            self.fail(f"{key!r} must be a non-empty string")

        return value

    def texts(self, key: str) -> tuple[str, ...]:
        values = self.data.get(key, [])
        if not isinstance(values, list) or not all(
            isinstance(value, str) and value.strip() for value in values
        ):
            self.fail(f"{key!r} must be a list of non-empty strings")

        return tuple(values)

    def number(self, key: str, default: float | None = None) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"{key!r} must be a number")

        return float(value)

    def severity(self, key: str) -> int:
        name = self.text(key)
        if name not in SEVERITIES:
            self.fail(f"{key!r} must be one of {', '.join(SEVERITIES)}")

        return SEVERITIES[name]

    def source(self) -> Source:
        source = self.child("source")
        source.allow("label", "citation", "url")
        url = source.text("url", required=False)
        if url and not url.startswith("https://"):
            self.fail("source 'url' must start with https://")

        return Source(source.text("label"), source.text("citation"), url)

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{key!r} must be a whole number")

        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{key!r} must be true or false")

        return value

    def children(self, key: str) -> list["Entry"]:
        """Return the objects of the list under `key`, each as an Entry."""
        values = self.data.get(key, [])
        if not isinstance(values, list):
            self.fail(f"{key!r} must be a list of JSON objects")

        return [Entry(self.file, self.id, value) for value in values]

    def optional_child(self, key: str) -> "Entry | None":
        if key not in self.data:
            return None

        return self.child(key)
