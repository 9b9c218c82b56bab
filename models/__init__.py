"""The built-in Keras Functional-API models, one module each, and their registry."""
