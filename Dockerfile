# One image for both components: `beekeeper operator` and `beekeeper node-daemon`.
# The node daemon needs bcc (Debian's python3-bpfcc) and, at run time, the host's
# /lib/modules and /usr/src (kernel headers), /sys/fs/bpf and /sys/kernel/tracing mounted.
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc bpftool iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY beekeeper beekeeper
COPY operator operator
COPY node_daemon node_daemon
COPY crds crds
COPY bpf bpf
# --system-site-packages: bcc is only packaged by the distro, not on PyPI.
RUN python3 -m venv --system-site-packages /opt/beekeeper \
    && /opt/beekeeper/bin/pip install --no-cache-dir /src \
    && rm -rf /src

USER root
ENTRYPOINT ["/opt/beekeeper/bin/beekeeper"]
CMD ["--help"]
