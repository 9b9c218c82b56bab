"""--workers: processes sharing one port, and their metrics."""
