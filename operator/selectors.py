"""Kubernetes label selector semantics (matchLabels AND matchExpressions), as pure functions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """True when `labels` satisfy `selector`; an absent or empty selector selects everything.

    `selector` is the wire form ({matchLabels, matchExpressions}) so the same function
    serves BpfProgram.nodeSelector and NetworkIdentityPolicy pod/namespace selectors.
    """
    if not selector:
        return True
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True
