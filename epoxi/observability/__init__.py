"""What a service shows of itself: traces (``tracing``), metrics (``metrics``), logs (``logs``)."""
