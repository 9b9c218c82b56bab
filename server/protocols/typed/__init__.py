"""Our typed API (modelserver.v1.ModelService): codec and transport-free handlers."""
