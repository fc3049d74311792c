"""The log handler batches the lines of a loop turn (and of FLUSH_INTERVAL when busy) into one
write, and loses none."""

import asyncio
import io
import logging

from amqproxy import logsetup
from amqproxy.logsetup import FLUSH_INTERVAL, FLUSH_LINES, LogFormatter, TurnBufferedHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def make_logger() -> tuple[logging.Logger, CountingStream]:
    stream = CountingStream()
    handler = TurnBufferedHandler(stream)
    handler.setFormatter(LogFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test.turnbuffer.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_lines_of_one_loop_turn_go_out_in_one_write_after_it() -> None:
    logger, stream = make_logger()

    async def main() -> tuple[str, str]:
        for i in range(3):
            logger.info("client %d connected", i)
        during = stream.getvalue()
        await asyncio.sleep(0)  # the turn ends: the pending lines are written
        await asyncio.sleep(0)
        return during, stream.getvalue()

    during, after = asyncio.run(main())
    assert during == ""
    assert after == "INFO client 0 connected\nINFO client 1 connected\nINFO client 2 connected\n"
    assert stream.writes == 1


def test_busy_per_client_lines_are_written_at_most_once_per_interval() -> None:
    logger, stream = make_logger()
    handler = logger.handlers[0]
    assert isinstance(handler, TurnBufferedHandler)

    async def main() -> tuple[int, int, int]:
        logger.info("first")
        await asyncio.sleep(0.001)
        for i in range(3):  # one client cycle is several loop turns
            handler.emit_line("INFO", "amqproxy.client", f"client {i} connected")
            await asyncio.sleep(0)
        held = stream.writes
        await asyncio.sleep(FLUSH_INTERVAL * 2)  # the interval ends: the waiting lines go
        after_interval = stream.writes
        handler.emit_line("INFO", "amqproxy.client", "client 3 connected")
        logger.warning("a line of another kind")  # not held by the interval, nor the one before
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return held, after_interval, stream.writes

    assert asyncio.run(main()) == (1, 2, 3)
    assert stream.getvalue().count("\n") == 6


def test_the_pending_lines_are_bounded() -> None:
    logger, stream = make_logger()

    async def main() -> int:
        for i in range(FLUSH_LINES):
            logger.info("client %d connected", i)
        return stream.writes

    assert asyncio.run(main()) == 1  # the FLUSH_LINES-th line wrote them all at once
    assert stream.getvalue().count("\n") == FLUSH_LINES


def test_errors_and_records_outside_the_loop_are_written_at_once() -> None:
    logger, stream = make_logger()
    logger.info("before the loop")
    assert stream.getvalue() == "INFO before the loop\n"

    async def main() -> str:
        logger.info("pending")
        logger.error("broken")  # written now, after what was pending, in order
        return stream.getvalue()

    assert asyncio.run(main()) == "INFO before the loop\nINFO pending\nERROR broken\n"


def test_flush_writes_what_is_pending() -> None:
    logger, stream = make_logger()

    async def main() -> None:
        logger.warning("last words")
        for handler in logger.handlers:
            handler.flush()  # what logging.shutdown does before os._exit
        assert stream.getvalue() == "WARNING last words\n"

    asyncio.run(main())


def test_hot_info_writes_the_line_logger_info_would(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    stream = CountingStream()
    handler = TurnBufferedHandler(stream)
    handler.setFormatter(LogFormatter(logsetup.FORMAT))
    logger = logging.getLogger("amqproxy.test-hot")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    monkeypatch.setattr(logsetup, "_handler", handler)

    async def main() -> None:
        logger.info("%s", "client a@/ from 127.0.0.1:1 connected")
        logsetup.hot_info(logger, "client a@/ from 127.0.0.1:1 connected")
        logger.setLevel(logging.WARNING)
        logsetup.hot_info(logger, "not written at WARNING")
        await asyncio.sleep(FLUSH_INTERVAL * 2)

    asyncio.run(main())
    one, two = stream.getvalue().splitlines()
    assert one[23:] == two[23:] == " INFO amqproxy.test-hot: client a@/ from 127.0.0.1:1 connected"
    assert one[:19] == two[:19] and one[19] == two[19] == ","  # the same date-time format
