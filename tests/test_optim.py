"""The optimizer builder: the fused AdamW it picks updates exactly as torch's reference AdamW does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mole.surgery import PROJECTOR_PREFIX
from mole.train.optim import build_optimizer, param_groups


def test_fused_adamw_takes_the_same_steps_as_the_reference_implementation():
    torch.manual_seed(0)
    start = torch.randn(1000)
    grads = [torch.randn(1000) for _ in range(5)]
    finals = []
    for fused in (True, False):
        param = nn.Parameter(start.clone())
        if fused:
            optimizer = build_optimizer([{"params": [param], "lr": 1e-2}], "adamw", 1e-2, weight_decay=0.1)
            assert optimizer.param_groups[0]["fused"], "the CPU has a fused AdamW: it should be used"
        else:
            optimizer = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1, foreach=False)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        finals.append(param.detach())
    assert not torch.equal(finals[1], start), "the steps moved nothing: the comparison would prove nothing"
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-6, atol=1e-7)


def test_param_groups_give_the_projector_its_own_learning_rate():
    model = nn.Module()
    model.adapter = nn.Linear(2, 2)
    model.frozen = nn.Linear(2, 2).requires_grad_(False)
    projector = nn.Linear(2, 2)
    model.add_module(PROJECTOR_PREFIX, projector)
    groups = param_groups(model, lr=1e-4, projector_lr=2e-5)
    assert [g["lr"] for g in groups] == [1e-4, 2e-5]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.adapter.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in projector.parameters()}


def test_router_lr_gives_the_routers_of_a_mole_model_a_group_of_their_own(tmp_path):
    from mole.config import load_config
    from mole.model import build_mole_model
    from tests.helpers import TINY_CONFIG

    model = build_mole_model(load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}"]), torch.float32)[0]
    names = {id(p): name for name, p in model.named_parameters()}
    plain = param_groups(model, lr=1e-4, projector_lr=2e-5)
    routed = param_groups(model, lr=1e-4, projector_lr=2e-5, router_lr=3e-3)
    assert [g["lr"] for g in plain] == [1e-4, 2e-5] and [g["lr"] for g in routed] == [1e-4, 2e-5, 3e-3]
    routers = {names[id(p)] for p in routed[2]["params"]}
    assert routers and all(".router." in name for name in routers), sorted(routers)
    assert len(routers) == 2 * sum(1 for name in names.values() if name.endswith("router.weight")), "weights and biases"
    assert not routers & {names[id(p)] for p in routed[0]["params"]}, "a router parameter in two groups"
    assert sum(len(g["params"]) for g in routed) == sum(len(g["params"]) for g in plain), "every parameter once"


def test_an_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="adamw or sgd, got 'lion'"):
        build_optimizer([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0}], "lion", 1.0, 0.0)


def test_fused_is_asked_up_front_and_survives_loading_an_unfused_state():
    from mole.train.optim import fused_supported, run_settings_kept

    assert not fused_supported([torch.zeros(2, dtype=torch.int64)]), "integer tensors have no fused AdamW"
    assert not fused_supported([]), "no parameters, nothing to fuse"
    params = [nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer([{"params": params, "lr": 0.1}], "adamw", 0.1, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    unfused = torch.optim.AdamW([nn.Parameter(torch.zeros(3))], lr=0.1).state_dict()
    with run_settings_kept(scheduler):
        optimizer.load_state_dict(unfused)
        assert not optimizer.param_groups[0]["fused"], "precondition: loading the state switched fused off"
    assert optimizer.param_groups[0]["fused"], "run_settings_kept must restore the fused choice after loading"


def test_a_resumed_schedule_takes_this_runs_rates_and_length_at_the_saved_step():
    """A 10-step run saved at step 10 (LR decayed to 0), resumed as a 20-step run with other rates."""
    from mole.train.optim import warmup_cosine
    from mole.train.optim import run_settings_kept

    def make(lr: float, projector_lr: float, weight_decay: float, total: int):
        groups = [{"params": [nn.Parameter(torch.ones(3))], "lr": lr}, {"params": [nn.Parameter(torch.ones(2))], "lr": projector_lr}]
        optimizer = build_optimizer(groups, "adamw", lr, weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, total))

    old_optimizer, old_scheduler = make(1e-3, 1e-4, 0.0, total=10)
    for _ in range(10):
        for group in old_optimizer.param_groups:
            group["params"][0].grad = torch.ones_like(group["params"][0])
        old_optimizer.step()
        old_scheduler.step()
    assert old_optimizer.param_groups[0]["lr"] == 0.0, "precondition: the old schedule ended at 0"
    optimizer, scheduler = make(5e-4, 2e-5, 0.1, total=20)
    with run_settings_kept(scheduler):
        optimizer.load_state_dict(old_optimizer.state_dict())
        scheduler.load_state_dict(old_scheduler.state_dict())
    factor = warmup_cosine(2, 20)(10)
    assert scheduler.last_epoch == 10, "the step count comes from the checkpoint"
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4 * factor, 2e-5 * factor])
    assert scheduler.get_last_lr() == pytest.approx([5e-4 * factor, 2e-5 * factor])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1], "this run's weight decay"
    assert optimizer.state, "the optimizer state comes from the checkpoint"
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * warmup_cosine(2, 20)(11))
