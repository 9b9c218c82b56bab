"""The load tester's HTTP side: requests for the REST protocols, and one call of them over aiohttp's client.

Three protocols, each what its own clients send:
- `rest-oip-json`: the Open Inference Protocol over HTTP (`POST /v2/models/{m}[/versions/{v}]/infer`), tensors as
  JSON `data` (flat, row-major), outputs answered as JSON;
- `rest-oip-binary`: the same with Triton's binary tensor data extension, as tritonclient.http sends it: the JSON
  header (inputs with `binary_data_size`, `binary_data_output` true), then the raw little-endian tensors, with
  `Inference-Header-Content-Length`; outputs answered binary too;
- `rest-tfserving`: TF Serving's REST `:predict` in the row format (`{"instances": [{name: value}, ...]}`).

Random inputs are shaped from the model's own metadata (`/v2/models/{m}` and `.../config` for the OIP, TF Serving's
`/v1/models/{m}/metadata`), so any OIP or TF Serving server can be measured, as with the gRPC protocols. The body
is built once and sent for every call on keep-alive connections of one aiohttp connector, sized to the in-flight
calls. Replies are read whole (so the connection is reused) but not parsed, and are not asked to be compressed.

An answer counts under the gRPC status name its HTTP status stands for (SPEC §13, the names the gRPC protocols
report and the server's metrics use); a connection that fails or closes is UNAVAILABLE, no answer within the
timeout DEADLINE_EXCEEDED. aiohttp is a development dependency: it is imported only when a REST protocol runs.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from clients.oip import random_arrays

if TYPE_CHECKING:
    import yarl

PROTOCOLS = ("rest-oip-json", "rest-oip-binary", "rest-tfserving")

# HTTP status -> the gRPC status name it stands for: the server's own map (SPEC §13: server/http/status.py) and, for
# what a proxy in front may answer, google.rpc's (403, 409, 499, 502).
CODES = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ABORTED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# TF Serving's dtypes (its metadata's "DT_*") as the OIP datatypes random_arrays takes.
_TF_DATATYPES = {
    "DT_FLOAT": "FP32",
    "DT_DOUBLE": "FP64",
    "DT_HALF": "FP16",
    "DT_INT8": "INT8",
    "DT_INT16": "INT16",
    "DT_INT32": "INT32",
    "DT_INT64": "INT64",
    "DT_UINT8": "UINT8",
    "DT_UINT16": "UINT16",
    "DT_UINT32": "UINT32",
    "DT_UINT64": "UINT64",
    "DT_BOOL": "BOOL",
    "DT_STRING": "BYTES",
}


def code_of_status(status: int) -> str:
    """The gRPC status name of an HTTP status; `HTTP_<status>` for one that stands for none."""
    return CODES.get(status, f"HTTP_{status}")


class CallFailed(Exception):
    """A call that did not answer 200, with the status name it counts under."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class SetupError(RuntimeError):
    """The run could not start: the server's metadata could not be read, or aiohttp is missing."""


@dataclass(frozen=True)
class RestRequest:
    """One request, built once and sent for every call: a path below the base URL, its body and headers."""

    path: str
    body: bytes
    headers: Mapping[str, str]


def base_url(target: str, tls: bool) -> str:
    """`http(s)://host:port[/prefix]` from a URL or HOST:PORT (https when TLS is asked for), without a final /."""
    if "://" not in target:
        target = f"{'https' if tls else 'http'}://{target}"
    scheme = target.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"http_target must be an http:// or https:// URL or HOST:PORT, got '{target}'")
    if tls and scheme != "https":
        raise ValueError(f"TLS settings need an https:// http_target, got '{target}'")
    return target.rstrip("/")


def _model_path(prefix: str, model: str, version: int) -> str:
    path = f"{prefix}/models/{quote(model, safe='')}"
    return f"{path}/versions/{version}" if version else path


def _jsonable(array: np.ndarray) -> Any:
    """Nested lists of the array's values; BYTES elements as text."""
    if array.dtype == np.dtype(object):
        return np.vectorize(lambda value: value.decode(errors="replace"), otypes=[object])(array).tolist()
    return array.tolist()


# -- the Open Inference Protocol over HTTP ----------------------------------------------------------------------------


