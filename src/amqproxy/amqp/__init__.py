"""Sans-I/O AMQP 0-9-1: frame scanning, rewriting and the few methods the proxy acts on."""
