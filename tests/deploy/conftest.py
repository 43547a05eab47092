"""Fixtures for the deploy tests; the helpers themselves are in deploy_support.py."""

from __future__ import annotations

import pytest
from deploy_support import find_tool


@pytest.fixture
def tool():
    """`tool("promtool")` -> its path, or skip (fail under CI) when it is not installed."""
    return find_tool
