import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from shardmaker import make_packed  # noqa: E402


@pytest.fixture(scope="session")
def packed(tmp_path_factory) -> Path:
    """4 classes, 48 training clips in 8 shards of 6, 16 test clips in 2 shards; 4 frames of 32 px height."""
    out = tmp_path_factory.mktemp("packed")
    make_packed(out)
    return out
