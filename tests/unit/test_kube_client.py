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
