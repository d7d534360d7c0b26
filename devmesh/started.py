"""``async with`` for what starts and stops: a process, a server, a sink."""

from __future__ import annotations

from typing import Self


class Started:
    """``async with``: ``start()`` on entry (``stop()`` if that fails), ``stop()`` on exit."""

    async def start(self) -> Self:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
