"""The gRPC runtime every service shares: the server, client channels, the service lifecycle, status errors."""
