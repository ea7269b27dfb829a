"""The anchor file: each chain's newest checkpoint, kept outside PostgreSQL.

The checkpointer appends one line to this file for every plain checkpoint
that it signs or first finds signed in the database. Each line is the
checkpoint as the export writes it (`chain_id`, `seq`, `hash`,
`month_end`, `issue_time`, `public_key_id`, `signature`), so an auditor
can compare it with an organization's export. Older lines of a chain are
dropped when the file is compacted. On start the audit service
reads the file back, and it does not sign a chain whose database no
longer contains the newest checkpoint recorded here. Without the file, a
database superuser could delete a chain's checkpoints, rewrite its
entries, and have the service sign the rewritten chain.
"""

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.audit import chain
from services.common.config import ConfigError

log = structlog.get_logger()

# The file is rewritten with each chain's newest line once it grows past
# this many times their size, and past COMPACT_MIN_BYTES.
COMPACT_FACTOR = 4
COMPACT_MIN_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Anchor:
    """The newest checkpoint of a chain that the service signed or saw."""

    seq: int
    hash: bytes


class AnchorFile:
    """A file of checkpoint lines, one JSON object per line.

    Lines are appended. Once `read` has run, the file is compacted when it
    outgrows its chains' newest lines (see COMPACT_FACTOR): they replace it
    in one rename, so a crash leaves either the old or the new file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # Each chain's highest seq and its line, once `read` has run.
        self._newest: dict[uuid.UUID, tuple[int, bytes]] | None = None
        self._size = 0

    def read(
        self, trusted_keys: Mapping[str, Ed25519PublicKey]
    ) -> dict[uuid.UUID, Anchor]:
        """Return each chain's highest recorded checkpoint.

        Creates an empty file when there is none. Raises ConfigError when
        the file cannot be opened for appending, or when a line is not a
        checkpoint that a trusted key signed. A last line without a line
        feed, left by a crash during a write, is cut off with a warning.
        """
        try:
            with self.path.open("ab"):
                pass
            content = self.path.read_bytes()
        except OSError as error:
            raise ConfigError(
                f"ARXIO_AUDIT_ANCHOR_FILE={str(self.path)!r} cannot be "
                f"opened for appending ({error.strerror}): point it at a "
                "writable file on persistent storage"
            ) from None
        lines = content.split(b"\n")
        if lines[-1]:
            # Cut the torn line off, or the next append would join it.
            content = content[: len(content) - len(lines[-1])]
            try:
                os.truncate(self.path, len(content))
            except OSError as error:
                raise ConfigError(
                    f"ARXIO_AUDIT_ANCHOR_FILE={str(self.path)!r} ends in an "
                    f"incomplete line that cannot be cut off "
                    f"({error.strerror}): make the file writable"
                ) from None
            log.warning(
                "audit.anchor_line_incomplete",
                path=str(self.path),
                line=len(lines),
                bytes_cut=len(lines[-1]),
            )
        anchors: dict[uuid.UUID, Anchor] = {}
        self._newest = {}
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            point = self._checkpoint(line, number, trusted_keys)
            known = anchors.get(point.chain_id)
            if known is None or point.seq >= known.seq:
                anchors[point.chain_id] = Anchor(point.seq, point.hash)
                self._newest[point.chain_id] = (point.seq, line + b"\n")
        self._size = len(content)
        log.info(
            "audit.anchors_read", path=str(self.path), chains=len(anchors)
        )

        return anchors

    def _checkpoint(
        self,
        line: bytes,
        number: int,
        trusted_keys: Mapping[str, Ed25519PublicKey],
    ) -> chain.Checkpoint:
        where = f"line {number} of {self.path}"
        try:
            point = chain.Checkpoint.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"{where} is not a checkpoint ({error}): restore the file "
                "from a backup, or move it aside after investigating"
            ) from None
        if not chain.signature_valid(point, trusted_keys):
            raise ConfigError(
                f"{where} has a checkpoint of chain {point.chain_id} that "
                f"no trusted key signed (public_key_id "
                f"{point.public_key_id!r}): add that key's public key to "
                "ARXIO_AUDIT_TRUSTED_KEYS"
            )

        return point

    def append(self, point: chain.Checkpoint) -> None:
        """Append one checkpoint line and flush it to disk."""
        line = (json.dumps(point.to_json(), sort_keys=True) + "\n").encode()
        with self.path.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if self._newest is None:
            return
        known = self._newest.get(point.chain_id)
        if known is None or point.seq >= known[0]:
            self._newest[point.chain_id] = (point.seq, line)
        self._size += len(line)
        newest_bytes = sum(len(line) for _, line in self._newest.values())
        if self._size > max(COMPACT_MIN_BYTES, COMPACT_FACTOR * newest_bytes):
            self._compact(newest_bytes)

    def _compact(self, newest_bytes: int) -> None:
        """Replace the file with each chain's newest line."""
        assert self._newest is not None
        temporary = self.path.with_name(self.path.name + ".compacting")
        with temporary.open("wb") as handle:
            for _, line in self._newest.values():
                handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        log.info(
            "audit.anchors_compacted",
            path=str(self.path),
            chains=len(self._newest),
            bytes_before=self._size,
            bytes_after=newest_bytes,
        )
        self._size = newest_bytes
