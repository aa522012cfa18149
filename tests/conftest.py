"""Shared fixtures, one module per area so parts can grow independently."""

pytest_plugins = ["tests.fixtures_data", "tests.fixtures_services", "tests.fixtures_model"]
