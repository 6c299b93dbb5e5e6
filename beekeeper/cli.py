"""The `beekeeper` command: the two components, and the local developer environment."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from kubernetes.client.rest import ApiException

from beekeeper import logs


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
        case "prepare-host":
            prepare_host(_progress)
        case "kubectl":
            bins = build.ensure_built(_progress)
            argv = args.args[1:] if args.args[:1] == ["--"] else args.args
            os.execve(
                str(bins.kubectl), ["kubectl", *argv], {**os.environ, "KUBECONFIG": str(env.control_plane.kubeconfig)}
            )
    return 0


def _operator(args: argparse.Namespace) -> int:
    from beekeeper.operator.main import run

    run(kubeconfig=args.kubeconfig)
    return 0


def _node_daemon(args: argparse.Namespace) -> int:
    from beekeeper.node_daemon.main import run

    run(
        node_name=args.node_name,
        kubeconfig=args.kubeconfig,
        bpffs_root=args.bpffs_root,
        state_dir=args.state_dir,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="beekeeper", description="Run eBPF programs on Kubernetes, declaratively.")
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
    dev_sub.add_parser("build", help="build and cache kube-apiserver, kube-controller-manager, kubectl and etcd")
    dev_sub.add_parser("prepare-host", help="mount bpffs/tracefs and link kernel headers if absent")
    kubectl = dev_sub.add_parser("kubectl", help="run the pinned kubectl against the dev control plane")
    kubectl.add_argument("args", nargs=argparse.REMAINDER)
    dev.set_defaults(func=_dev)

    op = sub.add_parser("operator", help="run the operator (reconciles CRs into per-node BpfNodeState)")
    op.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube/config or in-cluster")
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
    nd.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port; 0 disables")
    nd.add_argument("--metrics-address", default="0.0.0.0", help="address /metrics listens on")
    nd.set_defaults(func=_node_daemon)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as exc:
        _progress(f"beekeeper: error: {exc}")
        return 1
    except ApiException as exc:
        _progress(
            f"beekeeper: error: the Kubernetes API refused a request ({exc.status} {exc.reason}): {_api_message(exc)}"
        )
        return 1


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.body)


if __name__ == "__main__":
    sys.exit(main())
