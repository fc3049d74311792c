"""Types of the compiled frame scanners (``_scan.c``); ``scan.py`` documents their contract and
holds their pure-Python twins."""

def broker_run(
    data: bytes,
    pos: int,
    channel: int,
    max_size: int,
    deliver_ok: bool,
    confirmed: int,
    offset: int,
    to_channel: int,
    drop_acks: bool,
    /,
) -> tuple[int, int, int, bytes | None]: ...
def client_run(
    data: bytes, pos: int, channel: int, max_size: int, acks_ok: bool, to_channel: int, /
) -> tuple[int, int, bytes | None]: ...
