"""Unit state persistence and pin naming."""

from __future__ import annotations

import pytest

from beekeeper.node_daemon.unit_state import (
    BuildRecord,
    Failure,
    LinkRecord,
    ProgramRecord,
    StateStore,
    UnitRecord,
    safe_name,
)


def test_safe_names_are_bpffs_legal_readable_and_unique():
    assert safe_name("count@xdp:veth0") == "count@xdp:veth0"
    dotted, slashed = safe_name("my.program"), safe_name("my/program")
    assert "." not in dotted and "/" not in slashed
    assert dotted.startswith("my_program~") and slashed.startswith("my_program~") and dotted != slashed
    assert safe_name("my_program") == "my_program"
    assert len(safe_name("x" * 500)) < 120


def test_records_round_trip_through_the_store(tmp_path):
    store = StateStore(str(tmp_path))
    record = UnitRecord(
        key="demo.unit",
        dirname=safe_name("demo.unit"),
        content_hash="ab" * 32,
        current="abababababab-2",
        next_seq=3,
        builds={
            "abababababab-2": BuildRecord(
                "abababababab-2",
                "ab" * 32,
                programs={"f:xdp": ProgramRecord("f", "xdp", "abababababab-2/progs/f:xdp", 42)},
                failures={"g:tc": Failure("VerifierRejected", "R0 invalid mem access")},
                maps={"counts": "abababababab-2/maps/counts"},
            ),
            "cdcdcdcdcdcd-1": BuildRecord(
                "cdcdcdcdcdcd-1", "cd" * 32, compile_failure=Failure("LoadFailed", "ENOMEM", True)
            ),
        },
        links={
            "f@xdp:veth0": LinkRecord(
                "f@xdp:veth0",
                "xdp/native:veth0",
                "xdp",
                "f:xdp",
                "abababababab-2",
                42,
                "links/f@xdp:veth0",
                {"mode": "native"},
                {"ifindex": 7},
            )
        },
    )
    store.save(record)
    (tmp_path / "units" / "other.partial").write_text("{")  # a write cut short by a crash
    (loaded,) = store.load_all()
    assert loaded == record
    assert not record.builds["cdcdcdcdcdcd-1"].final and record.builds["abababababab-2"].final
    assert not list((tmp_path / "units").glob("*.partial"))
    store.delete(record)
    assert store.load_all() == []


def test_unreadable_state_is_skipped(tmp_path):
    store = StateStore(str(tmp_path))
    (tmp_path / "units" / "broken.json").write_text('{"format": 999}')
    assert store.load_all() == []


def test_one_process_at_a_time_owns_a_state_directory(tmp_path):
    first = StateStore(str(tmp_path))
    with pytest.raises(RuntimeError, match="only one node daemon may manage a state directory"):
        StateStore(str(tmp_path), lock_timeout=0)
    first.close()
    StateStore(str(tmp_path), lock_timeout=0).close()
