"""What every runtime shares: a loaded model version called through one signature, its specs, whether it has a
batch dimension, and a blocking predict call on the chosen device. How a version is opened is each runtime's
own (server/runtimes/savedmodel.py, server/runtimes/keras.py).

A version with several signatures (a SavedModel exported with `predict_images` and `classify_images`, say) is one
runtime per signature: the version's runtime is its default signature, and `signatures` holds it and one sibling
(`SignatureRuntime`) per other signature, sharing the loaded model. Each has its own specs, batch dimension, probe
and warm-up, so the core validates, batches and counts each signature on its own; a request for the default
signature never looks at the others."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from server.base.errors import MAX_ECHOED_CHARS, InvalidInputError, SignatureNotFoundError, quoted
from server.base.tensors import TensorSpec

log = logging.getLogger(__name__)

# Rows of the load-time probe that checks that a model's outputs follow its input rows (2, not 1: an output
# that keeps one row whatever the input, a reduction over the rows, looks batched at 1 row).
PROBE_ROWS = 2
STRING = np.dtype(object)
DEFAULT_SIGNATURE = "serving_default"  # what a request that names no signature gets, as in TF Serving


def _dims(tf_spec: object) -> tuple[int | None, ...] | None:
    """A signature tensor's static shape (None = any size), or None when even its rank is unknown."""
    shape = tf_spec.shape  # type: ignore[attr-defined]
    return None if shape.rank is None else tuple(shape.as_list())


def _spec(name: str, tf_spec: object, batched: bool) -> TensorSpec:
    """The shape without the rows dimension for a batched model; the whole shape for an unbatched one."""
    dims = _dims(tf_spec)
    if dims is None:
        raise ValueError(f"the signature gives '{name}' a shape of unknown rank; serving needs every tensor's rank")
    return TensorSpec(name=name, dtype=np.dtype(tf_spec.dtype.as_numpy_dtype), shape=dims[1:] if batched else dims)  # type: ignore[attr-defined]


def _static_batch_dimension(inputs: Mapping[str, object], outputs: Mapping[str, object]) -> str:
    """Why the signature's static shapes rule out a batch dimension ("" when they allow one): an input or output
    whose first dimension has a fixed size, or a scalar, cannot carry any number of rows."""
    if not inputs:
        return "it takes no inputs"
    for kind, specs in (("input", inputs), ("output", outputs)):
        for name, tf_spec in sorted(specs.items()):
            dims = _dims(tf_spec)
            if dims == ():
                return f"{kind} '{name}' is a scalar"
            if dims is not None and dims[0] is not None:
                return f"{kind} '{name}' has the fixed shape {list(dims)}"
    return ""


def shown(name: str) -> str:
    """A caller-supplied name as TF Serving's messages show it (unquoted), cut like every echoed string."""
    return name if len(name) <= MAX_ECHOED_CHARS else f"{name[:MAX_ECHOED_CHARS]}..."


def load_failure(name: str, version: int, path: Path, error: BaseException) -> str:
    """The message callers see for a model that failed to load: what failed and why, with the server's paths
    replaced by the version's place in the repository (`<repository>/<name>/<version>`); the log keeps them."""
    text = str(error)
    repository = path.parent.parent
    for folder, shown in ((path, f"<repository>/{name}/{version}"), (repository, "<repository>")):
        for spelling in sorted({str(folder), str(folder.resolve())}, key=len, reverse=True):
            text = text.replace(spelling, shown)
    return f"cannot load model '{name}' version {version}: {text}"


