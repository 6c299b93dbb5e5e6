# One image for both components: `beekeeper operator` and `beekeeper node-daemon`.
# The node daemon needs /sys/fs/bpf and /sys/kernel/tracing mounted. Its own datapath
# (NetworkIdentityPolicy) is compiled here, in the build stage, and loaded through libbpf:
# it needs no compiler or kernel headers on the node. BpfPrograms with C `source` are
# compiled on the node by bcc (Debian's python3-bpfcc), which needs the host's /lib/modules
# and /usr/src (kernel headers) mounted.
#
# Hermetic where it matters: Python dependencies come from the pinned set in constraints.txt.
# When the build context has a wheels/ directory (beekeeper/devenv/images.py builds it on the
# host), they are installed from it with --no-index and the build needs no PyPI; without it
# (a plain `docker build .`) pip fetches the same pinned versions from PyPI.

FROM debian:bookworm-slim AS build
# clang, libbpf-dev and the UAPI headers build bpf/*.o (scripts/build_bpf.py, run by setup.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv clang libbpf-dev linux-libc-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# `wheel[s]` matches nothing when there is no wheels/ directory; constraints.txt always exists.
COPY constraints.txt wheel[s] /wheels/
COPY pyproject.toml setup.py MANIFEST.in README.md LICENSE ./
COPY scripts/build_bpf.py scripts/
COPY beekeeper beekeeper
COPY operator operator
COPY node_daemon node_daemon
COPY crds crds
COPY bpf bpf
# pip and setuptools are not needed at run time; the kubernetes client ships an asyncio twin
# of itself (kubernetes/aio, 68 of its 126 MB) that beekeeper never imports.
RUN set -eu; \
    offline=""; if ls /wheels/*.whl >/dev/null 2>&1; then offline="--no-index --find-links /wheels"; fi; \
    python3 -m venv /opt/beekeeper; \
    PIP_CONSTRAINT=/wheels/constraints.txt /opt/beekeeper/bin/pip install --no-cache-dir --disable-pip-version-check \
        $offline /src; \
    test -s /opt/beekeeper/lib/python3*/site-packages/beekeeper/bpf/policy.o; \
    /opt/beekeeper/bin/pip uninstall --yes --quiet pip setuptools; \
    rm -rf /opt/beekeeper/lib/python3*/site-packages/kubernetes/aio

FROM debian:bookworm-slim
# python3-bpfcc: bcc compiles BpfProgram sources on the node; libbpf1: the daemon's bpf(2) calls.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-bpfcc libbpf1 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*
COPY --from=build /opt/beekeeper /opt/beekeeper
# bcc is not on PyPI: expose only Debian's bcc module to the venv, not all of dist-packages.
RUN mkdir /opt/beekeeper/system-bcc \
    && ln -s /usr/lib/python3/dist-packages/bcc /opt/beekeeper/system-bcc/bcc \
    && echo /opt/beekeeper/system-bcc > "$(/opt/beekeeper/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/system-bcc.pth" \
    && /opt/beekeeper/bin/python -c 'import bcc, beekeeper.cli, beekeeper.operator.handlers' \
    && groupadd --gid 65532 beekeeper \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin beekeeper
# Last, so a new revision does not invalidate the cached layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="beekeeper" \
      org.opencontainers.image.description="Kubernetes operator and node daemon that run eBPF programs declaratively" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/beekeeper-dev/beekeeper" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
# Non-root by default (the operator); the chart runs the node daemon as root with a few capabilities.
# The user has a passwd entry: kopf asks getpass.getuser(), which fails for an unnamed uid.
USER 65532:65532
ENTRYPOINT ["/opt/beekeeper/bin/beekeeper"]
CMD ["--help"]
