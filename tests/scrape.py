"""Scraping a service's /metrics in tests: one GET, parsed with prometheus_client's own parser."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Scrape:
    samples: list[Sample]

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def matching(self, name: str, **labels: str) -> list[Sample]:
        """The samples of ``name`` whose labels include ``labels``."""
        return [
            s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(s.value for s in self.matching(name, **labels))

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` with these labels; AssertionError when there is not one."""
        found = self.matching(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples: {found}"
        return found[0].value


def parse(text: str) -> Scrape:
    return Scrape([s for family in text_string_to_metric_families(text) for s in family.samples])


async def scrape(url: str) -> Scrape:
    """GET ``url`` (a /metrics URL) and parse the answer, which must be 200 in Prometheus's text format."""
    assert url, "the service serves no metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain", response.content_type
        return parse(await response.text())
