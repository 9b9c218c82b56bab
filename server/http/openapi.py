"""The OpenAPI 3 description of every HTTP endpoint we serve (`GET /openapi.json`): the Open Inference Protocol's
as KServe publishes it for v2 (trimmed to what we serve), TF Serving's REST API (which has none of its own), and
the port's own documents. tests/unit/test_http_api.py checks that every route is described and every path here
is routed."""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _params(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.replace(":", "/").split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


_ERRORS = {
    "400": _json(_ref("Error"), "Bad request: the message says what to fix"),
    "401": _json(_ref("Error"), "Missing or invalid bearer token (--auth-token-file)"),
    "404": _json(_ref("Error"), "Unknown model, version or label"),
    "413": _json(_ref("Error"), "Body larger than --max-receive-message-bytes"),
    "429": _json(_ref("Error"), "Overloaded: retry after the Retry-After header's seconds"),
    "503": _json(_ref("Error"), "Starting or shutting down"),
}


def _operation(summary: str, path: str, ok: dict[str, Any], body: dict[str, Any] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "parameters": _params(path), "responses": {"200": ok, **_ERRORS}}
    if body is not None:
        operation["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
    return operation


def _model_paths(prefix: str, variants: tuple[str, ...]) -> list[str]:
    return [prefix + variant for variant in variants]


_OIP_MODEL = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
_TFS_MODEL = ("/v1/models/{model}", "/v1/models/{model}/versions/{version}", "/v1/models/{model}/labels/{label}")


def document(server_version: str = "") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}

    def add(path: str, method: str, operation: dict[str, Any]) -> None:
        paths.setdefault(path, {})[method] = operation

    health = {"description": "True (for false: 400, no body)"}
    add("/v2/health/live", "get", {"summary": "Server live (no token needed)", "responses": {"200": health}})
    add("/v2/health/ready", "get", {"summary": "Server ready (no token needed)", "responses": {"200": health}})
    add("/v2", "get", _operation("Server metadata", "/v2", _json(_ref("ServerMetadata"))))
    add("/v2/models/stats", "get", _operation("Statistics of every model", "", _json(_ref("Statistics"))))
    for model in _OIP_MODEL:
        add(model, "get", _operation("Model metadata", model, _json(_ref("ModelMetadata"))))
        add(model + "/ready", "get", {"summary": "Model ready", "parameters": _params(model),
                                      "responses": {"200": health}})  # fmt: skip
        add(model + "/config", "get", _operation("Model configuration (Triton's ModelConfig)", model,
                                                 _json({"type": "object"})))  # fmt: skip
        add(model + "/stats", "get", _operation("Model statistics", model, _json(_ref("Statistics"))))
        infer = _operation("Inference (JSON, or Triton's binary tensor data extension)", model + "/infer",
                           _json(_ref("InferResponse")), _ref("InferRequest"))  # fmt: skip
        infer["parameters"].append(
            {
                "name": "Inference-Header-Content-Length",
                "in": "header",
                "required": False,
                "description": "Binary tensor data extension: the bytes of JSON that start the body; the inputs' "
                "binary data follows, in order, each input saying its binary_data_size",
                "schema": {"type": "integer"},
            }
        )
        add(model + "/infer", "post", infer)
    add("/v2/repository/index", "post", _operation("Repository index", "", _json({"type": "array", "items": _ref(
        "RepositoryModel")}), {"type": "object", "properties": {"ready": {"type": "boolean"}}}))  # fmt: skip
    for action in ("load", "unload"):
        path = f"/v2/repository/models/{{model}}/{action}"
        summary = f"Repository {action} (--repository-control true)"
        add(path, "post", _operation(summary, path, _json({"type": "object"}), {"type": "object"}))
    for model in _TFS_MODEL:
        add(model, "get", _operation("TF Serving: model version status", model, _json({"type": "object"})))
        add(model + "/metadata", "get", _operation("TF Serving: model metadata (signature_def map)", model,
                                                   _json({"type": "object"})))  # fmt: skip
        add(model + ":predict", "post", _operation("TF Serving: predict", model + ":predict",
                                                   _json(_ref("PredictResponse")), _ref("PredictRequest")))  # fmt: skip
    add("/metrics", "get", {"summary": "Prometheus metrics (no token needed)",
                            "responses": {"200": {"description": "Prometheus text format"}}})  # fmt: skip
    add("/openapi.json", "get", {"summary": "This document", "responses": {"200": _json({"type": "object"})}})
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                    "INT32", "INT64", "FP16", "FP32", "FP64", "BF16", "BYTES"]},
            "parameters": {"type": "object"},
            "data": {"description": "Values, flat or nested, row-major; strings for BYTES", "type": "array"},
        },
    }  # fmt: skip
    schemas = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "ServerMetadata": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                                            "extensions": {"type": "array",
                                                                           "items": {"type": "string"}}}},
        "ModelMetadata": {"type": "object", "properties": {"name": {"type": "string"},
                                                           "versions": {"type": "array", "items": {"type": "string"}},
                                                           "platform": {"type": "string"},
                                                           "inputs": {"type": "array"}, "outputs": {"type": "array"}}},
        "Statistics": {"type": "object", "properties": {"model_stats": {"type": "array"}}},
        "RepositoryModel": {"type": "object", "properties": {k: {"type": "string"}
                                                             for k in ("name", "version", "state", "reason")}},
        "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": tensor},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
        "InferResponse": {"type": "object", "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": {"type": "object"}, "outputs": {"type": "array", "items": tensor}}},
        "PredictRequest": {"type": "object", "properties": {
            "signature_name": {"type": "string"},
            "instances": {"type": "array", "description": "Row format: one entry per row ({input: value} when named)"},
            "inputs": {"description": "Columnar format: the input's value, or {input: value}"}}},
        "PredictResponse": {"type": "object", "properties": {
            "predictions": {"type": "array"}, "outputs": {"description": "Columnar format's answer"}}},
    }  # fmt: skip
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "modelserver REST APIs",
            "version": server_version or "unknown",
            "description": "TF Serving's REST API (/v1) and the Open Inference Protocol over HTTP (/v2, KServe v2 "
            'and Triton\'s HTTP API). Errors are {"error": "..."} with the HTTP status of the gRPC one.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
