"""Heartbeats owned by the proxy, one leg at a time (DESIGN.md section 3).

Every H/2: send a heartbeat if nothing was written since the last tick; after 2·H with nothing
read, the peer is dead. The hot path only sets two booleans.
"""

from __future__ import annotations

import asyncio

from amqproxy.amqp import frames

TICKS_TO_DEATH = 4  # 4 ticks of H/2 = 2·H


class HeartbeatMixin:
    """Mixed into a Protocol that has ``transport`` and sets the two flags on I/O."""

    transport: asyncio.Transport | None
    _read_seen: bool
    _wrote: bool

    def _init_heartbeat(self) -> None:
        self._read_seen = False
        self._wrote = False
        self._silent_ticks = 0
        self._heartbeat_interval = 0.0
        self._heartbeat_timer: asyncio.TimerHandle | None = None

    def _start_heartbeat(self, heartbeat: int) -> None:
        if heartbeat > 0:
            self._heartbeat_interval = heartbeat / 2
            self._heartbeat_timer = asyncio.get_running_loop().call_later(
                self._heartbeat_interval, self._heartbeat_tick
            )

    def _stop_heartbeat(self) -> None:
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None

    def _heartbeat_tick(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._wrote:
            transport.write(frames.HEARTBEAT)
        self._wrote = False
        if self._read_seen:
            self._silent_ticks = 0
        else:
            self._silent_ticks += 1
            if self._silent_ticks >= TICKS_TO_DEATH:
                self._heartbeat_timer = None
                self._heartbeat_missed()
                return
        self._read_seen = False
        self._heartbeat_timer = asyncio.get_running_loop().call_later(
            self._heartbeat_interval, self._heartbeat_tick
        )

    def _heartbeat_missed(self) -> None:
        raise NotImplementedError
