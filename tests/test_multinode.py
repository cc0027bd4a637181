"""Two "nodes" on one machine: DeepSpeed's launcher started once per node with ``--no_ssh``.

This is how multi-node runs start where ssh between nodes is not allowed: the same command on every
node, differing only in ``--node_rank``. The hostfile only tells each launcher how many nodes and
slots there are (the names are never contacted); both launchers together form one world of size 2.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import REPO, TINY_CONFIG, env_without_ranks, free_port, python, run_group, step_records

pytestmark = pytest.mark.distributed

STEPS = 4


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_nodes")
    hostfile = root / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out, port = root / "run", free_port()

    def node(rank: int):
        cmd = [python(), "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--num_nodes", "2", "--num_gpus", "1", "--node_rank", str(rank),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "launch" / "train.py"), "--config", str(TINY_CONFIG),
               f"train.max_steps={STEPS}", f"output_dir={out}"]
        return run_group(cmd, 300, env=env_without_ranks())

    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(node, (0, 1)))
    return out, nodes


def test_two_launchers_form_one_world_and_complete(two_node_run):
    out, nodes = two_node_run
    for rank, proc in enumerate(nodes):
        assert proc.returncode == 0, f"node {rank} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        launcher_log = proc.stdout + proc.stderr
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in launcher_log, launcher_log[-3000:]
    assert (out / "adapter" / "adapter.safetensors").is_file(), "rank 0 (node 0) must write the adapter"
    assert (out / "done.json").is_file(), "the run must reach train.max_steps"
    for rank in (0, 1):
        steps = [r["step"] for r in step_records(out, rank)]
        assert steps == list(range(1, STEPS + 1)), f"rank {rank} logged steps {steps}"


def test_the_two_nodes_read_different_data(two_node_run):
    out, _ = two_node_run
    node0, node1 = step_records(out, 0), step_records(out, 1)
    same_domains = [a["domains"] == b["domains"] for a, b in zip(node0, node1)]
    same_load = [a["expert_load"] == b["expert_load"] for a, b in zip(node0, node1)]
    assert not all(same_domains), f"nodes drew the same domains at every step: {[a['domains'] for a in node0]}"
    assert not all(same_load), "nodes routed identically at every step: they must have read the same samples"
