"""aserver: multi-process binary-protocol TCP services on asyncio and uvloop."""

from aserver.app import App, Reply, Request, Status
from aserver.worker.connection import Connection

__all__ = ["App", "Connection", "Reply", "Request", "Status"]
