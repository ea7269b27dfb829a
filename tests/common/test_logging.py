"""Log lines are JSON, and tracebacks carry no local variables."""

import json

import structlog

from services.common.logging import configure_logging


def _fail_with_patient_data() -> None:
    patient_note = "zzphimarkerlocal"  # noqa: F841
    raise ValueError("screening failed on item 3")


def test_traceback_omits_local_variables(capsys):
    """A logged exception shows the error and its frames, not locals."""
    configure_logging("test")
    log = structlog.get_logger()
    try:
        _fail_with_patient_data()
    except ValueError:
        log.exception("review failed", request_id="r-1")
    structlog.reset_defaults()

    [line] = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert "review failed" == record["event"]
    assert "ValueError: screening failed on item 3" in record["exception"]
    assert "_fail_with_patient_data" in record["exception"]
    assert "zzphimarkerlocal" not in line


def test_one_json_object_per_line(capsys):
    configure_logging("test")
    structlog.get_logger().info("started", port=1)
    structlog.reset_defaults()

    [line] = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert "test" == record["service"]
    assert "info" == record["level"]
    assert 1 == record["port"]
