"""Fault-load records that stay honest: a sender that raises becomes a
failed outcome, and a rerun's old figures stop reading as passed."""

import json

from tests.e2e import fault_load


def test_raising_sender_recorded_failed():
    def send():
        raise ValueError("body is not JSON")

    outcome = fault_load.guarded(send, "model review")()

    assert not outcome.ok
    assert "model review" == outcome.kind
    assert "client error" == outcome.status
    assert "body is not JSON" in outcome.detail


def test_earlier_figures_marked_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(fault_load, "FIGURES_DIR", tmp_path)
    mine = tmp_path / "auth.json"
    other = tmp_path / "database.json"
    mine.write_text(json.dumps({"test": "t.py::test_auth", "passed": True}))
    other.write_text(json.dumps({"test": "t.py::test_db", "passed": True}))

    fault_load.mark_figures_stale("t.py::test_auth")

    assert json.loads(mine.read_text())["passed"] is False
    assert json.loads(other.read_text())["passed"] is True


def test_figures_name_their_test(tmp_path, monkeypatch):
    monkeypatch.setattr(fault_load, "FIGURES_DIR", tmp_path)
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "t.py::test_auth[x y] (call)")

    path = fault_load.write_figures("auth", {"passed": True})

    assert "t.py::test_auth[x y]" == json.loads(path.read_text())["test"]
