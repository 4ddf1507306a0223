"""The baseline the gateway's health figures are judged against: a gRPC server that does nothing.

Same machine, same core, same mTLS credentials, same load generator as the real gateway; its
ReportHealth returns an empty acknowledgement at once. What it sustains is the ceiling gRPC Python
itself sets here, so the gateway's figures can be read as a ratio to it, in the same run.
"""

from __future__ import annotations

import asyncio
import os
from multiprocessing.connection import Connection
from pathlib import Path

import grpc

from edgefleet_proto.v1 import fleet_pb2

SERVICE = "edgefleet.v1.FleetGateway"


async def _acknowledge(request: fleet_pb2.HealthReport, context: object) -> fleet_pb2.HealthAck:
    return fleet_pb2.HealthAck()


def noop_handler() -> grpc.GenericRpcHandler:
    """ReportHealth of the real service and message types, doing nothing; other methods are unimplemented."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ReportHealth": grpc.unary_unary_rpc_method_handler(
                _acknowledge,
                request_deserializer=fleet_pb2.HealthReport.FromString,
                response_serializer=fleet_pb2.HealthAck.SerializeToString,
            )
        },
    )


async def _serve(pki_dir: Path, conn: Connection) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((noop_handler(),))
    credentials = grpc.ssl_server_credentials(
        [((pki_dir / "server-key.pem").read_bytes(), (pki_dir / "server.pem").read_bytes())],
        root_certificates=(pki_dir / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    conn.send(f"127.0.0.1:{port}")
    await asyncio.to_thread(conn.recv)  # any message means stop
    await server.stop(0)


def serve(pki_dir: Path, cpus: frozenset[int] | None, conn: Connection) -> None:
    """Process entry point: pinned like the gateway, serves until the parent sends anything."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    asyncio.run(_serve(pki_dir, conn))
