"""Test setup: Prefect runs against a throwaway home and one test server per session."""
import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modeaudit-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield
