"""The ingester's reading of lines, its numbering of rows and request
ids, and its rotation settings."""

import dataclasses
import datetime
import json
import uuid

import pytest

from services.audit import chain
from services.audit.entries import (
    REPLACED_REQUEST_ID_PREFIX,
    UNREADABLE_ACTION,
    AuditRow,
)
from services.audit.ingest import (
    MAX_PARSED_LINE_BYTES,
    ChainHead,
    chain_rows,
    drop_replays,
    read_batch,
    replay_key,
    unique_request_ids,
)
from services.audit.log_rotation import DEFAULT_MAX_BYTES, RotationSettings
from services.common.config import ConfigError, Environment

ORG = str(uuid.uuid4())
MIDNIGHT = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)
EDGE_ID = "0b7c6a52-9a7e-4c1e-9a51-3f1f3c2f5b0e"
OTHER_ID = "5d0e8c1f-2b9a-4c7e-8f31-6a4b2c9d0e17"
THIRD_ID = "9e3f1a27-4c8b-4d6e-a0f2-7b5c3d1e9f08"


def row(moment: datetime.datetime, org_id: str | None = ORG) -> AuditRow:
    return AuditRow(
        event_id=uuid.uuid4(),
        time=moment,
        org_id=org_id,
        key_id="key_0123456789abcdef",
        action="cds.clinical_review",
        resource_type="clinical_review",
        method="POST",
        endpoint="/v1/cds/clinical-review",
        status_code=200,
        grpc_status=0,
        response_time_ms=4,
        request_id=str(uuid.uuid4()),
        client_address="127.0.0.1",
    )


class TestRecordTime:
    def test_first_entry_filed_at_its_time(self):
        moment = MIDNIGHT - datetime.timedelta(seconds=1)

        [linked] = chain_rows([row(moment)], {})

        assert 1 == linked.entry.seq
        assert moment == linked.record_time

    def test_late_entry_filed_after_newer_head(self):
        """A request that started before midnight but is stored after one
        from the new month is filed in the new month, keeping its time."""
        chain_id = chain.chain_of(ORG)
        head_time = MIDNIGHT + datetime.timedelta(seconds=2)
        heads = {chain_id: ChainHead(7, bytes(32), head_time)}
        started = MIDNIGHT - datetime.timedelta(milliseconds=5)

        [linked] = chain_rows([row(started)], heads)

        assert 8 == linked.entry.seq
        assert started == linked.entry.time
        assert head_time == linked.record_time
        assert ChainHead(8, linked.entry.hash, head_time) == heads[chain_id]

    def test_record_time_never_goes_back(self):
        """Within a batch and across chains, record_time follows seq."""
        other_org = str(uuid.uuid4())
        heads = {
            chain.chain_of(ORG): ChainHead(
                3, bytes(32), MIDNIGHT + datetime.timedelta(minutes=5)
            )
        }
        rows = [
            row(MIDNIGHT + datetime.timedelta(minutes=minute), org_id)
            for minute in (9, 1, 7, 3)
            for org_id in (ORG, other_org)
        ]

        linked = chain_rows(rows, heads)

        for org_id in (ORG, other_org):
            mine = [item for item in linked if item.entry.org_id == org_id]
            seqs = [item.entry.seq for item in mine]
            times = [item.record_time for item in mine]
            assert sorted(seqs) == seqs
            assert sorted(times) == times
            for item in mine:
                assert item.record_time >= item.entry.time
        org_times = [i.record_time for i in linked if i.entry.org_id == ORG]
        assert MIDNIGHT + datetime.timedelta(minutes=5) == org_times[0]


class TestRotationSettings:
    def test_defaults(self):
        settings = RotationSettings.from_env(Environment({}))

        assert DEFAULT_MAX_BYTES == settings.max_bytes
        assert "http://127.0.0.1:9901" == settings.envoy_admin_url

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:19000",
            "http://[::1]:19000/",
            "http://localhost:1",
        ],
    )
    def test_loopback_admin_accepted(self, url):
        settings = RotationSettings.from_env(
            Environment({"ARXIO_ENVOY_ADMIN_URL": url})
        )

        assert url.rstrip("/") == settings.envoy_admin_url

    @pytest.mark.parametrize(
        "url",
        [
            "http://10.0.0.5:9901",
            "https://127.0.0.1:9901",
            "http://127.0.0.1",
            "http://127.0.0.1:9901/reopen_logs",
            "http://envoy:9901",
            "127.0.0.1:9901",
        ],
    )
    def test_other_admin_rejected(self, url):
        with pytest.raises(ConfigError) as raised:
            RotationSettings.from_env(
                Environment({"ARXIO_ENVOY_ADMIN_URL": url})
            )

        assert "ARXIO_ENVOY_ADMIN_URL" in str(raised.value)

    def test_negative_size_rejected(self):
        with pytest.raises(ConfigError):
            RotationSettings.from_env(
                Environment({"ARXIO_AUDIT_LOG_MAX_BYTES": "-1"})
            )


