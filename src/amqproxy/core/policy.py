"""What the proxy does with each method: the tables the sessions consult (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import enum

from amqproxy.amqp import constants as c


class Verdict(enum.Enum):
    """What becomes of a method frame the proxy looked at (besides replacing its payload)."""

    FORWARD = "forward"  # as it is
    DROP = "drop"  # answered or absorbed by the proxy


# Synchronous methods with a ``nowait`` flag: a reply is due unless it is set.
NOWAIT_METHODS = frozenset(
    {
        c.EXCHANGE_DECLARE,
        c.EXCHANGE_DELETE,
        c.EXCHANGE_BIND,
        c.EXCHANGE_UNBIND,
        c.QUEUE_DECLARE,
        c.QUEUE_BIND,
        c.QUEUE_PURGE,
        c.QUEUE_DELETE,
        c.BASIC_CONSUME,
        c.BASIC_CANCEL,
    }
)
# Synchronous methods that always get a reply.
ALWAYS_REPLIED = frozenset(
    {
        c.QUEUE_UNBIND,
        c.BASIC_QOS,
        c.BASIC_GET,
        c.BASIC_RECOVER,
        c.TX_SELECT,
        c.TX_COMMIT,
        c.TX_ROLLBACK,
        c.CHANNEL_FLOW,
    }
)
# Methods that leave state on a channel: it cannot be handed to another client afterwards.
DIRTYING = {
    c.BASIC_CONSUME: "consumer",
    c.BASIC_RECOVER: "recover",
    c.BASIC_RECOVER_ASYNC: "recover",
    c.TX_SELECT: "transaction",
    c.CHANNEL_FLOW: "flow",
}
ACKS = frozenset({c.BASIC_ACK, c.BASIC_NACK, c.BASIC_REJECT})
# Methods naming a queue: refused with 405 when another client of the pool owns it exclusively.
QUEUE_METHODS = frozenset(
    {
        c.QUEUE_DECLARE,
        c.QUEUE_BIND,
        c.QUEUE_UNBIND,
        c.QUEUE_PURGE,
        c.QUEUE_DELETE,
        c.BASIC_CONSUME,
        c.BASIC_GET,
    }
)
# Broker methods the proxy looks at before forwarding (or instead).
BROKER_WATCHED = (
    frozenset(
        {
            c.CHANNEL_OPEN_OK,
            c.CHANNEL_CLOSE,
            c.CHANNEL_CLOSE_OK,
            c.BASIC_ACK,
            c.BASIC_NACK,
            c.BASIC_DELIVER,
            c.BASIC_GET_OK,
        }
    )
    | c.SYNC_REPLIES
)

# Client methods the proxy acts on before forwarding (or instead); the rest passes as it is.
CLIENT_WATCHED = (
    NOWAIT_METHODS
    | ALWAYS_REPLIED
    | QUEUE_METHODS
    | ACKS
    | DIRTYING.keys()
    | {c.CHANNEL_OPEN, c.CHANNEL_CLOSE, c.CHANNEL_CLOSE_OK, c.CONFIRM_SELECT}
)
