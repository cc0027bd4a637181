"""A real 2-rank ZeRO-3 run of tiny.yaml with a text-only domain and a partly bad one (corrupt samples
among good ones, plus a truncated shard), read by 2 DataLoader workers per rank: it finishes every
step and reports the skips. One launch, shared by the assertions."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from tests.helpers import REPO, launch_training, step_records, summed_over_ranks, text_sample, write_shard

pytestmark = pytest.mark.distributed

STEPS = 6
EXPECTED_REASONS = {"invalid_json", "non_utf8", "broken_image", "no_answer", "image_missing", "corrupt_tar"}


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def good_image_sample(key: str, colour) -> dict:
    return {"__key__": key, "jpg": jpeg(colour), "json": {"conversations": [
        {"from": "human", "value": "<image>\nWhat color is the main object?"}, {"from": "gpt", "value": "red"}]}}


def messy_samples(prefix: str, rounds: int) -> list[dict]:
    samples = []
    for i in range(rounds):
        samples += [
            good_image_sample(f"{prefix}good{i}", (200, 20 * i, 30)),
            {"__key__": f"{prefix}json{i}", "json": b"{broken"},
            text_sample(f"{prefix}text{i}", "Is a circle round?", "yes"),
            {"__key__": f"{prefix}utf{i}", "json": b'{"conversations": "\xff"}'},
            {"__key__": f"{prefix}img{i}", "jpg": b"\xff\xd8 not a jpeg",
             "json": {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}},
            {"__key__": f"{prefix}ans{i}", "json": {"conversations": [{"from": "human", "value": "q"}]}},
            {"__key__": f"{prefix}noimg{i}", "json": {"conversations": [{"from": "human", "value": "<image>\nq"},
                                                                     {"from": "gpt", "value": "a"}]}},
        ]
    return samples


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy_data")
    text = write_shard(root / "text" / "train-000000.tar",
                       [text_sample(f"t{i}", f"How many sides has shape {i}?", f"{3 + i % 4} sides") for i in range(40)])
    # small shards, so that every consumer draws several: one whole, two truncated mid-shard
    write_shard(root / "messy" / "train-000000.tar", messy_samples("a", rounds=1))
    for shard in (1, 2):
        whole = write_shard(root / "messy" / "whole.tar", messy_samples(f"b{shard}", rounds=2)).read_bytes()
        (root / "messy" / f"train-00000{shard}.tar").write_bytes(whole[: len(whole) // 2 + 700])
    domains = (
        f'data.domains=[{{name: shapes, shards: "{REPO}/data_shards/shapes/train-{{000000..000001}}.tar"}},'
        f' {{name: text, shards: "{text}"}}, {{name: messy, shards: "{root}/messy/train-{{000000..000002}}.tar", weight: 2}}]'
    )
    out = root / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(REPO))  # the ranks import this checkout's mole, whatever is pip-installed
        proc = launch_training(out, f"train.max_steps={STEPS}", domains, "data.num_workers=2",
                               "data.shuffle_buffer=0")  # no buffer: skips are counted as soon as they are read
    return out, proc


def test_every_rank_finishes_every_step_despite_bad_data(messy_run):
    out, _ = messy_run
    for rank in (0, 1):
        records = step_records(out, rank)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), f"rank {rank} did not run every step"
        assert all(math.isfinite(r["loss"]) for r in records), [r["loss"] for r in records]


def test_skips_are_counted_per_domain_and_reason_in_the_rank_logs(messy_run):
    out, proc = messy_run
    skipped = summed_over_ranks(out, "skipped")
    reasons = {key.split("/", 1)[1] for key in skipped if key.startswith("messy/")}
    assert reasons >= EXPECTED_REASONS, f"missing skip reasons {EXPECTED_REASONS - reasons}; got {dict(skipped)}"
    assert not [key for key in skipped if not key.startswith("messy/")], f"good domains reported skips: {dict(skipped)}"
    log = proc.stdout + proc.stderr
    assert "data domain 'messy': skipping" in log and "further ones are only counted" in log, "first skip per reason is logged"


def test_text_only_and_partly_bad_domains_train_alongside_the_image_domain(messy_run):
    out, _ = messy_run
    domains = summed_over_ranks(out, "domains")
    assert set(domains) == {"shapes", "text", "messy"} and min(domains.values()) >= 3, f"samples per domain: {dict(domains)}"
