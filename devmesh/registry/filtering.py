"""``?filter``: Consul's bexpr filter expressions, which the dev registry does not evaluate.

Consul parses the expression of a list endpoint that supports filtering (``parseFilter`` in
``agent/http.go``, then ``bexpr.CreateFilter``) and answers an expression it cannot use with the
error ``Failed to create boolean expression evaluator: <why>``, which ``HTTPHandlers.wrap`` writes
as a plain-text 500 (there is no 400 for it; hashicorp/consul#7338). The dev registry refuses every
non-empty expression the same way instead of silently returning the unfiltered list. An empty
``?filter=`` is no filter, as in Consul.
"""

from __future__ import annotations

from aiohttp import web

from devmesh.registry.web import HTTPError, param
from epoxi import durations

EVALUATOR_ERROR = "Failed to create boolean expression evaluator"


def refuse_filter(request: web.Request) -> None:
    """Raise Consul's filter error when the request carries a filter expression."""
    expression = param(request, "filter")
    if expression:
        raise HTTPError(
            500,
            f"{EVALUATOR_ERROR}: the development registry does not evaluate filter expressions "
            f"(filter {durations.go_quote(expression)})",
        )
