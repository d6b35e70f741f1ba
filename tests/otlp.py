"""Real OTLP receivers for the tests: HTTP (protobuf) and gRPC, decoding with opentelemetry-proto.

They collect every span they are sent as plain dicts, so tests assert on what actually
crossed the wire, not on the SDK's in-process objects.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict[str, Any]]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append({
                    "name": span.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "kind": span.kind,
                    "status_code": span.status.code,
                    "start": span.start_time_unix_nano,
                    "end": span.end_time_unix_nano,
                    "attributes": {a.key: _value(a.value) for a in span.attributes},
                    "events": len(span.events),
                    "resource": resource,
                })
    return spans


class Receiver:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.port = 0
        self._arrived = asyncio.Event()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        self.spans.extend(decode(request))
        self._arrived.set()

    async def wait_for(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        """The spans received once there are `count` of them (or `within` seconds passed)."""
        try:
            async with asyncio.timeout(within):
                while len(self.spans) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            pass
        return self.spans


class HTTPReceiver(Receiver):
    async def __aenter__(self) -> HTTPReceiver:
        async def traces(request: web.Request) -> web.Response:
            self.add(trace_service_pb2.ExportTraceServiceRequest.FromString(
                await request.read()))
            return web.Response(
                body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


class GRPCReceiver(Receiver, trace_service_pb2_grpc.TraceServiceServicer):
    # Export is the gRPC method's name, as the service definition spells it.
    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def __aenter__(self) -> GRPCReceiver:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(0)
