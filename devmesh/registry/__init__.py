"""A Consul-compatible development registry: one in-memory node, served over Consul's HTTP API.

It plays the part of ``consul agent -dev`` for machines where Consul cannot be installed; the
registry client (``epoxi.registry.client``) talks to it exactly as it talks to a real Consul.
See ``docs/registry.md`` for what is implemented and how it differs from Consul.
"""
