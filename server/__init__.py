"""modelserver: serves SavedModels from a model repository over gRPC."""
