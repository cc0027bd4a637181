"""Session fixtures shared by test modules: trained tiny runs are expensive, so each is made once."""

from __future__ import annotations

import pytest

from tests.helpers import SHORT_RUN_STEPS as STEPS
from tests.helpers import launch_training, remove_shared_memory_buffers


def pytest_collection_modifyitems(items):
    """A test that uses the 2-rank runs is as slow as one that launches them: mark it the same. Every
    multi-process test is also ``slow``, so ``-m "not slow"`` is the fast tier."""
    for item in items:
        if "mode_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.distributed)
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)

@pytest.fixture(scope="session")
def mode_runs(tmp_path_factory):
    """Short 2-rank runs of tiny.yaml (ZeRO-3, every tensor partitioned): one per routing mode and plain LoRA.

    Keys: ``scaled`` (the default), ``hard``, ``dense`` (K=3) and ``lora`` (K=1, projector trained).
    """
    runs = {}
    for name, overrides in {
        "scaled": [],
        "hard": ["mole.routing=hard"],
        "dense": ["mole.routing=dense"],
        "lora": ["mole.num_experts=1"],
    }.items():
        out = tmp_path_factory.mktemp(f"run_{name}")
        launch_training(out, f"train.max_steps={STEPS}", *overrides)
        runs[name] = out
    return runs


@pytest.fixture(scope="session", autouse=True)
def clean_shared_memory():
    """Every DeepSpeed CPU run maps a 69 MB buffer per rank in /dev/shm; killed runs cannot unlink theirs."""
    yield
    remove_shared_memory_buffers()

