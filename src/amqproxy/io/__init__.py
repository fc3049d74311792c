"""The asyncio side: sockets, timers and tasks, around the I/O-free sessions of ``core``."""
