"""Wire constants of AMQP 0-9-1: frame types, reply codes and the method ids the proxy acts on."""

from typing import Final

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"

FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
FRAME_HEADER_SIZE: Final = 7  # type (1) + channel (2) + payload size (4)
FRAME_OVERHEAD: Final = 8  # header + frame-end octet
FRAME_MIN_SIZE: Final = 4096  # the smallest frame_max a peer may negotiate
DEFAULT_FRAME_MAX: Final = 131072  # RabbitMQ's
FRAME_END_BYTE: Final = b"\xce"

# Basic.Publish flag bits, and the one size of an ack's arguments the broker decodes.
PUBLISH_MANDATORY: Final = 1
PUBLISH_IMMEDIATE: Final = 2
ACK_SIZE: Final = 13  # class, method, delivery tag (8), bits (1)

# Reply codes (AMQP 0-9-1 section 1.9).
REPLY_SUCCESS: Final = 200
NO_ROUTE: Final = 312
CONNECTION_FORCED: Final = 320
INVALID_PATH: Final = 402
ACCESS_REFUSED: Final = 403
NOT_FOUND: Final = 404
RESOURCE_LOCKED: Final = 405
PRECONDITION_FAILED: Final = 406
FRAME_ERROR: Final = 501
SYNTAX_ERROR: Final = 502
COMMAND_INVALID: Final = 503
CHANNEL_ERROR: Final = 504
UNEXPECTED_FRAME: Final = 505
RESOURCE_ERROR: Final = 506
NOT_ALLOWED: Final = 530
NOT_IMPLEMENTED: Final = 540
INTERNAL_ERROR: Final = 541


def method_id(class_id: int, method: int) -> int:
    """The 32-bit id that starts a method frame's payload: class id << 16 | method id."""
    return (class_id << 16) | method


CONNECTION_START: Final = method_id(10, 10)
CONNECTION_START_OK: Final = method_id(10, 11)
CONNECTION_TUNE_OK: Final = method_id(10, 31)
CONNECTION_OPEN: Final = method_id(10, 40)
CONNECTION_CLOSE: Final = method_id(10, 50)
CONNECTION_CLOSE_OK: Final = method_id(10, 51)
CONNECTION_BLOCKED: Final = method_id(10, 60)
CONNECTION_UNBLOCKED: Final = method_id(10, 61)
CONNECTION_UPDATE_SECRET: Final = method_id(10, 70)
CONNECTION_UPDATE_SECRET_OK: Final = method_id(10, 71)

CHANNEL_OPEN: Final = method_id(20, 10)
CHANNEL_OPEN_OK: Final = method_id(20, 11)
CHANNEL_FLOW: Final = method_id(20, 20)
CHANNEL_FLOW_OK: Final = method_id(20, 21)
CHANNEL_CLOSE: Final = method_id(20, 40)
CHANNEL_CLOSE_OK: Final = method_id(20, 41)

EXCHANGE_DECLARE: Final = method_id(40, 10)
EXCHANGE_DECLARE_OK: Final = method_id(40, 11)
EXCHANGE_DELETE: Final = method_id(40, 20)
EXCHANGE_DELETE_OK: Final = method_id(40, 21)
EXCHANGE_BIND: Final = method_id(40, 30)
EXCHANGE_BIND_OK: Final = method_id(40, 31)
EXCHANGE_UNBIND: Final = method_id(40, 40)
EXCHANGE_UNBIND_OK: Final = method_id(40, 51)

QUEUE_DECLARE: Final = method_id(50, 10)
QUEUE_DECLARE_OK: Final = method_id(50, 11)
QUEUE_BIND: Final = method_id(50, 20)
QUEUE_BIND_OK: Final = method_id(50, 21)
QUEUE_PURGE: Final = method_id(50, 30)
QUEUE_PURGE_OK: Final = method_id(50, 31)
QUEUE_DELETE: Final = method_id(50, 40)
QUEUE_DELETE_OK: Final = method_id(50, 41)
QUEUE_UNBIND: Final = method_id(50, 50)
QUEUE_UNBIND_OK: Final = method_id(50, 51)

BASIC_QOS: Final = method_id(60, 10)
BASIC_QOS_OK: Final = method_id(60, 11)
BASIC_CONSUME: Final = method_id(60, 20)
BASIC_CONSUME_OK: Final = method_id(60, 21)
BASIC_CANCEL: Final = method_id(60, 30)
BASIC_CANCEL_OK: Final = method_id(60, 31)
BASIC_PUBLISH: Final = method_id(60, 40)
BASIC_RETURN: Final = method_id(60, 50)
BASIC_DELIVER: Final = method_id(60, 60)
BASIC_GET: Final = method_id(60, 70)
BASIC_GET_OK: Final = method_id(60, 71)
BASIC_GET_EMPTY: Final = method_id(60, 72)
BASIC_ACK: Final = method_id(60, 80)
BASIC_REJECT: Final = method_id(60, 90)
BASIC_RECOVER_ASYNC: Final = method_id(60, 100)
BASIC_RECOVER: Final = method_id(60, 110)
BASIC_RECOVER_OK: Final = method_id(60, 111)
BASIC_NACK: Final = method_id(60, 120)

CONFIRM_SELECT: Final = method_id(85, 10)
CONFIRM_SELECT_OK: Final = method_id(85, 11)

TX_SELECT: Final = method_id(90, 10)
TX_SELECT_OK: Final = method_id(90, 11)
TX_COMMIT: Final = method_id(90, 20)
TX_COMMIT_OK: Final = method_id(90, 21)
TX_ROLLBACK: Final = method_id(90, 30)
TX_ROLLBACK_OK: Final = method_id(90, 31)

# Replies to synchronous client requests: while one is outstanding a channel is not reusable.
SYNC_REPLIES: Final = frozenset(
    {
        EXCHANGE_DECLARE_OK,
        EXCHANGE_DELETE_OK,
        EXCHANGE_BIND_OK,
        EXCHANGE_UNBIND_OK,
        QUEUE_DECLARE_OK,
        QUEUE_BIND_OK,
        QUEUE_PURGE_OK,
        QUEUE_DELETE_OK,
        QUEUE_UNBIND_OK,
        BASIC_QOS_OK,
        BASIC_CONSUME_OK,
        BASIC_CANCEL_OK,
        BASIC_GET_OK,
        BASIC_GET_EMPTY,
        BASIC_RECOVER_OK,
        CONFIRM_SELECT_OK,
        TX_SELECT_OK,
        TX_COMMIT_OK,
        TX_ROLLBACK_OK,
        CHANNEL_FLOW_OK,
    }
)
