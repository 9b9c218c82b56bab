"""The transport ceiling: a bare gRPC echo of modelserver.v1.ModelService on the same grpc.aio stack.

It answers PredictMultiInput / PredictSharedLayer / PredictResidualCnn with a prebuilt response of the
right size for the request's row count, without touching numpy or a model: what our server could reach if
inference, batching and validation cost nothing. `--sync` serves the same handlers on gRPC's synchronous server
instead (C-core threads doing HTTP/2, each call's Python on a thread pool of `--sync-threads`): the other transport
grpcio offers, measured beside the aio one (issue 25).

Usage: python -m bench.echo_server [--sync [--sync-threads N]] [PORT] (0 or none: a free port; the first line it
prints names the port bound)
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc

from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from server.grpc.rpc import GenericOnly

OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)]


def multi_input(request):
    return pb.PredictMultiInputResponse(output=[0.5] * (len(request.input_a) // 10), version=1)


def shared_layer(request):
    rows = len(request.input_a) // 10
    return pb.PredictSharedLayerResponse(output_a=[0.5] * rows, output_b=[0.5] * rows, version=1)


def residual_cnn(request):
    rows = len(request.image) // 784
    return pb.PredictResidualCnnResponse(probabilities=[0.1] * (10 * rows), predicted_class=[0] * rows, version=1)


class EchoService(pb_grpc.ModelServiceServicer):
    async def PredictMultiInput(self, request, context):
        return multi_input(request)

    async def PredictSharedLayer(self, request, context):
        return shared_layer(request)

    async def PredictResidualCnn(self, request, context):
        return residual_cnn(request)


class SyncEchoService(pb_grpc.ModelServiceServicer):
    def PredictMultiInput(self, request, context):
        return multi_input(request)

    def PredictSharedLayer(self, request, context):
        return shared_layer(request)

    def PredictResidualCnn(self, request, context):
        return residual_cnn(request)


async def serve_aio(port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    # As our server adds its services (server/grpc/rpc.py, GenericOnly): a generic handler, no registered methods,
    # so that the ceiling does not pay a cost our server has removed.
    pb_grpc.add_ModelServiceServicer_to_server(EchoService(), GenericOnly(server).as_server())
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def serve_sync(port: int, threads: int) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=OPTIONS)
    pb_grpc.add_ModelServiceServicer_to_server(SyncEchoService(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"echo-sync listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--sync", action="store_true", help="gRPC's synchronous server instead of grpc.aio")
    parser.add_argument("--sync-threads", type=int, default=16, help="the synchronous server's thread pool")
    args = parser.parse_args()
    if args.sync:
        serve_sync(args.port, args.sync_threads)
    else:
        asyncio.run(serve_aio(args.port))
