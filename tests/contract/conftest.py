from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.stacks import HOT, OBJECTS, WARM


@pytest.fixture(params=sorted(WARM))
async def warm(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    async with WARM[request.param](request) as store:
        yield store


@pytest.fixture(params=sorted(HOT))
async def hot(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    async with HOT[request.param](request) as store:
        yield store


@pytest.fixture(params=sorted(OBJECTS))
async def objects(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    async with OBJECTS[request.param](request) as store:
        yield store
