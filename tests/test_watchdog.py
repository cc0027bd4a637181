"""The watchdog: a stuck rank ends the job with every rank's last phase, and nothing of the run is left."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import psutil
import pytest

from mole.config import load_config
from mole.data.stream import Domain, MixedStream
from mole.train.watchdog import EXIT_CODE, Phase, Watchdog
from tests.helpers import REPO, TINY_CONFIG, cli_env, run_group, text_sample, training_command, write_shard


class DictStore:
    """The two store calls the watchdog makes, over a dict."""

    def __init__(self):
        self.values: dict[str, bytes] = {}

    def set(self, key, value):
        self.values[key] = value.encode()

    def check(self, keys):
        return all(key in self.values for key in keys)

    def get(self, key):
        return self.values[key]


def test_phase_names_the_step_and_the_shard_being_read():
    phase = Phase()
    phase.step = 7
    phase.reading("charts", "/data/charts-000001.tar")
    what, data, _ = phase.current()
    assert (what, data) == ("step 7: data (domain charts, shard /data/charts-000001.tar)", True)
    phase.enter("forward/backward")
    assert phase.current()[:2] == ("step 7: forward/backward", False)


def test_each_phase_is_held_to_its_own_limit():
    phase = Phase()
    dog = Watchdog(phase, rank=0, world_size=1, data_timeout_s=10, step_timeout_s=100)
    phase.enter("data", data=True)
    since = phase.current()[2]
    assert dog.overdue(since + 9) is None
    assert "over train.data_timeout_s=10" in dog.overdue(since + 11)
    phase.enter("forward/backward")
    since = phase.current()[2]
    assert dog.overdue(since + 50) is None, "the data limit must not apply outside the data phase"
    assert "over train.step_timeout_s=100" in dog.overdue(since + 101)
    off = Watchdog(phase, rank=0, world_size=1, data_timeout_s=0, step_timeout_s=0)
    assert off.overdue(since + 1e6) is None, "0 disables both limits"


def test_report_names_a_silent_rank_and_how_long_it_has_been_silent():
    store = DictStore()
    phase = Phase()
    phase.step = 3
    phase.enter("forward/backward")
    dog = Watchdog(phase, rank=0, world_size=3, data_timeout_s=10, step_timeout_s=10, store=store)
    store.set("rank1", json.dumps({"phase": "step 3: data (domain a, shard x.tar)", "for": 5.0, "at": time.time() - 42}))
    lines = dog.report()
    assert lines[0].startswith("rank 0: step 3: forward/backward for "), lines
    assert lines[1].startswith("rank 1: step 3: data (domain a, shard x.tar) for 47 s"), lines
    assert lines[1].endswith("(no report for 42 s)"), lines
    assert lines[2] == "rank 2: no report at all (never reached training)", lines


def test_stream_reports_each_read_with_its_domain_and_shard(tmp_path):
    from transformers import AutoProcessor

    from mole.data.sample import SampleProcessor

    shard = write_shard(tmp_path / "a.tar", [text_sample(f"s{i}", "q?", "a.") for i in range(3)])
    process = SampleProcessor(AutoProcessor.from_pretrained(REPO / "models" / "tiny-llava"), 64, "pad")
    reads: list[tuple[str, str]] = []
    stream = MixedStream([Domain("alpha", [str(shard)], 1.0)], process, batch_size=2, pad_token_id=0, seed=0, rank=0,
                         shuffle_buffer=0, on_read=lambda domain, url: reads.append((domain, url)))
    next(iter(stream))
    assert reads[:2] == [("alpha", str(shard))] * 2, reads


def test_collective_timeout_follows_the_step_limit_unless_set():
    cfg = load_config(str(TINY_CONFIG), [])
    assert (cfg.train.data_timeout_s, cfg.train.step_timeout_s) == (300, 1800)
    assert cfg.train.collective_seconds() == 1860, "the watchdog's report must come before a collective's timeout"
    assert load_config(str(TINY_CONFIG), ["train.step_timeout_s=0"]).train.collective_seconds() == 1800
    assert load_config(str(TINY_CONFIG), ["train.collective_timeout_s=90"]).train.collective_seconds() == 90


# ------------------------------------------------------------------------------- real 2-rank runs


def run_processes(*needles: str) -> list[str]:
    """Command lines of live processes that mention any of ``needles``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            line = " ".join(process.info["cmdline"] or [])
        except psutil.Error:
            continue
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(needle in line for needle in needles):
            found.append(f"{process.pid}: {line[:200]}")
    return found


def assert_nothing_left(*needles: str) -> None:
    deadline = time.monotonic() + 20
    while (left := run_processes(*needles)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the run left behind: {left}"


@pytest.mark.distributed
def test_stalled_shard_source_ends_the_job_naming_every_ranks_phase(tmp_path):
    blocker = f"sleep {random.randrange(10**6, 10**7)}"  # a pipe: source that connects and never delivers
    out = tmp_path / "run"
    cmd = training_command(out, f'data.domains=[{{name: stalled, shards: "pipe:{blocker}"}}]', "train.data_timeout_s=8",
                           "train.max_steps=5")
    started = time.monotonic()
    proc = run_group(cmd, 150, env=cli_env())
    took = time.monotonic() - started
    assert proc.returncode == EXIT_CODE, f"expected the watchdog's exit {EXIT_CODE}, got {proc.returncode}:\n{proc.stderr[-3000:]}"
    for rank in (0, 1):
        line = f"rank {rank}: step 1: data (domain stalled, shard pipe:{blocker}) for "
        assert line in proc.stderr, f"no {line!r} in the report:\n{proc.stderr[-3000:]}"
    assert "over train.data_timeout_s=8" in proc.stderr, proc.stderr[-3000:]
    assert took < 120, f"the job took {took:.0f} s to end"
    assert_nothing_left(blocker, str(out))


@pytest.mark.distributed
def test_a_stopped_rank_is_reported_by_the_other_and_the_job_ends(tmp_path):
    out = tmp_path / "run"
    cmd = training_command(out, "train.step_timeout_s=10", "train.max_steps=2000", "train.save_every=0",
                           "train.eval_every=0", "train.log_routing_every=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stopped = None
    try:
        rank1_log = out / "logs" / "rank1.jsonl"
        deadline = time.monotonic() + 150
        while not (rank1_log.exists() and '"loss"' in rank1_log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        time.sleep(6)  # rank 1's watchdog has published a training phase (every 2.5 s here)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
        assert len(ranks) == 1, f"rank 1 not found among {[p.cmdline() for p in psutil.Process(proc.pid).children(True)]}"
        stopped = ranks[0]
        stopped.send_signal(signal.SIGSTOP)
        when = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - when
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        if stopped is not None and stopped.is_running():
            stopped.send_signal(signal.SIGKILL)
            stopped.send_signal(signal.SIGCONT)
    assert proc.returncode == EXIT_CODE, f"expected the watchdog's exit {EXIT_CODE}, got {proc.returncode}:\n{stderr[-3000:]}"
    assert "watchdog: rank 0 spent" in stderr and "over train.step_timeout_s=10" in stderr, stderr[-3000:]
    report = [line for line in stderr.splitlines() if line.startswith("rank 1: step ")]
    assert report and "(no report for " in report[-1], f"rank 1 not reported as silent:\n{stderr[-3000:]}"
    assert took < 90, f"the job took {took:.0f} s to end after rank 1 stopped"
    assert_nothing_left(str(out))
