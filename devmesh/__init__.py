"""Dev tooling: the embedded defaults for running the whole mesh on one machine.

Like ``consul agent -dev``, it ships with the product but is not part of it:

- ``devmesh.registry``: the development registry, a Consul-compatible HTTP API held in memory;
- ``devmesh.supervisor``: starts the mesh's services as processes and learns their addresses;
- ``devmesh.logs``: each service's output in its own file;
- ``devmesh.watchdog``: reports a service that dies and restarts it, with a backoff;
- ``devmesh.sink``: a mail sink, a real SMTP server that keeps what it receives;
- ``devmesh.launch``: ``epoxi dev``, the mesh with a demo batch.

Production code (``epoxi``, ``services``, ``gateway``) never imports it; only the ``epoxi``
launcher (``cli``) does, and only for the programs chosen from here.
"""
