"""Protobuf's wire format for messages put together from parts already encoded.

A repeated message field is each element's tag, length and bytes, one after another, and a
parser takes fields in any order (the last of a singular field wins). So a request can be
assembled from its elements' encodings without building the request object and serializing it
again: what the router does with the emails it has already encoded once for their Message-IDs.
"""

from __future__ import annotations

from google.protobuf.message import Message

_LENGTH_DELIMITED = 2


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (bytes, string or message) ``number`` holding ``payload``."""
    return varint(number << 3 | _LENGTH_DELIMITED) + varint(len(payload)) + payload


def number(message: type[Message], name: str) -> int:
    """The field number of ``message``'s field ``name``."""
    return int(message.DESCRIPTOR.fields_by_name[name].number)
