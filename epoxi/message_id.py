"""Message-IDs an email may carry: RFC 5322 3.6.4 ``msg-id``, in one header line.

``"<" id-left "@" id-right ">"``: id-left a dot-atom-text, id-right a dot-atom-text or a
``"[" dtext* "]"`` literal; printable ASCII without spaces, and ``Message-ID: `` with it at most
998 octets. The obsolete forms (quoted strings, comments, folding) are not taken: a receiver may
cut them short or rewrite them, and the router keys idempotent batches by Message-ID.
"""

from __future__ import annotations

import re

from epoxi.address import DOT_ATOM

_DTEXT = r"[!-Z^-~]"  # printable ASCII but "[", "]" and "\"
MSG_ID = re.compile(rf"<{DOT_ATOM}@(?:{DOT_ATOM}|\[{_DTEXT}*\])>\Z")
# 998 octets (RFC 5322 2.1.1) less "Message-ID: ".
MAX_MESSAGE_ID = 998 - len("Message-ID: ")


def message_id_problem(message_id: str) -> str | None:
    """Why ``message_id`` (not empty) cannot be an email's Message-ID; None when it can."""
    if len(message_id) > MAX_MESSAGE_ID:
        return f"is longer than {MAX_MESSAGE_ID} characters"
    if MSG_ID.match(message_id) is None:
        return (
            "is not a Message-ID: <left@right>, each side dot-separated atoms (the right one may be a "
            "[literal]), printable ASCII without spaces (RFC 5322 3.6.4); leave it empty to have one made"
        )
    return None
