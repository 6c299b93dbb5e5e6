"""Who may read a node daemon's /drops and /metrics: real tokens and certificates, real reviews by the apiserver.

The daemon runs with TLS from the test cluster's CA and accepts client certificates signed by it,
as a kubelet does; tokens are real ServiceAccount tokens from the TokenRequest API.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import READER_RULES, NodeDaemon, service_account_token, token_kubeconfig, wait_for

from beekeeper.devenv.certs import Pki, ensure_serving_cert

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(cluster, node_daemons) -> NodeDaemon:
    pki = Pki(cluster.control_plane.dir / "pki")
    cert, key = ensure_serving_cert(pki, "test-node-daemon", ["127.0.0.1"])
    tls = ("--tls-cert-file", str(cert), "--tls-private-key-file", str(key), "--client-ca-file", str(pki.ca_cert))
    started = node_daemons(backend="fake", args=tls)
    wait_for(lambda: get(started, "/healthz", pki)[0] == 200, 30, "the daemon's TLS port")
    return started


def get(daemon: NodeDaemon, path: str, pki: Pki, token: str | None = None, cert: bool = False):
    """(status, headers, JSON or text body) of an HTTPS request to the daemon."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert:
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"https://127.0.0.1:{daemon.metrics_port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            status, head, body = resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, head, body = exc.code, exc.headers, exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, {}, ""
    return status, head, json.loads(body) if head.get("Content-Type") == "application/json" else body


def test_drops_and_metrics_need_a_caller_the_api_authorizes(cluster, daemon: NodeDaemon) -> None:
    pki = Pki(cluster.control_plane.dir / "pki")
    api = cluster.api()
    nobody = service_account_token(api, "beekeeper-test-nobody")
    scraper = service_account_token(api, "beekeeper-test-scraper", [READER_RULES[0]])  # what Prometheus is granted

    def drops_of(node: str) -> list[dict]:
        return [
            {
                "apiGroups": ["beekeeper.dev"],
                "resources": ["bpfnodestates/drops"],
                "resourceNames": [node],
                "verbs": ["get"],
            }
        ]

    this_node = service_account_token(api, f"drops-{daemon.node}", drops_of(daemon.node))
    other_node = service_account_token(api, f"drops-not-{daemon.node}", drops_of("some-other-node"))

    status, headers, body = get(daemon, "/drops", pki)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), body
    assert get(daemon, "/metrics", pki)[0] == 401
    assert get(daemon, "/drops", pki, token="not-a-token")[0] == 401
    assert get(daemon, "/healthz", pki)[0] == 200, "probes need no credentials"

    status, _, body = get(daemon, "/drops", pki, token=nobody)
    assert status == 403, body
    assert body["error"].startswith("forbidden: user 'system:serviceaccount:default:beekeeper-test-nobody' may not")
    assert f"get bpfnodestates/drops.beekeeper.dev '{daemon.node}'" in body["error"]
    assert get(daemon, "/metrics", pki, token=nobody)[0] == 403

    assert get(daemon, "/metrics", pki, token=scraper)[0] == 200, "Prometheus' usual grant scrapes /metrics"
    assert get(daemon, "/drops", pki, token=scraper)[0] == 403, "... and does not reveal flows"

    status, _, body = get(daemon, "/drops?limit=5", pki, token=this_node)
    assert status == 200 and body["node"] == daemon.node and body["drops"] == [], body
    assert get(daemon, "/drops", pki, token=other_node)[0] == 403, "resourceNames limits drops to some nodes"
    assert get(daemon, "/drops", pki, token=daemon.token)[0] == 200

    status, _, body = get(daemon, "/drops", pki, cert=True)
    assert status == 200 and body["node"] == daemon.node, "a client certificate signed by the cluster CA"
    assert get(daemon, "/metrics", pki, cert=True)[0] == 200


def test_why_dropped_shows_the_kubeconfig_credentials(cluster, daemon: NodeDaemon, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{daemon.metrics_port}"

    def why_dropped(kubeconfig: Path) -> subprocess.CompletedProcess[str]:
        argv = ["why-dropped", "--kubeconfig", str(kubeconfig), "--url", url, "--src", "10.240.9.9"]
        return subprocess.run([sys.executable, "-m", "beekeeper.cli", *argv], capture_output=True, text=True)

    admin = why_dropped(cluster.kubeconfig)  # a client certificate, verified by the daemon against the cluster CA
    assert admin.returncode == 0, admin.stderr
    assert (
        admin.stdout.strip()
        == f"no recorded drops match src=10.240.9.9 ({daemon.node} keeps its last 8192 drop events)"
    )

    reader = why_dropped(token_kubeconfig(cluster.kubeconfig, daemon.token, tmp_path / "reader"))
    assert reader.returncode == 0 and "no recorded drops match" in reader.stdout, reader.stderr

    nobody = service_account_token(cluster.api(), "beekeeper-test-nobody")
    denied = why_dropped(token_kubeconfig(cluster.kubeconfig, nobody, tmp_path / "nobody"))
    assert denied.returncode == 1 and f"{url}: 403 forbidden: user" in denied.stderr, denied.stderr
