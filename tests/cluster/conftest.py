"""The cluster tests render the chart with the chart tests' Helm."""

from chart.conftest import helm  # noqa: F401 (a fixture)
