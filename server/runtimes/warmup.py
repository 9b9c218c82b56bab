"""TF Serving's warm-up records: `<version>/assets.extra/tf_serving_warmup_requests`, a TFRecord file of
`PredictionLog`s shipped inside a SavedModel, replayed before the version becomes available (TF Serving's
`saved_model_warmup.cc`), so that its first real request does not pay for the first calls of its graphs. Unlike
our own warm-up, which makes up zeros, these are real requests: string models are warmed too.

Predict logs run the signature they name with their tensors. Classify and Regress logs (and each task of a
MultiInference log) run the signature they name with their tf.Examples serialized into its one string input, what
a signature exported for them takes. Other logs (streamed predict, session run) are logged and skipped. A record
that cannot be read or run fails the version's load with a message naming the record, as TF Serving's does; the
server and the other versions go on. At most MAX_RECORDS records, as there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from server.base import metrics
from server.runtimes.base import STRING, ModelRuntime

if TYPE_CHECKING:
    from tensorflow_serving.apis import input_pb2, model_pb2

log = logging.getLogger(__name__)

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MAX_RECORDS = 1000  # TF Serving's WarmupConsts::kMaxNumRecords


class WarmupError(ValueError):
    """A warm-up record that cannot be read or run: the version does not load."""


def _records(runtime: ModelRuntime) -> Iterator[bytes]:
    import tensorflow as tf

    path = runtime.path / WARMUP_FILE
    try:
        for count, record in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator(), start=1):
            if count > MAX_RECORDS:
                raise WarmupError(f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {WARMUP_FILE}")
            yield bytes(record)
    except tf.errors.OpError as error:
        raise WarmupError(f"{WARMUP_FILE} is not a TFRecord file of PredictionLogs: {error.message}") from None


def _signature(runtime: ModelRuntime, spec: model_pb2.ModelSpec) -> ModelRuntime:
    try:
        return runtime.signature(spec.signature_name)
    except Exception as error:
        raise WarmupError(str(error)) from None


def _run(runtime: ModelRuntime, inputs: dict[str, np.ndarray]) -> None:
    """One call of a signature with a record's tensors (rows first, as its requests have them)."""
    missing = sorted(set(runtime.inputs) - set(inputs))
    extra = sorted(set(inputs) - set(runtime.inputs))
    if missing or extra:
        raise WarmupError(
            f"signature '{runtime.signature_name}' takes inputs {sorted(runtime.inputs)}, the record has "
            f"{sorted(inputs)}"
        )
    for name, array in inputs.items():
        want = runtime.inputs[name].dtype
        if (array.dtype == STRING) != (want == STRING) or (want != STRING and array.dtype != want):
            raise WarmupError(f"input '{name}' must be {want.name}, the record has {array.dtype.name}")
    runtime.predict(inputs if runtime.batched else runtime.as_one_row(inputs))


def _examples(runtime: ModelRuntime, request_input: input_pb2.Input) -> dict[str, np.ndarray]:
    """A Classify/Regress request's tf.Examples as the one string input of the signature it names."""
    if request_input.WhichOneof("kind") != "example_list":
        raise WarmupError("only example_list inputs are replayed (not example_list_with_context)")
    strings = [name for name, spec in runtime.inputs.items() if spec.dtype == STRING]
    if len(runtime.inputs) != 1 or not strings:
        raise WarmupError(
            f"signature '{runtime.signature_name}' does not take serialized tf.Examples (one string input); its "
            f"inputs: {sorted(runtime.inputs)}"
        )
    serialized = np.empty(len(request_input.example_list.examples), dtype=object)
    serialized[:] = [example.SerializeToString() for example in request_input.example_list.examples]
    return {strings[0]: serialized}


def replay(runtime: ModelRuntime) -> int:
    """Replay the version's warm-up records (blocking, at load, before it is available); returns the calls made.
    Raises WarmupError naming the record that cannot be read or run."""
    if not (runtime.path / WARMUP_FILE).is_file():
        return 0
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    calls = 0
    counter = metrics.WARMUP_REQUESTS.labels(runtime.name)
    for number, record in enumerate(_records(runtime), start=1):
        try:
            entry = prediction_log_pb2.PredictionLog.FromString(record)
            kind = entry.WhichOneof("log_type")
            requests: list[tuple[ModelRuntime, dict[str, np.ndarray]]] = []
            if kind == "predict_log":
                request = entry.predict_log.request
                inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
                requests.append((_signature(runtime, request.model_spec), inputs))
            elif kind in ("classify_log", "regress_log"):
                request = getattr(entry, kind).request
                signature = _signature(runtime, request.model_spec)
                requests.append((signature, _examples(signature, request.input)))
            elif kind == "multi_inference_log":
                request = entry.multi_inference_log.request
                for task in request.tasks:
                    signature = _signature(runtime, task.model_spec)
                    requests.append((signature, _examples(signature, request.input)))
            else:
                log.warning("%s v%d: warm-up record %d is a %s, which is not replayed: skipped", runtime.name,
                            runtime.version, number, kind or "record of no kind")  # fmt: skip
                continue
            for signature, inputs in requests:
                _run(signature, inputs)
                calls += 1
                counter.inc()
        except WarmupError as error:
            raise WarmupError(f"warm-up record {number} of {WARMUP_FILE}: {error}") from None
        except Exception as error:  # a record that does not parse, or a model call that fails on it
            raise WarmupError(f"warm-up record {number} of {WARMUP_FILE}: {type(error).__name__}: {error}") from None
    log.info("%s v%d: replayed %d warm-up request(s) from %s", runtime.name, runtime.version, calls, WARMUP_FILE)
    return calls
