"""End-to-end tests: the whole platform as processes (processor, projections, trainer and
sampler workers, the API over real HTTP), driven through the SDK. Needs the local stack."""

from __future__ import annotations

from tests.integration.conftest import services, settings

__all__ = ["services", "settings"]
