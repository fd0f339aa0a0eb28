"""The agent's local admin API: JSON lines over a unix socket, for the CLI and the hook.

Request: one JSON object per line with an ``op``; response: one JSON object per line with
``ok`` and either the result or ``error``. Only root (the socket is mode 0600) may talk to it.

Operations: ``ping``, ``status``, ``hook`` (a libvirt hook event: the verdict says whether
libvirt may go on), ``migrate`` (start a libvirt migration through the agents), ``job``
(its progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwcp_migrate.errors import DwcpError

if TYPE_CHECKING:
    from dwcp_migrate.agent.daemon import Agent

log = logging.getLogger(__name__)

MAX_REQUEST = 16 * 1024 * 1024  # a hook may send a domain XML


class AgentUnavailableError(DwcpError):
    """The local agent does not answer on its admin socket."""


class AdminServer:
    def __init__(self, agent: Agent, path: Path) -> None:
        self.agent = agent
        self.path = path
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                       limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    result = await self.handle(request)
                    response: dict[str, Any] = {"ok": True, **result}
                except (ValueError, DwcpError) as exc:
                    response = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"name": self.agent.config.name}
        if op == "status":
            return self.agent.status()
        if op == "hook":
            return self.agent_hook(request)
        if op == "migrate":
            return await self.agent.start_libvirt_migration(
                str(request.get("domain", "")), str(request.get("to", "")),
                request.get("bandwidth_mib"))
        if op == "job":
            return self.agent.job_status(str(request.get("id", "")))
        raise ValueError(f"unknown operation {op!r}")

    def agent_hook(self, request: dict[str, Any]) -> dict[str, Any]:
        """libvirt's qemu hook: admission control for incoming migrations."""
        operation, sub = request.get("operation"), request.get("sub")
        domain = request.get("object")
        log.info("libvirt hook: %s %s %s", domain, operation, sub)
        if operation == "migrate" and sub == "begin" and self.agent.refuse_incoming:
            return {"allow": False,
                    "reason": f"dwcp agent {self.agent.config.name} refuses incoming "
                              f"migrations: {self.agent.refuse_incoming}"}
        return {"allow": True, "reason": ""}


class AdminClient:
    """Talks to the local agent; used by the CLI and the libvirt hook."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(request)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    data += chunk
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnavailableError(f"the dwcp agent is not running (no answer at "
                                        f"{self.path}): start it with `dwcp agent --config "
                                        f"FILE` or the dwcp-agent service") from exc
        except OSError as exc:
            raise AgentUnavailableError(f"cannot talk to the dwcp agent at {self.path}: "
                                        f"{exc}") from exc
        try:
            response = json.loads(data)
        except json.JSONDecodeError as exc:
            raise AgentUnavailableError(f"the dwcp agent at {self.path} sent a broken "
                                        "answer") from exc
        if not isinstance(response, dict):
            raise AgentUnavailableError(f"the dwcp agent at {self.path} sent a broken answer")
        if not response.get("ok"):
            raise DwcpError(f"the dwcp agent refused: {response.get('error')}")
        return response
