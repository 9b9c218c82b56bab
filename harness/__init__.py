"""Start and stop real processes and drive them: a `python -m server` on port 0 (server.py), Debian's nginx and
Prometheus configured from deploy/ (deploy_native.py), SIGTERM under load (drain.py), with what those need
(procs.py: processes as /proc shows them; backoff.py: retry delays). Used by the tests and by the benchmarks, so
that bench/ imports no test code; what only tests use stays in tests/helpers/. Imports nothing from tests/ or
bench/, and nothing of server/ but its hold points (server.base.hold)."""