def oip_arrays(
    model: str, metadata: Mapping[str, Any], config: Mapping[str, Any] | None, rows: int, seed: int
) -> dict[str, np.ndarray]:
    """Random inputs from the documents of `GET /v2/models/{m}` and `.../config` (max_batch_size 0: unbatched). A
    server without the config endpoint (KServe's, MLServer's): batched when every input's first dimension is -1."""
    try:
        inputs = [(spec["name"], spec["datatype"], [int(d) for d in spec["shape"]]) for spec in metadata["inputs"]]
        if config is None:
            batched = all(shape[:1] == [-1] for _, _, shape in inputs)
        else:
            batched = int(config.get("max_batch_size", 0)) > 0
    except (KeyError, TypeError, ValueError) as error:
        raise SetupError(f"model '{model}': unexpected metadata or config document ({error!r})") from None
    return random_arrays(model, inputs, batched, rows, seed)


def oip_request(model: str, version: int, arrays: Mapping[str, np.ndarray], binary: bool) -> RestRequest:
    """An infer request: every input as JSON `data`, or (`binary`) as binary data after the JSON header, with every
    output asked for in binary, as tritonclient.http does by default."""
    path = _model_path("/v2", model, version) + "/infer"
    inputs: list[dict[str, Any]] = []
    parts: list[bytes] = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == np.dtype(object) else _oip_datatype(array)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            if datatype == "BYTES":
                raw = serialize_byte_tensor(array).item()
            else:
                raw = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            tensor["data"] = _jsonable(array.ravel())
        inputs.append(tensor)
    document: dict[str, Any] = {"inputs": inputs}
    if not binary:
        return RestRequest(path, json.dumps(document).encode(), {"Content-Type": "application/json"})
    document["parameters"] = {"binary_data_output": True}
    header = json.dumps(document).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return RestRequest(path, b"".join([header, *parts]), headers)


def _oip_datatype(array: np.ndarray) -> str:
    return str(np_to_triton_dtype(array.dtype))


# -- TF Serving's REST API --------------------------------------------------------------------------------------------


def tfserving_arrays(
    model: str, metadata: Mapping[str, Any], rows: int, seed: int
) -> tuple[str, dict[str, np.ndarray]]:
    """(signature name, random inputs) from the document of `GET /v1/models/{m}/metadata`: the signature
    `serving_default`, or the only one; its inputs' first dimension is the batch."""
    try:
        signatures = metadata["metadata"]["signature_def"]["signature_def"]
        if "serving_default" in signatures or len(signatures) != 1:
            name = "serving_default"
            if name not in signatures:
                raise SetupError(f"model '{model}' has signatures {sorted(signatures)} and none is 'serving_default'")
        else:
            name = next(iter(signatures))
        inputs = []
        for input_name, spec in sorted(signatures[name]["inputs"].items()):
            datatype = _TF_DATATYPES.get(spec["dtype"])
            if datatype is None:
                raise SetupError(f"model '{model}' input '{input_name}' has dtype {spec['dtype']}, not one sent here")
            inputs.append((input_name, datatype, [int(d["size"]) for d in spec["tensor_shape"]["dim"]]))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SetupError(f"model '{model}': unexpected TF Serving metadata document ({error!r})") from None
    return name, random_arrays(model, inputs, True, rows, seed)


def tfserving_request(model: str, version: int, signature: str, arrays: Mapping[str, np.ndarray]) -> RestRequest:
    """A `:predict` request in the row format: one instance per row, each naming every input."""
    columns = {name: _jsonable(array) for name, array in arrays.items()}
    rows = len(next(iter(columns.values()))) if columns else 0
    instances = [{name: column[i] for name, column in columns.items()} for i in range(rows)]
    document: dict[str, Any] = {"instances": instances}
    if signature != "serving_default":
        document["signature_name"] = signature
    path = _model_path("/v1", model, version) + ":predict"
    return RestRequest(path, json.dumps(document).encode(), {"Content-Type": "application/json"})


# -- the client -------------------------------------------------------------------------------------------------------


def ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """TLS with `ca_file` (else the system's roots), and a client certificate for mutual TLS."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise ValueError("mutual TLS needs both tls_cert_file and tls_key_file")
        context.load_cert_chain(cert_file, key_file)
    return context


class RestClient:
    """One aiohttp session to one base URL: `connections` keep-alive connections at most (the in-flight calls),
    the bearer token on every request. Awaitable like a gRPC stub method: `await client(request, timeout=...)`
    returns on 200 and raises CallFailed with the status name otherwise."""

    def __init__(
        self, base: str, connections: int, timeout: float, tls: ssl.SSLContext | None = None, token: str | None = None
    ) -> None:
        try:
            import aiohttp
            import yarl  # aiohttp's own dependency
        except ImportError:
            raise SetupError(
                "the rest-* protocols need aiohttp: install the development dependencies (pip install -e '.[dev]')"
            ) from None
        self._parse = yarl.URL
        self._client_error = aiohttp.ClientError
        self._timeout_type = aiohttp.ClientTimeout
        self.base = base
        self._timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, ssl=tls or True)
        self._session: aiohttp.ClientSession = aiohttp.ClientSession(
            connector=connector,
            headers={"Authorization": f"Bearer {token}"} if token else None,
            # Replies come as the server writes them: a load test measures the protocol, not gzip.
            skip_auto_headers=("Accept-Encoding",),
            auto_decompress=False,
        )
        self._urls: dict[str, yarl.URL] = {}

    def url(self, path: str) -> yarl.URL:
        """The parsed URL of a path, parsed once (not for every call)."""
        found = self._urls.get(path)
        if found is None:
            found = self._urls[path] = self._parse(self.base + path)
        return found

    async def get_json(self, path: str, missing_ok: bool = False) -> Any:
        """A GET's JSON document; None for a 404 when `missing_ok`; SetupError with the server's answer when there is
        none."""
        url = self.base + path
        try:
            async with self._session.get(self.url(path), timeout=self._client_timeout) as reply:
                body = await reply.read()
                status = reply.status
        except TimeoutError:
            raise SetupError(f"GET {url}: no answer within {self._timeout:g} s") from None
        except self._client_error as error:
            raise SetupError(f"GET {url}: {type(error).__name__}: {error}") from None
        if status == 404 and missing_ok:
            return None
        if status != 200:
            answer = body[:500].decode(errors="replace")
            raise SetupError(f"GET {url} answered {status} {code_of_status(status)}: {answer}")
        try:
            return json.loads(body)
        except ValueError:
            raise SetupError(f"GET {url} answered 200 without a JSON document: {body[:200]!r}") from None

    async def __call__(self, request: RestRequest, timeout: float) -> None:
        client_timeout = self._client_timeout
        if timeout != self._timeout:
            client_timeout = self._timeout_type(total=timeout)
        try:
            async with self._session.post(
                self.url(request.path), data=request.body, headers=request.headers, timeout=client_timeout
            ) as reply:
                await reply.read()
                status = reply.status
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            raise CallFailed("DEADLINE_EXCEEDED") from None
        except self._client_error:
            raise CallFailed("UNAVAILABLE") from None
        if status != 200:
            raise CallFailed(code_of_status(status))

    async def close(self) -> None:
        await self._session.close()


async def build_request(
    client: RestClient, protocol: str, model: str, version: int, rows: int, seed: int
) -> RestRequest:
    """The one request of a run, shaped from the model's metadata as the protocol's server describes it."""
    if protocol == "rest-tfserving":
        metadata = await client.get_json(_model_path("/v1", model, version) + "/metadata")
        signature, arrays = tfserving_arrays(model, metadata, rows, seed)
        return tfserving_request(model, version, signature, arrays)
    if protocol not in PROTOCOLS:
        raise ValueError(f"not a REST protocol: {protocol}")
    path = _model_path("/v2", model, version)
    metadata, config = await client.get_json(path), await client.get_json(path + "/config", missing_ok=True)
    # Triton's HTTP API answers the config itself; KServe's ModelConfigResponse form has it under "config".
    if isinstance(config, dict) and isinstance(config.get("config"), dict):
        config = config["config"]
    return oip_request(model, version, oip_arrays(model, metadata, config, rows, seed), protocol == "rest-oip-binary")
