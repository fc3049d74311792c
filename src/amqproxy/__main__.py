"""Allow ``python -m amqproxy``."""

from amqproxy.cli import main

raise SystemExit(main())
