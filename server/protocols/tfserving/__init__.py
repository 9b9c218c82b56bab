"""TensorFlow Serving's API: codec and transport-free handlers."""
