"""Loopback provider fakes, started once per session and reset for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.azure import FakeAzure


@pytest.fixture(scope="session")
def _anthropic() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def anthropic(_anthropic: FakeAnthropic) -> FakeAnthropic:
    _anthropic.reset()
    return _anthropic


@pytest.fixture(scope="session")
def _azure() -> Iterator[FakeAzure]:
    fake = FakeAzure()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def azure(_azure: FakeAzure) -> FakeAzure:
    _azure.reset()
    return _azure
