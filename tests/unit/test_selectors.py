"""Label selector semantics, as Kubernetes defines them."""

from __future__ import annotations

import pytest

from beekeeper.operator.selectors import matches

LABELS = {"zone": "a", "tier": "edge", "gpu": ""}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (None, True),
        ({}, True),
        ({"matchLabels": {"zone": "a"}}, True),
        ({"matchLabels": {"zone": "b"}}, False),
        ({"matchLabels": {"zone": "a", "tier": "core"}}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "In", "values": ["a"]}]}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}, True),
        ({"matchExpressions": [{"key": "missing", "operator": "NotIn", "values": ["b"]}]}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, False),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "missing", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "DoesNotExist"}]}, True),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, False),
        (
            {
                "matchLabels": {"tier": "edge"},
                "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}],
            },
            True,
        ),
    ],
)
def test_matches(selector: dict | None, expected: bool) -> None:
    assert matches(selector, LABELS) is expected


def test_empty_selector_selects_unlabelled_objects() -> None:
    assert matches({}, None)
    assert not matches({"matchLabels": {"a": "b"}}, None)
