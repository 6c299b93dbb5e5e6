"""Quarantine of builds that ended the node daemon: counted across runs, per unit and hash."""

from __future__ import annotations

from pathlib import Path

from beekeeper.node_daemon.build_guard import QUARANTINE_AFTER, BuildGuard


def test_a_finished_build_leaves_no_marker(tmp_path: Path):
    guard = BuildGuard(tmp_path)
    assert guard.begin("u", "unit", "h1") == 0
    guard.end("u")
    assert BuildGuard(tmp_path).begin("u", "unit", "h1") == 0


def test_two_runs_in_a_row_ending_in_the_same_build_quarantine_it(tmp_path: Path):
    assert BuildGuard(tmp_path).begin("u", "unit", "h1") == 0  # this run dies mid-build
    assert BuildGuard(tmp_path).begin("u", "unit", "h1") == 1  # retried once; dies again
    third = BuildGuard(tmp_path)
    assert third.begin("u", "unit", "h1") == QUARANTINE_AFTER
    assert third.begin("u", "unit", "h1") == QUARANTINE_AFTER, "quarantined for the whole run"
    assert BuildGuard(tmp_path).begin("u", "unit", "h1") == QUARANTINE_AFTER, "and across restarts"


def test_a_new_spec_or_the_units_removal_lifts_the_quarantine(tmp_path: Path):
    BuildGuard(tmp_path).begin("u", "unit", "h1")
    BuildGuard(tmp_path).begin("u", "unit", "h1")
    guard = BuildGuard(tmp_path)
    assert guard.begin("u", "unit", "h2") == 0
    guard.end("u")
    BuildGuard(tmp_path).begin("v", "other", "h1")
    BuildGuard(tmp_path).begin("v", "other", "h1")
    guard = BuildGuard(tmp_path)
    guard.end("v")  # the unit was removed
    assert BuildGuard(tmp_path).begin("v", "other", "h1") == 0


def test_an_interrupted_build_of_another_unit_does_not_count(tmp_path: Path):
    BuildGuard(tmp_path).begin("u", "unit", "h1")
    guard = BuildGuard(tmp_path)
    assert guard.begin("v", "other", "h9") == 0
    assert guard.begin("u", "unit", "h1") == 1


def test_an_unreadable_marker_is_dropped(tmp_path: Path):
    (tmp_path / "building").mkdir()
    (tmp_path / "building" / "u.json").write_text("{not json")
    assert BuildGuard(tmp_path).begin("u", "unit", "h1") == 0
