"""The transport ceiling: a bare gRPC echo of modelserver.v1.ModelService on the same grpc.aio stack.

It answers PredictMultiInput / PredictSharedLayer / PredictResidualCnn with a prebuilt response of the
right size for the request's row count, without touching numpy or a model: what our server could reach if
inference, batching and validation cost nothing. Usage: python -m bench.echo_server [PORT] (0 or none: a free
port; the first line it prints names the port bound)
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc


class EchoService(pb_grpc.ModelServiceServicer):
    async def PredictMultiInput(self, request, context):
        return pb.PredictMultiInputResponse(output=[0.5] * (len(request.input_a) // 10), version=1)

    async def PredictSharedLayer(self, request, context):
        rows = len(request.input_a) // 10
        return pb.PredictSharedLayerResponse(output_a=[0.5] * rows, output_b=[0.5] * rows, version=1)

    async def PredictResidualCnn(self, request, context):
        rows = len(request.image) // 784
        return pb.PredictResidualCnnResponse(probabilities=[0.1] * (10 * rows), predicted_class=[0] * rows, version=1)


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)])
    pb_grpc.add_ModelServiceServicer_to_server(EchoService(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
