"""The plain per-request reference: what a user writes without a serving framework. A synchronous gRPC server
(grpc.server with a thread pool) of modelserver.v1.ModelService that loads each model's SavedModel and, for every
request, turns its floats into numpy, calls the same loaded `serving_default` signature our server calls, and
answers. No batching, no queue, no validation beyond what TensorFlow does.

Usage: python -m bench.plain_server REPOSITORY [PORT]  (0 or none: a free port; the first line it prints names the
port bound)
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from modelserver.v1 import modelserver_pb2 as pb  # noqa: E402
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc  # noqa: E402


def _floats(field, width: int) -> tf.Tensor:
    return tf.constant(np.fromiter(field, dtype=np.float32, count=len(field)).reshape(-1, width))


class PlainService(pb_grpc.ModelServiceServicer):
    def __init__(self, repository: Path) -> None:
        self.signatures = {
            name: tf.saved_model.load(str(repository / name / "1")).signatures["serving_default"]
            for name in ("multi_input", "shared_layer", "residual_cnn")
        }

    def PredictMultiInput(self, request, context):
        out = self.signatures["multi_input"](input_a=_floats(request.input_a, 10), input_b=_floats(request.input_b, 20))
        return pb.PredictMultiInputResponse(output=out["output"].numpy().ravel().tolist(), version=1)

    def PredictSharedLayer(self, request, context):
        out = self.signatures["shared_layer"](
            input_a=_floats(request.input_a, 10), input_b=_floats(request.input_b, 20)
        )
        return pb.PredictSharedLayerResponse(
            output_a=out["output_a"].numpy().ravel().tolist(),
            output_b=out["output_b"].numpy().ravel().tolist(),
            version=1,
        )

    def PredictResidualCnn(self, request, context):
        image = tf.reshape(_floats(request.image, 784), (-1, 28, 28, 1))
        probabilities = self.signatures["residual_cnn"](image=image)["probabilities"].numpy()
        return pb.PredictResidualCnnResponse(
            probabilities=probabilities.ravel().tolist(),
            predicted_class=np.argmax(probabilities, axis=1).tolist(),
            version=1,
        )


def main(repository: Path, port: int) -> None:
    server = grpc.server(ThreadPoolExecutor(16), options=[("grpc.max_receive_message_length", 16 << 20)])
    pb_grpc.add_ModelServiceServicer_to_server(PlainService(repository), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"plain listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
