"""The training entry point refuses bad configs fast, naming the key, before any model loads."""

import time

import pytest

from tests.helpers import REPO, TINY_CONFIG, python, run_group


@pytest.mark.parametrize(
    "override, key",
    [
        ("trian.max_steps=3", "trian"),
        ("train.max_steps=abc", "train.max_steps"),
        ("mole.num_experts=0", "mole.num_experts"),
        ("model.name_or_path=/nonexistent", "model.name_or_path"),
    ],
)
def test_bad_config_exits_nonzero_fast_naming_the_key(override, key):
    started = time.monotonic()
    proc = run_group([python(), str(REPO / "launch" / "train.py"), "--config", str(TINY_CONFIG), override], timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, f"{override} was accepted"
    assert key in proc.stderr, f"error does not name {key!r}: {proc.stderr[-500:]}"
    assert "Traceback" not in proc.stderr, f"a config error should be a message, not a traceback: {proc.stderr[-800:]}"
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_unknown_key_suggests_the_right_one():
    proc = run_group([python(), str(REPO / "launch" / "train.py"), "--config", str(TINY_CONFIG), "trian.max_steps=3"], timeout=60)
    assert "did you mean 'train'" in proc.stderr, proc.stderr[-500:]
