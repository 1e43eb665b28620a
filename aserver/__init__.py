"""aserver: multi-process binary-protocol TCP services on asyncio and uvloop."""

from aserver.app import App, BadRequest, Reply, Request, Status
from aserver.worker.connection import Connection

__all__ = ["App", "BadRequest", "Connection", "Reply", "Request", "Status"]