class ModelRuntime:
    """One version of one model, called through one signature (a subclass opens it: `_open`).

    A model is batched when the first dimension of its inputs is the rows of a request: of any size in the
    signature, and followed by every output (static shapes, then one call of PROBE_ROWS rows at load). Its specs
    in `inputs`/`outputs` leave that dimension out. Any other model is unbatched (Triton's max_batch_size 0; an
    input of shape [3, 224, 224], say): its specs hold the whole shapes, each request is one call of the model,
    and `predict` takes and returns arrays with a leading axis of one row, the form in which the core validates
    and runs every request (see `as_one_row`).

    Calls block (TensorFlow releases the GIL while it computes); the caller runs them off the event loop.
    """

    platform = ""  # what metadata calls the format: each runtime's own

    def __init__(
        self, name: str, version: int, path: Path, device: str, signature_name: str = DEFAULT_SIGNATURE
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.device = device
        self.signature_name = signature_name
        self.key = (name, version, signature_name)  # the batcher's queue: one per signature of a version
        # Every signature of the version by key (this one included), and those that cannot be served, with why.
        self.signatures: dict[str, ModelRuntime] = {signature_name: self}
        self.unservable: dict[str, str] = {}
        # The SavedModel's own SignatureDefMap (serialized), which TF Serving's GetModelMetadata answers as it is;
        # empty when the format has none (a .keras file): then metadata is built from the specs.
        self.signature_defs = b""
        # Called with the model's name before every model call once set (after warm-up): the tests' hold point.
        self.before_call: Callable[[str], None] | None = None
        self._cold = False  # warm-up was skipped (and logged)
        signature, input_specs, output_specs = self._open()
        self._signature = signature
        self.unbatched_reason = _static_batch_dimension(input_specs, output_specs)
        self.batched = not self.unbatched_reason
        self._set_specs(input_specs, output_specs)
        if self.batched and self._can_make_inputs():
            self._probe_rows(input_specs, output_specs)
        if not self.batched:
            log.info("%s v%d has no batch dimension (%s): served unbatched", name, version, self.unbatched_reason)
        for key, function in sorted(self._other_signatures().items()):
            try:
                self.signatures[key] = SignatureRuntime(self, key, function)
            except Exception as error:  # one odd signature does not cost the version its others
                self.unservable[key] = str(error)
                log.warning("%s v%d: signature '%s' is not served: %s", name, version, key, error)

    def _other_signatures(self) -> Mapping[str, Callable[..., Mapping[str, Any]]]:
        """The version's signatures other than the default one, by key (none unless the format has several)."""
        return {}

    def signature(self, key: str) -> ModelRuntime:
        """The runtime of one signature ("" = the default); raises SignatureNotFoundError naming those that exist."""
        if not key or key == self.signature_name:
            return self
        found = self.signatures.get(key)
        if found is not None:
            return found
        why = self.unservable.get(key)
        names = ", ".join(f"'{k}'" for k in sorted(self.signatures))
        detail = f"it is not served: {why}" if why else f"model '{self.name}' has no signature {quoted(key)}"
        raise SignatureNotFoundError(
            f'Serving signature key "{shown(key)}" not found: {detail}; its signatures: {names}'
        )

    def _open(self) -> tuple[Callable[..., Mapping[str, Any]], Mapping[str, object], Mapping[str, object]]:
        """Load the version from `self.path` onto `self.device` (blocking): the signature to call with named
        tensors, and the TensorSpecs of its inputs and outputs."""
        raise NotImplementedError

    def _set_specs(self, input_specs: Mapping[str, object], output_specs: Mapping[str, object]) -> None:
        self.inputs: dict[str, TensorSpec] = {n: _spec(n, s, self.batched) for n, s in sorted(input_specs.items())}
        self.outputs: dict[str, TensorSpec] = {n: _spec(n, s, self.batched) for n, s in sorted(output_specs.items())}

    def _probe_rows(self, input_specs: Mapping[str, object], output_specs: Mapping[str, object]) -> None:
        """Static shapes allow rows; check that the outputs really follow them, with one call of PROBE_ROWS rows."""
        outputs = self._call(self._zeros(PROBE_ROWS))
        for name, value in sorted(outputs.items()):
            if value.ndim == 0 or value.shape[0] != PROBE_ROWS:
                self.unbatched_reason = (
                    f"output '{name}' has shape {list(value.shape)} for {PROBE_ROWS} input rows, not one row per row"
                )
                self.batched = False
                self._set_specs(input_specs, output_specs)
                return

    def _can_make_inputs(self) -> bool:
        """Whether a warm-up can make up inputs: numbers of known sizes. No made-up string suits every model
        (b"" and "0" both break some), so string inputs are never warmed up."""
        return all(s.dtype != STRING and s.values_per_row is not None for s in self.inputs.values())

    def _zeros(self, rows: int) -> dict[str, np.ndarray]:
        """Inputs of `rows` rows, rows first (for an unbatched model: 1, the form `predict` takes)."""
        zeros: dict[str, np.ndarray] = {}
        for name, spec in self.inputs.items():
            shape = spec.fixed_shape
            if shape is None:  # callers check _can_make_inputs() first
                raise ValueError(f"model '{self.name}' input '{name}' has dimensions of unknown size")
            zeros[name] = np.zeros((rows, *shape), dtype=spec.dtype)
        return zeros

    def _call(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        if self.before_call is not None:
            self.before_call(self.name)
        with tf.device(self.device):
            outputs = self._signature(**{name: tf.constant(value) for name, value in inputs.items()})
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    def as_one_row(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An unbatched model's request (whole shapes) as the one row the core validates and runs; an input of
        another shape is refused here, in the model's own terms (names are the core's to check)."""
        for name, array in inputs.items():
            spec = self.inputs.get(name)
            if spec is None:
                continue
            dims = zip(spec.shape, array.shape, strict=False)
            if array.ndim != len(spec.shape) or any(w is not None and w != g for w, g in dims):
                want = ", ".join("?" if d is None else str(d) for d in spec.shape)
                raise InvalidInputError(
                    f"model '{self.name}' input '{name}' must be {spec.dtype.name} of shape [{want}], got shape "
                    f"{list(array.shape)}: the model has no batch dimension, so one request is one input of exactly "
                    "that shape (max_batch_size 0)"
                )
        return {name: array[np.newaxis] for name, array in inputs.items()}

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature on validated inputs; returns one array per output, rows first (one row for an
        unbatched model, whose call gets the inputs without that row axis)."""
        if self.batched:
            return self._call(inputs)
        outputs = self._call({name: value[0] for name, value in inputs.items()})
        return {name: value[np.newaxis] for name, value in outputs.items()}

    def warm_up(self, rows: int = 1) -> None:
        """Call the model once so the first real request does not pay for tracing and allocation."""
        if not self._can_make_inputs():
            if self._cold:
                return  # said once, not once per batch size
            self._cold = True
            log.info(
                "%s v%d: not warmed up: no made-up value suits its string inputs or inputs of variable size (%s); "
                "the first request pays for the first call",
                self.name,
                self.version,
                ", ".join(
                    f"{n}: {'string' if s.dtype == STRING else s.dtype.name} {list(s.shape)}"
                    for n, s in self.inputs.items()
                ),
            )
            return
        self.predict(self._zeros(rows if self.batched else 1))


class SignatureRuntime(ModelRuntime):
    """A signature other than the default one of a loaded version: the same model, called through another function."""

    def __init__(self, default: ModelRuntime, key: str, function: Callable[..., Mapping[str, Any]]) -> None:
        self._function = function
        self._default = default
        self.platform = default.platform
        super().__init__(default.name, default.version, default.path, default.device, key)
        # One map of signatures per version, shared by them all; so is the SavedModel's SignatureDefMap.
        self.signatures, self.unservable, self.signature_defs = (
            default.signatures,
            default.unservable,
            default.signature_defs,
        )

    def signature(self, key: str) -> ModelRuntime:
        return self._default.signature(key)  # "" is the version's default signature, whichever asks

    def _open(self) -> tuple[Callable[..., Mapping[str, Any]], Mapping[str, object], Mapping[str, object]]:
        _, input_specs = self._function.structured_input_signature  # type: ignore[attr-defined]
        return self._function, input_specs, self._function.structured_outputs  # type: ignore[attr-defined]

    def _call(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.before_call = self._default.before_call  # the tests' hold point is the version's, whatever the signature
        return super()._call(inputs)
