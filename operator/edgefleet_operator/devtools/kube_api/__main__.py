"""``python -m edgefleet_operator.devtools.kube_api --port 0 --crds crds/``: the test API server as a process.

Prints ``kube-api ready: http://127.0.0.1:PORT`` once it serves, and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from edgefleet_operator.devtools.kube_api.process import MODULE, READY_PREFIX
from edgefleet_operator.devtools.kube_api.server import KubeApiServer


def main(argv: list[str] | None = None, *, prog: str = f"python -m {MODULE}") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--crds", type=Path, default=None, help="a folder of CRD YAML files to install")
    parser.add_argument("--kopf-peering", action="store_true", help="also install kopf's peering CRDs")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with KubeApiServer(crds_dir=args.crds, kopf_peering=args.kopf_peering, host=args.host, port=args.port) as server:
        print(f"{READY_PREFIX}{server.url}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
