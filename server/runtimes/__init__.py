"""How a model version runs: SavedModel and .keras runtimes, device placement."""
