"""The I/O-free core: sessions that take bytes (and timer ticks) in and decide what to do.

``core.client.ClientSession`` plays the broker to one client, ``core.upstream.UpstreamSession``
plays a client to the broker; neither owns a socket, a loop or a task. What they cannot do
themselves — write to a socket, pause it, run an upstream round trip — they ask of their host
(``core.host``), which ``amqproxy.io`` implements with asyncio and the tests with lists.
"""
