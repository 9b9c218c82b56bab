"""The dynamic batcher, its cost-model policy and its settings."""
