"""The node's mail engine, one concept per module.

``spool`` (durable SQLite queue), ``pipeline`` (one routing key's sending task) with its
``ratelimit``, ``retry`` schedule and outcome ``recorder``; ``hooks`` (what a pipeline tells its
owner); ``reply`` (a parsed SMTP reply); ``smtp`` (the ``Sender`` interface and its SMTP
implementation) with ``host_backoff``, ``mx`` and ``tls``; ``dsn`` (bounce reports).
"""
