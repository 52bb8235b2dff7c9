import sys
from pathlib import Path

import pytest

# tests/ helpers (naive reference, fixtures) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


def pytest_sessionstart(session):
    """The multi-process tests need gloo: fail loudly rather than skip when it is missing."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        raise RuntimeError("torch.distributed with the gloo backend is required by the test suite")


@pytest.fixture(scope="session")
def organism_root(tmp_path_factory):
    """One fresh build of the quick organism per test session (shared by the demo and train-sae tests)."""
    return tmp_path_factory.mktemp("organism_cache")
