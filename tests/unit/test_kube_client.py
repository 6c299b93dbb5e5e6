"""Which kubeconfig a component's API client uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from beekeeper import kube


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def test_kubeconfig_set_in_the_environment_after_import_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`beekeeper operator --kubeconfig F` exports KUBECONFIG after the client library was imported."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "late", "https://127.0.0.9:6443")))
    assert kube.api_client().configuration.host == "https://127.0.0.9:6443"


def test_an_explicit_kubeconfig_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "env", "https://127.0.0.9:6443")))
    explicit = _kubeconfig(tmp_path / "explicit", "https://127.0.0.10:6443")
    assert kube.api_client(explicit).configuration.host == "https://127.0.0.10:6443"


def test_writes_are_attributed_to_the_component(tmp_path: Path) -> None:
    """The apiserver names a write's field manager after the User-Agent's first segment."""
    api = kube.api_client(_kubeconfig(tmp_path / "k", "https://127.0.0.9:6443"), manager=kube.OPERATOR_MANAGER)
    assert api.user_agent.split("/")[0] == "beekeeper-operator"
    assert kube.api_client(tmp_path / "k").user_agent.startswith("beekeeper/")


def test_an_applied_body_leaves_out_what_is_none() -> None:
    body = {"status": {"warnings": None, "nodes": {"ready": 1, "failed": None}, "list": [{"a": None, "b": 2}]}}
    assert kube.without_none(body) == {"status": {"nodes": {"ready": 1}, "list": [{"b": 2}]}}
