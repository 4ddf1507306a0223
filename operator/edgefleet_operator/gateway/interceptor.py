"""The one place where the gateway's errors become gRPC status codes (and where calls are timed).

Wraps each method handler once: it refuses calls without a verified client certificate (all but
Enroll and the health checks), maps :class:`GatewayError` subclasses and store outages to their
codes, and turns anything unexpected into INTERNAL with a generic message, logging the traceback
here so nothing internal reaches a device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from grpc import aio

from edgefleet_core.errors import StoreUnavailable
from edgefleet_operator.gateway.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from edgefleet_operator.gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)

STATUS_CODES: Final[dict[type[Exception], grpc.StatusCode]] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}
"""Our errors and the codes fleet.proto's header assigns them."""

ANONYMOUS_METHODS: Final = frozenset({"/edgefleet.v1.FleetGateway/Enroll", "/grpc.health.v1.Health/Check",
                                      "/grpc.health.v1.Health/Watch"})  # fmt: skip
"""Methods callable without a client certificate (the enrollment port never asks for one). Renew is
not one of them: a device renews with its current certificate, over the fleet port."""
PEER_CERTIFICATE: Final = "x509_pem_cert"
"""The auth-context key under which gRPC puts the verified peer certificate (PEM)."""

_Behavior = Callable[..., Any]
"""A method's implementation: ``(request, context)`` to a response, an awaitable or an async iterator."""


def status_of(error: Exception) -> grpc.StatusCode | None:
    """The code for one of our errors, ``None`` for anything else."""
    for kind in type(error).__mro__:
        code = STATUS_CODES.get(kind)
        if code is not None:
            return code
    return None


def has_client_certificate(context: aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call came with a client certificate the TLS handshake verified."""
    return bool(context.auth_context().get(PEER_CERTIFICATE))


class GatewayInterceptor(aio.ServerInterceptor):
    """Error mapping, the certificate gate and RPC latency for every method of the server."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}  # wrapped once per method

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self._wrap(method, handler)
        self._handlers[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        short = method.rsplit("/", 1)[-1]
        anonymous = method in ANONYMOUS_METHODS
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(short, anonymous, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(short, anonymous, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming methods: none of ours; served as they are

    def _unary(self, method: str, anonymous: bool, behavior: _Behavior) -> _Behavior:
        async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not anonymous and not has_client_certificate(context):
                    raise Unauthenticated(_NO_CERTIFICATE)
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except aio.AbortError:
                code = grpc.StatusCode.UNKNOWN  # aborted by a handler itself; ours never do
                raise
            except Exception as e:  # noqa: BLE001 - the edge: everything becomes a status code here
                code, message = _status(method, e)
                await context.abort(code, message)
            finally:
                self._metrics.rpc_latency.labels(method, code.name).observe(time.perf_counter() - started)

        return call

    def _stream(self, method: str, anonymous: bool, behavior: _Behavior) -> _Behavior:
        async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not anonymous and not has_client_certificate(context):
                    raise Unauthenticated(_NO_CERTIFICATE)
                async for response in behavior(request, context):
                    yield response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except aio.AbortError:
                code = grpc.StatusCode.UNKNOWN  # aborted by a handler itself; ours never do
                raise
            except Exception as e:  # noqa: BLE001 - the edge: everything becomes a status code here
                code, message = _status(method, e)
                await context.abort(code, message)
            finally:
                self._metrics.rpc_latency.labels(method, code.name).observe(time.perf_counter() - started)

        return call


_NO_CERTIFICATE = "this call needs the client certificate Enroll issued, on the gateway's fleet (mTLS) port"


def _status(method: str, error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message to end a call with; unexpected errors are logged, never shown."""
    code = status_of(error)
    if code is None:
        logger.error("%s failed unexpectedly", method, exc_info=error)
        return grpc.StatusCode.INTERNAL, "internal error in the gateway; it has been logged"
    return code, str(error)
