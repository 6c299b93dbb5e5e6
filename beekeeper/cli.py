"""The `beekeeper` command: the two components, the local developer environment, and diagnostics."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import signal
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client.rest import ApiException

from beekeeper import kube, logs


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _dev(args: argparse.Namespace) -> int:
    from beekeeper.devenv import build
    from beekeeper.devenv.host import prepare_host
    from beekeeper.devenv.stack import DevEnvironment

    env = DevEnvironment()
    match args.dev_command:
        case "up":
            env.up(_progress)
        case "down":
            env.down(_progress)
        case "status":
            print(env.status())
        case "kubeconfig":
            print(env.control_plane.kubeconfig)
        case "metrics":
            print(env.metrics(args.grep, args.top))
        case "build":
            print(build.ensure_built(_progress))
            print(build.ensure_node_built(_progress))
            print(build.ensure_promlint(_progress))
            print(build.ensure_kstatus(_progress))
        case "cluster":
            return _dev_cluster(args)
        case "build-promtool":
            print(build.ensure_promtool(_progress))
        case "oci-tools":
            from beekeeper.devenv.oci_tools import ensure_cosign, ensure_registry

            print(ensure_registry(_progress))
            print(ensure_cosign(_progress))
        case "prepare-host":
            prepare_host(_progress)
        case "images":
            from beekeeper.devenv import images

            print(images.build_all(_progress))
        case "chart-tools":
            from beekeeper.devenv.chart_tools import ensure_chart_tools

            tools = ensure_chart_tools(_progress)
            print(f"helm {tools.helm}\nkubeconform {tools.kubeconform}")
        case "apply":
            from beekeeper.devenv.apply_wait import apply_and_wait

            kubectl = build.ensure_built(_progress).kubectl
            apply_and_wait(kubectl, env.control_plane.kubeconfig, args.filename, args.timeout, _progress)
        case "kubectl":
            bins = build.ensure_built(_progress)
            argv = args.args[1:] if args.args[:1] == ["--"] else args.args
            os.execve(
                str(bins.kubectl), ["kubectl", *argv], {**os.environ, "KUBECONFIG": str(env.control_plane.kubeconfig)}
            )
    return 0


def _dev_cluster(args: argparse.Namespace) -> int:
    from beekeeper.devenv.paths import state_dir
    from beekeeper.devenv.realnode import RealNode

    rig = RealNode(state_dir().with_name("realnode"))
    match args.cluster_command:
        case "up":
            rig.up(_progress)
            if not args.no_chart:
                from beekeeper.devenv import chart_release

                release = chart_release.prepare(rig, _progress)
                if not release.installed():
                    _progress(f"[chart] helm install {chart_release.RELEASE} {chart_release.CHART}")
                    _progress(f"[chart] installed and Ready in {release.install():.1f}s")
            print(rig.status())
        case "down":
            rig.down(_progress)
            left = rig.leftovers()
            if left:
                _progress("beekeeper: error: left behind after down:\n  " + "\n  ".join(left))
                return 1
        case "status":
            print(rig.status())
    return 0


def _operator(args: argparse.Namespace) -> int:
    from beekeeper.operator.main import run
    from beekeeper.operator.policy_compile import BUDGET_ENV

    if args.policy_expansion_budget is not None:
        os.environ[BUDGET_ENV] = str(args.policy_expansion_budget)
    from beekeeper.operator.image_resolver import KEYS_ENV, POLICY_ENV, REGISTRY_CA_ENV

    for env, value in (
        (POLICY_ENV, args.image_verification),
        (KEYS_ENV, args.image_verification_keys),
        (REGISTRY_CA_ENV, args.registry_ca_file),
    ):
        if value is not None:
            os.environ[env] = value
    run(kubeconfig=args.kubeconfig, health_port=args.health_port)
    return 0


def _node_daemon(args: argparse.Namespace) -> int:
    from beekeeper.node_daemon.compile_limits import CompileLimits
    from beekeeper.node_daemon.main import run

    run(
        node_name=args.node_name,
        kubeconfig=args.kubeconfig,
        bpffs_root=args.bpffs_root,
        state_dir=args.state_dir,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        backend_kind=args.backend,
        fake_policy=args.fake_policy,
        compile_limits=CompileLimits(
            args.compile_timeout, args.compile_memory_limit, args.compile_sandbox == "landlock"
        ),
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_private_key_file,
        client_ca_file=args.client_ca_file,
        registry_ca_file=args.registry_ca_file,
        **({"metrics_series_budget": args.metrics_series_budget} if args.metrics_series_budget else {}),
    )
    return 0


def _uninstall_cleanup(args: argparse.Namespace) -> int:
    from beekeeper import kube
    from beekeeper.uninstall import cleanup

    cleanup(kube.api_client(args.kubeconfig), timeout=args.timeout, progress=_progress)
    return 0


def _why_dropped(args: argparse.Namespace) -> int:
    """Ask node daemons which recent drops match a flow, and why each happened."""
    query = {
        k: v
        for k, v in {
            "src": args.src,
            "dst": args.dst,
            "port": args.port,
            "protocol": args.protocol,
            "limit": args.limit,
        }.items()
        if v is not None
    }
    credentials = _daemon_credentials(args)
    answers = []
    for url in args.url:
        endpoint = f"{url.rstrip('/')}/drops?{urllib.parse.urlencode(query)}"
        answers.append(_fetch_json(credentials, url, endpoint, args, timeout=10))
    if args.json:
        print(json.dumps(answers, indent=2))
    else:
        print(format_drops(answers, query))
    return 0


def format_exec_event(event: dict[str, Any]) -> str:
    """One line per matched exec, e.g. `... Blocked shop/web-1/app /bin/sh (parent bash) shop/no-shells:shells`."""
    where = f"{event.get('namespace')}/{event.get('pod')}/{event.get('container')}"
    return (
        f"{event.get('time')} {event.get('node')} {event.get('action')} {where} pid {event.get('pid')} "
        f"{event.get('file')} (parent {event.get('parent')}) {event.get('policy')}:{event.get('rule')}"
        + (" [Audit mode]" if event.get("mode") == "Audit" else "")
    )


def _fetch_json(
    credentials: DaemonCredentials, url: str, endpoint: str, args: argparse.Namespace, timeout: float
) -> Any:
    """A node daemon's JSON answer; its refusals become RuntimeErrors saying why."""
    request, context = credentials.request(endpoint, args.certificate_authority, args.insecure_skip_tls_verify)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        error = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise RuntimeError(f"{url}: {exc.code} {error}{credentials.hint(exc.code, endpoint)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"{url}: cannot reach the node daemon ({exc})") from None


def _events(args: argparse.Namespace) -> int:
    """Matched execs from node daemons; with --follow, new ones as they happen (long-poll per node)."""
    filters = {k: getattr(args, k) for k in ("namespace", "pod", "policy") if getattr(args, k)}
    credentials = _daemon_credentials(args)
    since = dict.fromkeys(args.url, 0)
    wait = 2 if args.follow and len(args.url) > 1 else (20 if args.follow else 0)
    while True:
        for url in args.url:
            query = {**filters, "since": since[url], "limit": args.limit, **({"wait": wait} if wait else {})}
            endpoint = f"{url.rstrip('/')}/exec-events?{urllib.parse.urlencode(query)}"
            answer = _fetch_json(credentials, url, endpoint, args, timeout=wait + 10)
            since[url] = answer["next"]
            for event in answer["events"]:
                print(json.dumps(event) if args.json else format_exec_event(event), flush=True)
        if not args.follow:
            return 0


@dataclass(frozen=True)
class DaemonCredentials:
    """What `why-dropped` shows a node daemon: the kubeconfig user's token and/or client certificate.

    The daemon checks them with the API (TokenReview, SubjectAccessReview), so they are the
    same credentials kubectl uses. The daemon's serving certificate is verified against the
    kubeconfig's cluster CA unless --certificate-authority names another.
    """

    token: str | None = None
    cert: tuple[str, str] | None = None
    cluster_ca: str | None = None

    def request(
        self, url: str, ca_file: str | None, insecure: bool
    ) -> tuple[urllib.request.Request, ssl.SSLContext | None]:
        parts = urllib.parse.urlsplit(url)
        headers = {}
        if self.token:
            if parts.scheme != "https" and not _loopback(parts.hostname or ""):
                raise RuntimeError(
                    f"refusing to send the kubeconfig's token in clear text to {parts.hostname}: "
                    "serve the node daemon with --tls-cert-file and use https://"
                )
            headers["Authorization"] = f"Bearer {self.token}"
        if parts.scheme != "https":
            return urllib.request.Request(url, headers=headers), None
        context = ssl.create_default_context(cafile=ca_file or self.cluster_ca)
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert:
            context.load_cert_chain(*self.cert)
        return urllib.request.Request(url, headers=headers), context

    def hint(self, code: int, url: str) -> str:
        if code == 401 and not self.token and self.cert and not url.startswith("https://"):
            return " (the kubeconfig's user has a client certificate: it only counts over https://)"
        if code == 401 and not self.token and not self.cert:
            return " (no credentials: the kubeconfig has none; try --token)"
        return ""


def _daemon_credentials(args: argparse.Namespace) -> DaemonCredentials:
    from kubernetes import config

    from beekeeper import kube

    try:
        configuration = kube.api_client(args.kubeconfig).configuration
    except (config.ConfigException, OSError):
        return DaemonCredentials(token=args.token)
    # the token of a kubeconfig user (static or from an exec plugin, refreshed here) or of the in-cluster account
    header = configuration.get_api_key_with_prefix("BearerToken") or ""
    scheme, _, token = header.partition(" ")
    cert = (configuration.cert_file, configuration.key_file) if configuration.cert_file else None
    return DaemonCredentials(
        token=args.token or (token.strip() if scheme.lower() == "bearer" else None),
        cert=cert,
        cluster_ca=configuration.ssl_ca_cert,
    )


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_drops(answers: list[dict[str, Any]], query: dict[str, Any]) -> str:
    """Human form of /drops answers: one paragraph per flow and verdict, newest first."""
    lines = []
    for answer in answers:
        for drop in answer["drops"]:
            where = drop["endpoint"] or "an unnamed endpoint"
            count = drop["count"]
            lines.append(
                f"{drop['src']} -> {drop['dst']} {drop['protocol']}/{drop['port']}: dropped {count} "
                f"packet{'s' if count != 1 else ''} at {drop['direction']} of {where} on node {answer['node']}, "
                f"last {drop['lastSeen']}"
            )
            lines.append(f"  why: {drop['explanation']}")
    if lines:
        return "\n".join(lines)
    wanted = " ".join(f"{k}={v}" for k, v in query.items() if k != "limit") or "any flow"
    kept = ", ".join(f"{a['node']} keeps its last {a['capacity']}" for a in answers)
    return f"no recorded drops match {wanted} ({kept} drop events)"


def parser() -> argparse.ArgumentParser:
    from beekeeper.version import version

    root = argparse.ArgumentParser(prog="beekeeper", description="Run eBPF programs on Kubernetes, declaratively.")
    root.add_argument(
        "--version", action="version", version=f"beekeeper {version()} (Python {platform.python_version()})"
    )
    root.add_argument("--log-level", default=None, help="debug, info, warning, error (env BEEKEEPER_LOG_LEVEL)")
    root.add_argument("--log-format", choices=["logfmt", "json"], default=None, help="env BEEKEEPER_LOG_FORMAT")
    sub = root.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="a local control plane + operator + node daemon on this machine")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    dev_sub.add_parser("up", help="start everything (building the control plane first if needed); idempotent")
    dev_sub.add_parser("down", help="stop everything `up` started")
    dev_sub.add_parser("status", help="show what is running")
    dev_sub.add_parser("kubeconfig", help="print the admin kubeconfig path")
    metrics = dev_sub.add_parser("metrics", help="show this machine's node daemon metrics")
    metrics.add_argument("--grep", default=None, help="only series matching this regular expression, largest first")
    metrics.add_argument("--top", type=int, default=None, help="at most this many series")
    dev_sub.add_parser(
        "build",
        help="build and cache the control plane (and kubelet, kube-scheduler, kube-proxy, the promlint checker) "
        "from source",
    )
    cluster = dev_sub.add_parser(
        "cluster", help="a real one-node cluster on this machine: containerd, kubelet, kube-proxy, scheduler"
    )
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    cluster_up = cluster_sub.add_parser(
        "up", help="build what is missing, start the node, install the chart with the image built here"
    )
    cluster_up.add_argument("--no-chart", action="store_true", help="only the node, without beekeeper")
    cluster_sub.add_parser("down", help="stop it and remove every mount, interface, cgroup and process it made")
    cluster_sub.add_parser("status", help="show what runs and the kubeconfig")
    dev_sub.add_parser(
        "build-promtool",
        help="build and cache promtool, which the tests then also run on /metrics (`promtool check metrics`)",
    )
    dev_sub.add_parser(
        "oci-tools",
        help="build and cache the OCI registry and cosign the bytecode-image tests use (also built on first use)",
    )
    dev_sub.add_parser("prepare-host", help="mount bpffs/tracefs and link kernel headers if absent")
    images = dev_sub.add_parser("images", help="container images built without Docker (debootstrap base, buildah)")
    images.add_subparsers(dest="images_command", required=True).add_parser(
        "build", help="build (or find cached) the base and the project image; prints their OCI archives"
    )
    dev_sub.add_parser("chart-tools", help="build and cache helm and kubeconform (lint and validate the chart)")
    apply = dev_sub.add_parser(
        "apply", help="kubectl apply manifests, then wait until those objects are Ready (fail fast if one cannot be)"
    )
    apply.add_argument("-f", "--filename", action="append", required=True, help="file or directory (repeatable)")
    apply.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for Ready (default 300)")
    kubectl = dev_sub.add_parser("kubectl", help="run the pinned kubectl against the dev control plane")
    kubectl.add_argument("args", nargs=argparse.REMAINDER)
    dev.set_defaults(func=_dev)

    op = sub.add_parser("operator", help="run the operator (reconciles CRs into per-node BpfNodeState)")
    op.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube/config or in-cluster")
    op.add_argument(
        "--policy-expansion-budget",
        type=int,
        default=None,
        help="policy map entries one NetworkIdentityPolicy may take on one node "
        "(default: $BEEKEEPER_POLICY_EXPANSION_BUDGET or 8192)",
    )
    op.add_argument(
        "--health-port",
        type=int,
        default=8081,
        help="port of GET /healthz (liveness) and GET /readyz (readiness) on 0.0.0.0; 0 disables",
    )
    op.add_argument(
        "--image-verification",
        choices=["require", "warn", "off"],
        default=None,
        help="cosign signatures of BpfProgram images: require (only verified images roll out), warn (roll out, "
        "report the verdict) or off (default: $BEEKEEPER_IMAGE_VERIFICATION or off)",
    )
    op.add_argument(
        "--image-verification-keys",
        default=None,
        help="PEM public key file, or a directory of them (a mounted Secret or ConfigMap), trusted for image "
        "signatures (env BEEKEEPER_IMAGE_VERIFICATION_KEYS)",
    )
    op.add_argument(
        "--registry-ca-file",
        default=None,
        help="CA bundle (PEM) for image registries, instead of the system's (env BEEKEEPER_REGISTRY_CA_FILE)",
    )
    op.set_defaults(func=_operator)

    nd = sub.add_parser("node-daemon", help="run the node daemon (compiles, verifies, attaches this node's programs)")
    nd.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(), help="env NODE_NAME")
    nd.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube/config or in-cluster")
    nd.add_argument(
        "--bpffs-root", type=Path, default=None, help="bpffs directory for pins (default /sys/fs/bpf/beekeeper)"
    )
    nd.add_argument(
        "--state-dir", type=Path, default=None, help="metadata next to the pins (default /var/lib/beekeeper)"
    )
    nd.add_argument(
        "--metrics-port",
        type=int,
        default=9464,
        help="port of /metrics and /drops (both need a caller the API authorizes); 0 disables",
    )
    nd.add_argument("--metrics-address", default="0.0.0.0", help="address /metrics listens on")
    nd.add_argument(
        "--metrics-series-budget",
        type=int,
        default=None,
        help="series one BpfProgram's maps may export on this node (default 2000); beyond it the largest values "
        "are exported and the program is Degraded (MetricsNotExported)",
    )
    nd.add_argument("--tls-cert-file", default=None, help="serving certificate (PEM): the port speaks TLS")
    nd.add_argument("--tls-private-key-file", default=None, help="key of --tls-cert-file (PEM)")
    nd.add_argument(
        "--client-ca-file",
        default=None,
        help="also accept client certificates signed by this CA (the cluster's client CA), as the kubelet does",
    )
    nd.add_argument(
        "--backend",
        choices=["bcc", "fake"],
        default="bcc",
        help="bcc: the kernel; fake: in memory, no policy datapath, no root (control plane scale tests)",
    )
    nd.add_argument(
        "--fake-policy",
        action="store_true",
        help="with --backend fake: the real policy agent over an in-memory datapath (policy control plane at scale)",
    )
    nd.add_argument(
        "--compile-timeout",
        type=float,
        default=float(os.environ.get("BEEKEEPER_COMPILE_TIMEOUT", "120")),
        help="seconds one program may take to compile and verify, else CompileTimeout (env BEEKEEPER_COMPILE_TIMEOUT)",
    )
    nd.add_argument(
        "--compile-memory-limit", type=int, default=2048, help="MiB of address space the compiler may use per program"
    )
    nd.add_argument(
        "--compile-sandbox",
        choices=["landlock", "none"],
        default="landlock",
        help="landlock: the compiler reads only the kernel headers (#include of other files fails); none: unconfined",
    )
    nd.add_argument(
        "--registry-ca-file",
        default=os.environ.get("BEEKEEPER_REGISTRY_CA_FILE") or None,
        help="CA bundle (PEM) for pulling BpfProgram images, instead of the system's (env BEEKEEPER_REGISTRY_CA_FILE)",
    )
    nd.set_defaults(func=_node_daemon)

    clean = sub.add_parser(
        "uninstall-cleanup",
        help="delete every BpfProgram and NetworkIdentityPolicy and wait until all nodes detached them",
        description="Run by the chart's pre-delete hook (helm uninstall, never upgrade) while the operator and "
        "the node daemons still run, so nothing beekeeper attached stays in a node's kernel unmanaged.",
    )
    clean.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube/config or in-cluster")
    clean.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the nodes (default 240)")
    clean.set_defaults(func=_uninstall_cleanup)

    why = sub.add_parser(
        "why-dropped",
        help="explain recent NetworkIdentityPolicy drops recorded by node daemons",
        description="Ask node daemons (their metrics port) which recent drops match a flow and why each happened: "
        "the deny policy, or default deny, and the direction. A flow is dropped at the client's node (egress) "
        "or the server's node (ingress): give both daemons' URLs to see either. The daemons check the kubeconfig "
        "user's credentials with the API: it needs get on bpfnodestates/drops (group beekeeper.dev) of those nodes.",
    )
    why.add_argument(
        "--url", action="append", required=True, help="node daemon base URL, e.g. https://NODE:9464 (repeatable)"
    )
    why.add_argument("--kubeconfig", default=None, help="whose credentials to show (default: $KUBECONFIG, ...)")
    why.add_argument("--token", default=None, help="bearer token to show instead of the kubeconfig's")
    why.add_argument(
        "--certificate-authority", default=None, help="CA of the daemons' serving certificates (default: the cluster's)"
    )
    why.add_argument(
        "--insecure-skip-tls-verify", action="store_true", help="do not verify the daemons' serving certificates"
    )
    why.add_argument("--src", help="IPv4 address that opened the flow")
    why.add_argument("--dst", help="IPv4 address the flow was sent to")
    why.add_argument("--port", type=int, help="destination port")
    why.add_argument("--protocol", type=str.upper, choices=["TCP", "UDP", "SCTP", "ICMP"], help="transport protocol")
    why.add_argument("--limit", type=int, help="at most this many flows per node (default 50)")
    why.add_argument("--json", action="store_true", help="print the daemons' JSON answers")
    why.set_defaults(func=_why_dropped)

    events = sub.add_parser(
        "events",
        help="execs RuntimeSecurityPolicies blocked or audited, from node daemons",
        description="Show the execs node daemons matched (blocked or audited), oldest first; --follow keeps "
        "printing new ones. Needs get on bpfnodestates/execevents (group beekeeper.dev) of those nodes.",
    )
    events.add_argument("--url", action="append", required=True, help="node daemon base URL (repeatable)")
    events.add_argument("--kubeconfig", default=None, help="whose credentials to show (default: $KUBECONFIG, ...)")
    events.add_argument("--token", default=None, help="bearer token to show instead of the kubeconfig's")
    events.add_argument("--certificate-authority", default=None, help="CA of the daemons' serving certificates")
    events.add_argument("--insecure-skip-tls-verify", action="store_true", help="do not verify serving certificates")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--namespace", "-n", help="only events of pods in this namespace")
    events.add_argument("--pod", help="only events of this pod")
    events.add_argument("--policy", help="only events of this policy (namespace/name)")
    events.add_argument("--limit", type=int, default=100, help="at most this many per request (default 100)")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(func=_events)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a reader that went away is caught, not at interpreter exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except (RuntimeError, TimeoutError) as exc:
        _progress(f"beekeeper: error: {exc}")
        return 1
    except ApiException as exc:
        refused = f"the Kubernetes API refused a request ({exc.status} {exc.reason})"
        _progress(f"beekeeper: error: {refused}: {kube.api_message(exc)}")
        return 1


def _reader_gone() -> int:
    """stdout's reader left (`beekeeper dev status | head`): stop quietly, as a command killed by SIGPIPE would.

    stdout is pointed at /dev/null first, or the interpreter's final flush raises again at exit.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
