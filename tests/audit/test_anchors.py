"""The anchor file: appended checkpoints read back as each chain's newest,
and a file that is not a trusted record rejected at start."""

import datetime
import json
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from services.audit import anchors as anchors_module
from services.audit import chain
from services.audit.anchors import Anchor, AnchorFile
from services.common.config import ConfigError

KEY = Ed25519PrivateKey.generate()
TRUSTED = {chain.public_key_id(KEY.public_key()): KEY.public_key()}
CHAIN = uuid.uuid4()
NOW = datetime.datetime(2027, 1, 1, 8, 0, tzinfo=datetime.UTC)


def signed(seq: int, chain_id: uuid.UUID = CHAIN, key=KEY) -> chain.Checkpoint:
    return chain.sign_checkpoint(key, chain_id, seq, bytes([seq]) * 32, NOW)


def test_missing_file_created_empty(tmp_path):
    path = tmp_path / "anchors.ndjson"

    assert {} == AnchorFile(path).read(TRUSTED)
    assert path.exists()


def test_newest_checkpoint_per_chain(tmp_path):
    anchors = AnchorFile(tmp_path / "anchors.ndjson")
    other = uuid.uuid4()
    for point in (signed(3), signed(7), signed(2, other), signed(5)):
        anchors.append(point)

    read = anchors.read(TRUSTED)

    assert Anchor(7, bytes([7]) * 32) == read[CHAIN]
    assert Anchor(2, bytes([2]) * 32) == read[other]


def test_line_matches_export_checkpoint(tmp_path):
    path = tmp_path / "anchors.ndjson"
    point = signed(4)

    AnchorFile(path).append(point)

    assert point.to_json() == json.loads(path.read_text())


def test_incomplete_last_line_skipped(tmp_path):
    path = tmp_path / "anchors.ndjson"
    AnchorFile(path).append(signed(4))
    with path.open("a") as handle:
        handle.write('{"chain_id": "')

    assert {CHAIN: Anchor(4, bytes([4]) * 32)} == AnchorFile(path).read(
        TRUSTED
    )


def test_incomplete_last_line_cut_off(tmp_path):
    """A torn line is cut off, so the next start reads the next append."""
    path = tmp_path / "anchors.ndjson"
    anchors = AnchorFile(path)
    anchors.append(signed(4))
    with path.open("a") as handle:
        handle.write('{"chain_id": "')

    anchors.read(TRUSTED)
    anchors.append(signed(5))
    read = AnchorFile(path).read(TRUSTED)

    assert Anchor(5, bytes([5]) * 32) == read[CHAIN]
    assert 2 == len(path.read_text().splitlines())


def test_untrusted_signature_rejected(tmp_path):
    anchors = AnchorFile(tmp_path / "anchors.ndjson")
    anchors.append(signed(4, key=Ed25519PrivateKey.generate()))

    with pytest.raises(ConfigError, match="ARXIO_AUDIT_TRUSTED_KEYS"):
        anchors.read(TRUSTED)


def test_invalid_line_rejected(tmp_path):
    path = tmp_path / "anchors.ndjson"
    path.write_text("not json\n")

    with pytest.raises(ConfigError, match="line 1 .* is not a checkpoint"):
        AnchorFile(path).read(TRUSTED)


def test_unwritable_folder_rejected(tmp_path):
    path = tmp_path / "missing" / "anchors.ndjson"

    with pytest.raises(ConfigError, match="cannot be opened for appending"):
        AnchorFile(path).read(TRUSTED)


def test_compacted_to_newest_lines(tmp_path, monkeypatch):
    """Past its size limit the file keeps each chain's newest line only,
    and reads back the same anchors."""
    monkeypatch.setattr(anchors_module, "COMPACT_MIN_BYTES", 0)
    path = tmp_path / "anchors.ndjson"
    anchors = AnchorFile(path)
    anchors.read(TRUSTED)
    other = uuid.uuid4()
    anchors.append(signed(1, other))
    for seq in range(1, 20):
        anchors.append(signed(seq))

    lines = path.read_text().splitlines()
    read = AnchorFile(path).read(TRUSTED)

    assert len(lines) <= 2 * anchors_module.COMPACT_FACTOR
    assert {(str(CHAIN), 19), (str(other), 1)} <= {
        (line["chain_id"], line["seq"]) for line in map(json.loads, lines)
    }
    assert Anchor(19, bytes([19]) * 32) == read[CHAIN]
    assert Anchor(1, bytes([1]) * 32) == read[other]
    assert not (tmp_path / "anchors.ndjson.compacting").exists()


def test_not_compacted_below_limit(tmp_path):
    path = tmp_path / "anchors.ndjson"
    anchors = AnchorFile(path)
    anchors.read(TRUSTED)
    for seq in range(1, 20):
        anchors.append(signed(seq))

    assert 19 == len(path.read_text().splitlines())