def access_line(request_id: str, **fields: str) -> bytes:
    line = {
        "time": "2026-12-04T09:00:00.000001Z",
        "request_id": request_id,
        "reply_request_id": request_id,
        "method": "GET",
        "route": "-",
        "status": "400",
    } | fields

    return json.dumps(line).encode() + b"\n"


class TestReadBatch:
    def test_long_line_stored(self, tmp_path):
        """A line over the limit, such as a 20 KB value from an edge that
        did not cut it, becomes an entry and is counted."""
        path = tmp_path / "access.log"
        long_line = access_line(EDGE_ID, content_type="x" * 20000)
        path.write_bytes(long_line + access_line(OTHER_ID))

        batch = read_batch(path, 0)

        assert [EDGE_ID, OTHER_ID] == [row.request_id for row in batch.rows]
        assert 1 == batch.long_lines
        assert 0 == batch.skipped_lines
        assert path.stat().st_size == batch.end

    def test_unparsed_long_line_stored(self, tmp_path):
        """A line too long to parse still gets an entry, which records
        that its line was unreadable."""
        path = tmp_path / "access.log"
        huge = access_line(EDGE_ID, content_type="x" * MAX_PARSED_LINE_BYTES)
        path.write_bytes(huge + access_line(OTHER_ID))

        batch = read_batch(path, 0)

        assert UNREADABLE_ACTION == batch.rows[0].action
        assert OTHER_ID == batch.rows[1].request_id
        assert 1 == batch.long_lines
        assert path.stat().st_size == batch.end

    def test_unfinished_long_line_waits(self, tmp_path):
        path = tmp_path / "access.log"
        first = access_line(OTHER_ID)
        path.write_bytes(first + b'{"request_id": "' + b"x" * 40000)

        batch = read_batch(path, 0)

        assert [OTHER_ID] == [row.request_id for row in batch.rows]
        assert len(first) == batch.end

    def test_invalid_short_line_skipped(self, tmp_path):
        path = tmp_path / "access.log"
        path.write_bytes(b"not json\n" + access_line(OTHER_ID))

        batch = read_batch(path, 0)

        assert [OTHER_ID] == [row.request_id for row in batch.rows]
        assert 1 == batch.skipped_lines
        assert 0 == batch.long_lines


class TestUniqueRequestIds:
    def test_stored_and_repeated_ids_replaced(self):
        rows = [
            dataclasses.replace(row(MIDNIGHT), request_id=request_id)
            for request_id in (EDGE_ID, OTHER_ID, OTHER_ID, THIRD_ID)
        ]
        stored = {EDGE_ID}

        unique, replaced = unique_request_ids(rows, stored)

        ids = [item.request_id for item in unique]
        assert 2 == replaced
        assert REPLACED_REQUEST_ID_PREFIX in ids[0]
        assert OTHER_ID == ids[1]
        assert REPLACED_REQUEST_ID_PREFIX in ids[2]
        assert THIRD_ID == ids[3]
        assert 4 == len(set(ids) - {EDGE_ID})
        assert set(ids) <= stored


class TestDropReplays:
    def test_stored_copy_dropped(self):
        original = dataclasses.replace(row(MIDNIGHT), request_id=EDGE_ID)
        # A copy of the stored line parses to a row with a new event id.
        copy = dataclasses.replace(original, event_id=uuid.uuid4())
        stored = {replay_key(original)}

        kept, replayed = drop_replays([copy], stored)

        assert [] == kept
        assert 1 == replayed

    def test_copy_within_batch_dropped(self):
        first = dataclasses.replace(row(MIDNIGHT), request_id=EDGE_ID)
        copy = dataclasses.replace(first, event_id=uuid.uuid4())

        kept, replayed = drop_replays([first, copy], set())

        assert [first] == kept
        assert 1 == replayed

    @pytest.mark.parametrize(
        "change",
        [
            {"time": MIDNIGHT + datetime.timedelta(microseconds=1)},
            {"status_code": 500},
            {"method": "GET"},
            {"org_id": None},
        ],
    )
    def test_other_request_with_same_id_kept(self, change):
        original = dataclasses.replace(row(MIDNIGHT), request_id=EDGE_ID)
        other = dataclasses.replace(original, **change)

        kept, replayed = drop_replays([other], {replay_key(original)})

        assert [other] == kept
        assert 0 == replayed
