"""Python clients for modelserver: a typed sync and asyncio client, a CLI and (later) a load tester."""

from clients.client import AsyncModelServerClient, ModelServerClient

__all__ = ["AsyncModelServerClient", "ModelServerClient"]
