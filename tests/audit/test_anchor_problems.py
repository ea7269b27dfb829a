"""Verification compares a chain's stored checkpoints with its anchor, the
newest checkpoint that the audit service remembers outside the database."""

import datetime
import uuid

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from services.audit import chain
from services.audit.anchors import Anchor
from services.audit.checkpoints import anchor_problems

KEY = Ed25519PrivateKey.generate()
TRUSTED = {chain.public_key_id(KEY.public_key()): KEY.public_key()}
CHAIN = uuid.uuid4()
NOW = datetime.datetime(2027, 1, 1, 8, 0, tzinfo=datetime.UTC)


def signed(seq: int, fill: int | None = None, key=KEY) -> chain.Checkpoint:
    head_hash = bytes([seq if fill is None else fill]) * 32

    return chain.sign_checkpoint(key, CHAIN, seq, head_hash, NOW)


def anchor_of(point: chain.Checkpoint) -> Anchor:
    return Anchor(point.seq, point.hash)


def test_matching_checkpoint_no_problem():
    points = [signed(3), signed(6)]

    assert [] == anchor_problems(anchor_of(points[0]), False, points, TRUSTED)
    assert [] == anchor_problems(anchor_of(points[1]), False, points, TRUSTED)


def test_no_anchor_no_problem():
    assert [] == anchor_problems(None, False, [], TRUSTED)
    assert [] == anchor_problems(None, False, [signed(2)], TRUSTED)


def test_all_checkpoints_deleted_reported():
    [problem] = anchor_problems(anchor_of(signed(6)), False, [], TRUSTED)

    assert "deleted" == problem.kind
    assert 6 == problem.seq
    assert "seq 6" in problem.message
    assert "no valid checkpoint of this chain" in problem.message


def test_older_checkpoint_only_reported():
    [problem] = anchor_problems(
        anchor_of(signed(6)), False, [signed(3)], TRUSTED
    )

    assert "deleted" == problem.kind
    assert 6 == problem.seq
    assert "newest valid checkpoint is at seq 3" in problem.message


def test_changed_hash_reported():
    [problem] = anchor_problems(
        anchor_of(signed(6)), False, [signed(6, fill=9)], TRUSTED
    )

    assert "checkpoint" == problem.kind
    assert 6 == problem.seq
    assert "another hash" in problem.message


def test_untrusted_checkpoint_not_matched():
    """A checkpoint with the anchor's seq and hash, signed by a key that is
    not trusted, is no match."""
    forged = signed(6, key=Ed25519PrivateKey.generate())

    [problem] = anchor_problems(anchor_of(signed(6)), False, [forged], TRUSTED)

    assert "deleted" == problem.kind
    assert 6 == problem.seq


def test_empty_anchor_file_reported():
    [problem] = anchor_problems(None, True, [signed(4)], TRUSTED)

    assert "checkpoint" == problem.kind
    assert 0 == problem.seq
    assert "anchor file contains no checkpoint" in problem.message
    assert "ARXIO_AUDIT_ANCHOR_ADOPT=true" in problem.message
