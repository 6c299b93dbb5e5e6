"""NetworkIdentity: one numeric identity per distinct (namespace, pod labels, namespace labels).

Allocated cluster-wide by the operator and persisted as objects (named by the number) so
identities survive operator restarts and every node daemon agrees on them. Written by
the operator only; garbage-collected when no pod has the label set any more.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import ConfigDict, Field

from beekeeper.crds.common import AGE_COLUMN, ApiModel, DnsLabel, PrinterColumn, Resource, cel, validations
from beekeeper.crds.names import NETWORK_IDENTITY

NAMESPACE_LABEL = "beekeeper.dev/namespace"
"""Label of every NetworkIdentity the operator creates: its pods' namespace, for `kubectl get nid -l`."""
MIN_POD_IDENTITY = 256
MAX_POD_IDENTITY = (1 << 24) - 1


class NetworkIdentitySpec(ApiModel):
    """The label set this identity stands for; immutable, so a number never changes meaning."""

    model_config = ConfigDict(json_schema_extra=validations(cel("self == oldSelf", "spec is immutable")))

    namespace: DnsLabel = Field(description="Namespace of the pods with this identity.")
    labels: dict[str, str] | None = Field(None, max_length=64, description="The pods' labels.")
    namespace_labels: dict[str, str] | None = Field(
        None, max_length=64, description="Labels of the namespace (namespaceSelector matches them)."
    )


class NetworkIdentity(Resource):
    """NetworkIdentity is a numeric security identity (the object's name) for one label set.

    The policy datapath keys its maps by these numbers instead of pod IPs, so pod churn never
    rewrites policy entries.
    """

    names: ClassVar = NETWORK_IDENTITY
    printer_columns: ClassVar = (
        PrinterColumn("Pod-Namespace", ".spec.namespace", "string", "Namespace of the pods"),
        AGE_COLUMN,
    )
    selectable_fields: ClassVar = (".spec.namespace",)
    """`kubectl get nid --field-selector spec.namespace=x`; cluster-scoped, so `-n x` would list them all."""
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                f"self.metadata.name.matches('^[1-9][0-9]*$') && int(self.metadata.name) >= {MIN_POD_IDENTITY} "
                f"&& int(self.metadata.name) <= {MAX_POD_IDENTITY}",
                f"metadata.name must be the identity number, {MIN_POD_IDENTITY}..{MAX_POD_IDENTITY}",
            )
        )
    )

    kind: Literal["NetworkIdentity"] = Field("NetworkIdentity", description="NetworkIdentity")
    spec: NetworkIdentitySpec = Field(description="The label set.")
