import pytest

from fastmup import ext


@pytest.fixture(scope="session")
def cpu_ext():
    """The host module, built once per session (and cached on disk across sessions)."""
    return ext.load("cpu")
