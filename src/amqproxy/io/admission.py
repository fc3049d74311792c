"""``--max-clients``: whether one more client socket is served, and the WARNING about those that
are not: at most one a minute, with how many were refused since the last one (a crowd of
refused clients must not flood the log)."""

from __future__ import annotations

import asyncio
import logging

from amqproxy.config import Settings

log = logging.getLogger("amqproxy.server")

REPORT_EVERY = 60.0  # seconds between two WARNINGs about refused clients, at least


class ClientLimit:
    """Counts the client sockets refused at ``--max-clients`` and reports them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # read at each client: a reload changes the limit
        self.refused = 0  # since start (the metric)
        self._unreported = 0
        self._timer: asyncio.TimerHandle | None = None

    def refusal(self, open_clients: int) -> str:
        """ "" when one more client is served beside ``open_clients``; else the reply text of
        the Connection.Close it gets."""
        limit = self.settings.max_clients
        if not limit or open_clients < limit:
            return ""
        self.refused += 1
        self._unreported += 1
        if self._timer is None:  # the first refusal in a minute is reported at once
            self._report(first=True)
        return f"CONNECTION_FORCED - amqproxy: too many client connections (max-clients {limit})"

    def _report(self, first: bool = False) -> None:
        count, self._unreported = self._unreported, 0
        if not count:
            self._timer = None
            return
        log.warning(
            "max-clients %d reached: %d client connection(s) refused%s",
            self.settings.max_clients,
            count,
            "" if first else f" in the last {REPORT_EVERY:g}s",
        )
        self._timer = asyncio.get_running_loop().call_later(REPORT_EVERY, self._report)
