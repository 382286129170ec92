"""The test harness itself: a hang fails its test within a time limit, names what hung, and leaves no
process behind (no gloo deadlock or stuck launcher can stall CI)."""
import os
import time

import psutil
import pytest

from dist_utils import run_on_ranks
from helpers import SMALL, launch


def _rank_1_hangs(rank, world, pid_dir):
    (pid_dir / str(os.getpid())).touch()
    if rank == 1:
        time.sleep(3600)  # as a rank stuck in a collective the others never join; rank 0 finishes


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_a_hung_rank_fails_named_within_its_timeout(tmp_path):
    started = time.monotonic()
    # (rank 0 is named too only if it was itself still starting at the limit, on a very slow machine)
    with pytest.raises(AssertionError, match=r"ranks? (0, )?1 of 2 still running after 20 s: hung, killed") as e:
        run_on_ranks(2, _rank_1_hangs, tmp_path, timeout=20)
    assert time.monotonic() - started < 20 + 40, e.value  # the limit, and the kill's grace
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert len(pids) == 2 and not any(_alive(p) for p in pids), pids


@pytest.mark.slow
def test_a_hung_launch_is_killed_with_all_its_processes_and_named(corpus, tmp_path):
    """A launched run still going at its timeout (here: a run far longer than the limit) is killed, the
    launcher and both ranks, and the failure names the command."""
    run = tmp_path / "endless"
    with pytest.raises(AssertionError, match=r"hung: still running after 20 s, killed with its children: .*torch\."
                                             r"distributed\.run .*launch/pretrain\.py") as e:
        launch(SMALL + [f"data.path={corpus}", f"log.dir={run}", "train.steps=1000000"], nproc=2, timeout=20)
    left = [p for p in psutil.process_iter(["cmdline"]) if f"log.dir={run}" in (p.info["cmdline"] or [])]
    assert not left, (left, e.value)


def test_every_test_has_a_time_limit(request, pytestconfig):
    """pytest.ini's default per-test timeout is what pytest runs with (the README's command reads it),
    and every slow test collected has its longer one (tests/conftest.py)."""
    from conftest import SLOW_TIMEOUT

    assert pytestconfig.getini("timeout") == "300"
    assert request.node.get_closest_marker("timeout") is None  # this fast test: the ini's limit
    for item in request.session.items:
        if item.get_closest_marker("slow"):
            assert item.get_closest_marker("timeout").args[0] == SLOW_TIMEOUT, item.nodeid
