"""The HTTP transport (SPEC §13): TF Serving's REST API and the Open Inference Protocol over HTTP, on one port."""
