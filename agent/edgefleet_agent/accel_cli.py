"""``edgefleet accel-server …``: serve partition stages next to an accelerator (AcceleratorStage API).

A thin edge: options become arguments of :func:`~edgefleet_agent.accel_server.start_accel_server`.
gRPC and ONNX Runtime are imported when the command runs, so ``edgefleet --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Serve the tail stages of partition plans over gRPC, next to an accelerator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """Serve the tail stages of partition plans over gRPC, next to an accelerator."""


@app.command()
def serve(
    models: Annotated[
        Path,
        typer.Option(
            "--models", help="Content-addressed folder of stage models (<sha256>.onnx), shared with the agent."
        ),
    ],
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT (port 0: any free one) or unix:PATH. Meant for loopback.")
    ] = "127.0.0.1:0",
    providers: Annotated[
        str,
        typer.Option("--providers", help="Default ONNX Runtime execution providers, comma-separated, preferred first."),
    ] = "CPUExecutionProvider",
    intra_op_threads: Annotated[
        int, typer.Option("--intra-op-threads", min=1, help="Intra-op threads of each stage's session.")
    ] = 1,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully. Prints ``accel-server listening HOST:PORT`` when ready."""
    import asyncio
    import logging
    import signal

    from edgefleet_agent.accel_server import start_accel_server

    if not models.is_dir():
        typer.echo(f"edgefleet accel-server: {models} is not a folder", err=True)
        raise typer.Exit(2)
    chosen = [p.strip() for p in providers.split(",") if p.strip()]
    if not chosen:
        raise typer.BadParameter("name at least one execution provider", param_hint="--providers")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        try:
            server, port = await start_accel_server(models, listen, providers=chosen, intra_op_threads=intra_op_threads)
        except OSError as exc:
            typer.echo(f"edgefleet accel-server: {exc}", err=True)
            raise typer.Exit(1) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        address = listen if listen.startswith("unix") else f"{listen.rsplit(':', 1)[0]}:{port}"
        print(f"accel-server listening {address}", flush=True)
        await stop.wait()
        # A grace period lets sequences in flight be answered before the streams are cut.
        await server.stop(5.0)

    asyncio.run(main())
