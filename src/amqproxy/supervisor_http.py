"""The supervisor's HTTP port (``--workers``): the same endpoints as a single proxy's, for
the whole proxy.

Each request is answered by asking every live worker on its private unix socket (within
``ASK_TIMEOUT``, all at once) and putting the answers together (``aggregate``). A worker that
does not answer in time is left out of the sums and shows as not answering. Writes: the
supervisor checks the admin token itself, then forwards the request with the token and the
caller's address (the worker logs who asked); a pause goes to every worker, a client's close
to the worker its id names (``"W-ID"``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

from amqproxy import aggregate
from amqproxy.admin import CLOSE_PATH, GETS, METRICS_TYPE, warn_if_open
from amqproxy.aggregate import WorkerView
from amqproxy.config import Settings
from amqproxy.httpd import (
    FORWARDED,
    HttpServer,
    Request,
    Response,
    ask,
    error,
    json_response,
    unauthorized,
)
from amqproxy.server import open_listener

log = logging.getLogger("amqproxy.admin")

ASK_TIMEOUT = 2.0
WORKER_CLOSE_PATH = re.compile(r"/api/clients/(\d{1,4})-(\d{1,18})/close")
POSTS = ("/api/pause", "/api/resume")


class Slot(Protocol):
    index: int
    admin_path: str

    @property
    def alive(self) -> bool: ...


class Workers(Protocol):
    """What the HTTP port reads of the supervisor (``supervisor.Supervisor``)."""

    settings: Settings
    draining: bool

    @property
    def workers(self) -> Sequence[Slot]: ...

    def views(self) -> list[WorkerView]: ...


class SupervisorHttp:
    """The HTTP endpoint of the whole proxy."""

    def __init__(self, supervisor: Workers) -> None:
        self.supervisor = supervisor
        self._http = HttpServer(self.answer)
        self.counters = aggregate.Counters()  # kept from scrape to scrape

    def stop(self) -> None:
        self._http.stop()

    async def listen(self) -> None:
        settings = self.supervisor.settings
        address, port = settings.listen_address, settings.http_port
        await open_listener("HTTP", "-b/--http-port", port, self._http.start(address, port))
        log.info("HTTP endpoint on %s:%d for all workers (/healthz, /readyz, /metrics, /api)",
                 address, port)  # fmt: skip
        warn_if_open(settings.admin_token, address, port)

    async def _ask_all(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> dict[int, tuple[int, bytes]]:
        """The answers of the live workers that answered in time, by worker number."""
        slots = [slot for slot in self.supervisor.workers if slot.alive and slot.admin_path]

        async def one(slot: Slot) -> tuple[int, bytes] | None:
            try:
                return await ask(slot.admin_path, method, path, ASK_TIMEOUT, body, headers)
            except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:  # fmt: skip
                log.debug("worker %d did not answer %s %s: %r", slot.index, method, path, exc)
                return None

        answers = await asyncio.gather(*(one(slot) for slot in slots))
        return {slot.index: a for slot, a in zip(slots, answers, strict=True) if a is not None}

    async def _json_all(self, path: str) -> dict[int, dict[str, Any]]:
        out = {}
        for index, (_, body) in (await self._ask_all("GET", path)).items():
            try:
                value = json.loads(body)
            except ValueError:
                continue
            if isinstance(value, dict):
                out[index] = value
        return out

    async def answer(self, request: Request) -> Response:
        method, path = request.method, request.path
        if method == "GET" and path in GETS:
            return await self._get(path)
        if method == "POST" and (path in POSTS or WORKER_CLOSE_PATH.fullmatch(path)):
            return await self._post(request)
        if path in GETS or path in POSTS or WORKER_CLOSE_PATH.fullmatch(path):
            return error(405, f"{method} not allowed on {path}")
        if CLOSE_PATH.fullmatch(path):
            return error(404, f"no client {path.split('/')[3]}: ids are WORKER-ID here")
        return error(404, f"no endpoint {path}")

    async def _get(self, path: str) -> Response:
        supervisor = self.supervisor
        if path == "/metrics":
            texts = {}
            for index, (status, body) in (await self._ask_all("GET", "/metrics")).items():
                if status == 200:
                    texts[index] = body.decode("utf-8", "replace")
            text = aggregate.metrics(texts, supervisor.views(), self.counters)
            return Response(200, text, METRICS_TYPE)
        if path in ("/healthz", "/readyz"):
            answers = await self._json_all("/healthz")
            ready, health = aggregate.health(answers, supervisor.views(), supervisor.draining)
            return json_response(200 if ready or path == "/healthz" else 503, health)
        answers = await self._json_all(path)
        build = {
            "/api/pools": aggregate.pools,
            "/api/clients": aggregate.clients,
            "/api/nodes": aggregate.nodes,
        }
        return json_response(200, build.get(path, aggregate.upstreams)(answers))

    async def _post(self, request: Request) -> Response:
        refused = unauthorized(request, self.supervisor.settings.admin_token)
        if refused is not None:
            return refused
        headers = {FORWARDED: request.peer}
        if request.authorization:
            headers["Authorization"] = request.authorization
        match = WORKER_CLOSE_PATH.fullmatch(request.path)
        if match is None:  # pause or resume: every worker
            answers = await self._ask_all("POST", request.path, request.body, headers)
            bodies = {}
            for index, (status, text) in answers.items():
                if status == 200:
                    bodies[index] = json.loads(text)
            asked = sum(slot.alive for slot in self.supervisor.workers)
            return json_response(200, aggregate.paused(bodies, asked))
        index, client = int(match.group(1)), match.group(2)
        slot = next((s for s in self.supervisor.workers if s.index == index and s.alive), None)
        if slot is None:
            return error(404, f"no client {index}-{client}: no worker {index} runs")
        try:
            status, body = await ask(
                slot.admin_path, "POST", f"/api/clients/{client}/close", ASK_TIMEOUT,
                request.body, headers,
            )  # fmt: skip
            value = json.loads(body)
        except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError):
            return error(502, f"worker {index} did not answer")
        if status == 404:
            return error(404, f"no client {index}-{client}")
        if isinstance(value, dict) and "id" in value:
            value["id"] = f"{index}-{value['id']}"
            value["worker"] = index
        return json_response(status, value)
