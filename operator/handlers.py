"""kopf handlers: thin glue between API events and the pure desired-state functions."""

from __future__ import annotations

import logging

import kopf

from beekeeper.crds.names import BPF_PROGRAM_PLURAL, GROUP, VERSION

log = logging.getLogger(__name__)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: object) -> None:
    """Keep kopf's bookkeeping out of status (status belongs to the API) and bound retries."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="beekeeper.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="beekeeper.dev")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300


@kopf.on.resume(GROUP, VERSION, BPF_PROGRAM_PLURAL)
@kopf.on.create(GROUP, VERSION, BPF_PROGRAM_PLURAL)
@kopf.on.update(GROUP, VERSION, BPF_PROGRAM_PLURAL)
def bpfprogram_seen(name: str, spec: kopf.Spec, **_: object) -> None:
    log.info("bpfprogram observed", extra={"bpfprogram": name, "programs": len(spec.get("programs", []))})
