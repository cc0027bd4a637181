"""MoLE layer maths against per-token reference loops and against peft itself."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mole.balance import aux_loss, per_sample_loss, switch_loss
from mole.expert_kernels import grouped_mm_runs_on_cpu
from mole.experts import MoleMLP, RoutingContext, RoutingStats

HIDDEN, INTER, K, R = 16, 24, 3, 4


def make_mlp(num_experts=K, routing="hard", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=2, num_key_value_heads=2))
    context = RoutingContext()
    mlp = MoleMLP(base, HIDDEN, num_experts, R, alpha=8.0, dropout=dropout, routing=routing, context=context)
    for bank in mlp.experts.values():  # B starts at zero; make the experts differ
        nn.init.normal_(bank.lora_B, std=0.5)
    if mlp.router is not None:
        nn.init.normal_(mlp.router.weight, std=1.0)
    return mlp, context


def reference(mlp: MoleMLP, x: torch.Tensor) -> torch.Tensor:
    """Token by token: route, then apply that expert's (weighted) LoRA to each projection."""
    out = []
    for token in x.reshape(-1, HIDDEN):
        probs = mlp.router(token).softmax(-1)
        e = int(probs.argmax())

        def proj(name, v):
            bank = mlp.experts[name]
            delta = bank.lora_B[e] @ (bank.lora_A[e] @ v) * bank.scaling
            if mlp.routing == "scaled":
                delta = delta * probs[e]
            if mlp.routing == "dense":
                delta = sum(probs[j] * (bank.lora_B[j] @ (bank.lora_A[j] @ v)) for j in range(K)) * bank.scaling
            return getattr(mlp, name)(v) + delta

        h = mlp.act_fn(proj("gate_proj", token)) * proj("up_proj", token)
        out.append(proj("down_proj", h))
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("routing", ["hard", "scaled", "dense"])
def test_routing_and_scatter_equal_per_token_reference(routing):
    mlp, _ = make_mlp(routing=routing)
    x = torch.randn(2, 7, HIDDEN)
    got = mlp(x)
    want = reference(mlp, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{routing} MoLE != per-token loop")
    chosen = mlp.stats.count.sum(0)
    assert (chosen > 0).sum() >= 2, f"test needs tokens on several experts, got load {chosen.tolist()}"


@pytest.mark.parametrize("dispatch", ["never", "always"])
@pytest.mark.parametrize("routing", ["hard", "scaled"])
def test_inference_and_single_token_forwards_equal_the_reference(routing, dispatch):
    """Without autograd the experts run their forward math directly, and a single token (a decode step)
    skips the sort: both must still compute what the per-token reference does, on either dispatch."""
    if dispatch == "always":
        cpu_grouped_mm_or_skip()
    mlp, _ = make_mlp(routing=routing)
    mlp.grouped_mm = dispatch
    x = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        want = reference(mlp, x)
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5, msg="no-grad forward")
        for row in range(2):
            for col in (0, 6):
                token = x[row : row + 1, col : col + 1]
                torch.testing.assert_close(mlp(token), want[row : row + 1, col : col + 1], rtol=1e-5, atol=1e-5,
                                           msg=f"single token ({row}, {col})")
    token = x[:1, :1].clone().requires_grad_(True)
    mlp(token).sum().backward()  # a lone token with autograd: no permutation in the graph either
    assert token.grad is not None and mlp.experts["down_proj"].lora_B.grad.abs().sum() > 0


def test_dense_equals_explicit_weighted_sum_of_experts():
    mlp, _ = make_mlp(routing="dense")
    bank = mlp.experts["up_proj"]
    x = torch.randn(5, HIDDEN)
    weights = torch.softmax(torch.randn(5, K), -1)
    from mole.experts import Routes

    got = bank(x, Routes(dense_weights=weights))
    want = sum(weights[:, j : j + 1] * (x @ bank.lora_A[j].t() @ bank.lora_B[j].t()) for j in range(K)) * bank.scaling
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expert_with_no_tokens_runs_on_an_empty_slice_and_gets_zero_grad():
    mlp, _ = make_mlp(routing="hard")
    with torch.no_grad():
        mlp.router.weight.zero_()
        mlp.router.bias.copy_(torch.tensor([5.0, 0.0, -5.0]))  # everything to expert 0
    mlp(torch.randn(1, 6, HIDDEN)).sum().backward()
    grad = mlp.experts["gate_proj"].lora_B.grad
    assert grad is not None, "stacked expert parameters must always receive a gradient"
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0, "only the chosen expert learns"


def test_single_expert_equals_peft_lora_with_same_weights():
    from peft import LoraConfig, inject_adapter_in_model

    mlp, _ = make_mlp(num_experts=1)
    assert mlp.router is None, "plain LoRA has no router"
    torch.manual_seed(1)
    base = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=2, num_key_value_heads=2))
    base.load_state_dict({k: v for k, v in mlp.state_dict().items() if "experts" not in k})
    holder = nn.Module()
    holder.mlp = base
    peft_model = inject_adapter_in_model(
        LoraConfig(r=R, lora_alpha=8.0, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"]),
        holder,
    )
    with torch.no_grad():
        for name, bank in mlp.experts.items():
            layer = getattr(peft_model.mlp, name)
            layer.lora_A["default"].weight.copy_(bank.lora_A[0])
            layer.lora_B["default"].weight.copy_(bank.lora_B[0])
    x = torch.randn(2, 5, HIDDEN)
    torch.testing.assert_close(mlp(x), peft_model.mlp(x), rtol=1e-5, atol=1e-6, msg="K=1 must be peft LoRA")
    assert mlp.stats is None, "plain LoRA records no routing statistics"


def test_router_gets_lm_gradient_in_scaled_but_not_in_hard():
    for routing, expect_grad in [("scaled", True), ("hard", False)]:
        mlp, _ = make_mlp(routing=routing)
        mlp(torch.randn(2, 4, HIDDEN)).pow(2).sum().backward()
        grad = mlp.router.weight.grad
        has = grad is not None and grad.abs().sum() > 0
        assert has == expect_grad, f"{routing}: router LM gradient present={has}"


def test_hard_router_learns_from_aux_loss():
    mlp, context = make_mlp(routing="hard")
    mlp(torch.randn(2, 4, HIDDEN))
    switch_loss(context.stats()).backward()
    assert mlp.router.weight.grad.abs().sum() > 0, "aux loss must reach the router in hard mode"


def stats_from(probs, top, mask):
    """RoutingStats of one layer from hand-made (batch, seq, K) probs and (batch, seq) choices."""
    keep = mask.float().unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(top, probs.shape[-1]).float()
    return RoutingStats((probs * keep).sum(1), (onehot * keep).sum(1), mask.float().sum(1))


def test_switch_loss_hand_checked_value():
    # 4 tokens, K=2: top-1 = [0, 0, 0, 1] -> f = [0.75, 0.25]; mean probs P = [0.6, 0.4]
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]])
    top = torch.tensor([[0, 0, 0, 1]])
    loss = switch_loss([stats_from(probs, top, torch.ones(1, 4, dtype=torch.bool))])
    assert loss.item() == pytest.approx(2 * (0.75 * 0.6 + 0.25 * 0.4)), "K * sum f_e P_e"


def test_switch_loss_averages_the_layers_each_over_its_own_tokens():
    # one forward, 2 samples of 2 tokens, the second padded to 1 token. Layer 1: top-1 = [0, 0, 1] ->
    # f = [2/3, 1/3], P = [(0.9+0.6+0.2)/3, (0.1+0.4+0.8)/3]; layer 2: top-1 = [1, 1, 0] -> f = [1/3, 2/3]
    mask = torch.tensor([[True, True], [True, False]])
    first = stats_from(torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.2, 0.8], [0.5, 0.5]]]), torch.tensor([[0, 0], [1, 1]]), mask)
    expected_first = 2 * (2 / 3 * 1.7 / 3 + 1 / 3 * 1.3 / 3)
    probs = torch.tensor([[[0.3, 0.7], [0.1, 0.9]], [[0.8, 0.2], [0.5, 0.5]]])
    second = stats_from(probs, torch.tensor([[1, 1], [0, 0]]), mask)
    expected_second = 2 * (1 / 3 * 1.2 / 3 + 2 / 3 * 1.8 / 3)
    assert switch_loss([first]).item() == pytest.approx(expected_first)
    assert switch_loss([second]).item() == pytest.approx(expected_second)
    both = switch_loss([first, second])
    assert both.item() == pytest.approx((expected_first + expected_second) / 2), "the mean of the layers' losses"


def test_aux_loss_ignores_padding():
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]])
    top = torch.tensor([[0, 0, 0, 1]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    padded_probs = torch.cat([probs, torch.tensor([[[0.01, 0.99], [0.01, 0.99]]])], dim=1)
    padded_top = torch.cat([top, torch.tensor([[1, 1]])], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 2, dtype=torch.bool)], dim=1)
    for kind in ["switch", "per_sample"]:
        clean = aux_loss([stats_from(probs, top, mask)], kind)
        padded = aux_loss([stats_from(padded_probs, padded_top, padded_mask)], kind)
        assert padded.item() == pytest.approx(clean.item()), f"{kind} loss changed by padding"


def test_per_sample_loss_hand_checked_value():
    # sample 0: probs mean [0.75, 0.25], choices [1, 0] -> 0.75; sample 1: mean [0.3, 0.7], choices [0, 1] -> 0.7
    probs = torch.tensor([[[0.8, 0.2], [0.7, 0.3]], [[0.4, 0.6], [0.2, 0.8]]])
    top = torch.tensor([[0, 0], [1, 1]])
    loss = per_sample_loss([stats_from(probs, top, torch.ones(2, 2, dtype=torch.bool))])
    assert loss.item() == pytest.approx((0.75 + 0.7) / 2)


def test_mlp_masks_padding_from_context():
    mlp, context = make_mlp()
    x = torch.randn(2, 5, HIDDEN)
    context.token_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mlp(x)
    assert mlp.stats.tokens.tolist() == [3.0, 5.0]
    assert mlp.stats.count.sum().item() == 8.0


def test_stats_are_not_double_counted_under_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    mlp, context = make_mlp(routing="scaled")
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    mlp(x)
    plain = copy.deepcopy(mlp.stats.count)
    out = checkpoint(mlp, x, use_reentrant=False)
    loss = out.sum() + switch_loss(context.stats())
    loss.backward()  # re-runs the forward
    torch.testing.assert_close(mlp.stats.count, plain, msg="recompute must overwrite, not accumulate")
    assert mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("routing", ["hard", "scaled"])
def test_sparse_gradients_equal_per_token_reference(routing):
    """The hand-written backward of the sorted-token path against autograd through the per-token loop."""
    mlp, _ = make_mlp(routing=routing)
    x = torch.randn(2, 7, HIDDEN, requires_grad=True)
    grad_out = torch.randn(2, 7, HIDDEN)
    grads = []
    for forward in (mlp, lambda v: reference(mlp, v)):
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        forward(x).backward(grad_out)
        grads.append({"x": x.grad.clone(), **{n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}})
    got, want = grads
    assert got.keys() == want.keys(), f"gradients reach different tensors: {got.keys() ^ want.keys()}"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=f"{routing}: d/d{name} differs")


def cpu_grouped_mm_or_skip() -> None:
    if not grouped_mm_runs_on_cpu():
        pytest.skip(f"no CPU torch._grouped_mm in torch {torch.__version__}")


class HostReads(TorchDispatchMode):
    """Records the ops that copy a device value to the host (on a GPU each waits for the device),
    including ``bincount``, which on a CPU reads its range without a dispatched op but on a GPU
    copies its input's min and max back to the host."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero",
               "bincount")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.seen.append(name)
        elif name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.seen.append("index by a boolean mask")  # its size depends on the mask's values
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("routing, loss", [("hard", "switch"), ("scaled", "switch"), ("scaled", "per_sample")])
def test_grouped_path_never_reads_the_device_from_the_host(routing, loss, monkeypatch):
    """The grouped path exists to keep a GPU's host running ahead of the device: nothing in its
    forward, its routing statistics, the balance loss or the backward may bring a value back to the
    host (``torch.bincount`` does, twice; ``.tolist()``/``.item()`` do, outside the dispatcher)."""
    cpu_grouped_mm_or_skip()
    mlp, context = make_mlp(routing=routing)
    mlp.grouped_mm = "always"
    context.token_mask = torch.ones(2, 9, dtype=torch.bool)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    with HostReads() as reads:
        for method in ("tolist", "item"):
            original = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, lambda t, *a, _m=method, _o=original: reads.seen.append(_m) or _o(t, *a))
        (mlp(x).sum() + aux_loss(context.stats(), loss)).backward()
        monkeypatch.undo()
    assert reads.seen == [], f"host reads: {reads.seen}"
    assert x.grad is not None and all(bank.lora_A.grad is not None for bank in mlp.experts.values()), "backward ran"


def test_grouped_mm_path_equals_per_expert_loop():
    """The grouped-GEMM dispatch (no host sync; a GPU's default) computes what the per-expert loop does,
    including an exact zero gradient for an expert without tokens. Runs where torch has a CPU
    ``_grouped_mm`` (torch >= 2.9)."""
    cpu_grouped_mm_or_skip()
    loop, _ = make_mlp(routing="scaled")
    with torch.no_grad():
        loop.router.bias.copy_(torch.tensor([0.0, -50.0, 0.0]))  # expert 1 gets no token
    grouped = copy.deepcopy(loop)
    loop.grouped_mm, grouped.grouped_mm = "never", "always"
    x = torch.randn(2, 9, HIDDEN)
    grad_out = torch.randn(2, 9, HIDDEN)
    outs = []
    for mlp in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        out = mlp(xi)
        out.backward(grad_out)
        outs.append((out, xi.grad, {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None}))
    assert loop.stats.count.sum(0)[1] == 0, "precondition: expert 1 routed no token"
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5, msg="outputs differ")
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5, msg="input gradients differ")
    for name, grad in outs[0][2].items():
        torch.testing.assert_close(outs[1][2][name], grad, rtol=1e-4, atol=1e-5, msg=f"d/d{name} differs")
        if "lora" in name:
            assert outs[1][2][name][1].abs().sum() == 0, f"{name}: the idle expert's gradient must be exactly 0"


def expert_output(mlp: MoleMLP, token: torch.Tensor, e: int) -> torch.Tensor:
    """The MLP's output for one token sent through expert ``e`` alone, at weight 1."""

    def proj(name, v):
        bank = mlp.experts[name]
        return getattr(mlp, name)(v) + bank.lora_B[e] @ (bank.lora_A[e] @ v) * bank.scaling

    return proj("down_proj", mlp.act_fn(proj("gate_proj", token)) * proj("up_proj", token))


def test_domain_routing_sends_every_token_of_a_sample_to_its_domains_expert_only():
    mlp, context = make_mlp(routing="domain")
    assert mlp.router is None, "routing domain trains no router"
    x = torch.randn(3, 5, HIDDEN)
    context.route(torch.tensor([2, 0, 2]))  # the rows' (samples') domains
    out = mlp(x)
    for row, e in enumerate([2, 0, 2]):
        for t in range(5):
            torch.testing.assert_close(out[row, t], expert_output(mlp, x[row, t], e), rtol=1e-5, atol=1e-5,
                                       msg=f"row {row} token {t} is not expert {e}'s output")
    assert mlp.stats.count.tolist() == [[0, 0, 5], [5, 0, 0], [0, 0, 5]], "one-hot by domain, per sample"
    assert not mlp.stats.prob_sum.requires_grad, "the fixed assignment carries no gradient (no aux loss)"
    out.sum().backward()
    for name, bank in mlp.experts.items():
        for param in (bank.lora_A, bank.lora_B):
            norms = param.grad.flatten(1).norm(dim=1)
            assert norms[0] > 0 and norms[2] > 0 and norms[1] == 0, f"{name}: gradient per expert {norms.tolist()}"


def test_domain_routing_follows_packed_sample_ids_and_refuses_a_forward_without_domains():
    mlp, context = make_mlp(routing="domain")
    x = torch.randn(1, 6, HIDDEN)
    with pytest.raises(RuntimeError, match="routes by domain"):
        mlp(x)
    context.pack(torch.tensor([[0, 0, 1, 1, 1, -1]]), num_samples=2)
    context.route(torch.tensor([1, 2]))
    out = mlp(x)
    for t, e in enumerate([1, 1, 2, 2, 2]):
        torch.testing.assert_close(out[0, t], expert_output(mlp, x[0, t], e), rtol=1e-5, atol=1e-5)
    assert mlp.stats.count.tolist() == [[0, 2, 0], [0, 0, 3]], "padding is counted nowhere"
    context.route(0)  # one domain for every token: generation
    torch.testing.assert_close(mlp(x)[0, 5], expert_output(mlp, x[0, 5], 0), rtol=1e-5, atol=1e-5)


def test_router_entropy_is_summed_per_sample_over_its_real_tokens_and_zero_under_domain_routing():
    mlp, context = make_mlp(routing="scaled")
    x = torch.randn(1, 6, HIDDEN)
    context.pack(torch.tensor([[0, 0, 1, 1, 1, -1]]), num_samples=2)
    mlp(x)
    probs = mlp.router(x[0]).float().softmax(-1)
    per_token = -(probs * probs.log()).sum(-1)
    expected = torch.stack([per_token[:2].sum(), per_token[2:5].sum()])
    torch.testing.assert_close(mlp.stats.entropy_sum, expected, rtol=1e-5, atol=1e-6)
    oracle, context = make_mlp(routing="domain")
    context.pack(torch.tensor([[0, 0, 1, 1, 1, -1]]), num_samples=2)
    context.route(torch.tensor([1, 2]))
    oracle(x)
    assert oracle.stats.entropy_sum.tolist() == [0.0, 0.0], "a one-hot choice has no entropy"


def prefix_reference(x: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Token by token: the mean of the MLP inputs of the token's sample up to it (padding: anything)."""
    out = torch.zeros_like(x)
    for row in range(x.shape[0]):
        for t in range(x.shape[1]):
            s = int(samples[row, t])
            if s >= 0:
                same = [u for u in range(t + 1) if int(samples[row, u]) == s]
                out[row, t] = x[row, same].mean(0)
    return out


def test_prefix_mean_routes_each_token_by_its_packed_sample_so_far():
    mlp, context = make_mlp(routing="scaled")
    mlp.router_input = "prefix_mean"
    x = torch.randn(2, 6, HIDDEN)
    sample_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 3, -1, -1]])
    context.pack(sample_ids, num_samples=4)
    mlp(x)
    features = prefix_reference(x, sample_ids).reshape(-1, HIDDEN)
    expected = mlp.router(features).softmax(-1)
    probs = mlp._routing[0]
    real = sample_ids.reshape(-1) >= 0
    torch.testing.assert_close(probs[real], expected[real], rtol=1e-5, atol=1e-6)
    token_routed = mlp.router(x.reshape(-1, HIDDEN)).softmax(-1)
    assert not torch.allclose(probs[real], token_routed[real]), "the test would pass with token routing"


def test_prefix_mean_decode_steps_continue_the_prompt_as_one_full_forward_routes_it():
    """Under a KV cache a decode step sees one token and a longer attention mask: it must be routed by its
    whole row so far, exactly as a forward of the full (left-padded) sequence routes that token."""
    mlp, context = make_mlp(routing="scaled")
    mlp.router_input = "prefix_mean"
    x = torch.randn(2, 7, HIDDEN)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    context.token_mask = mask
    full = mlp(x)
    full_probs = mlp._routing[0].view(2, 7, -1)
    context.token_mask = mask[:, :5]
    mlp(x[:, :5])  # the prompt
    for t in (5, 6):  # two decode steps
        context.token_mask = mask[:, : t + 1]
        step = mlp(x[:, t : t + 1])
        torch.testing.assert_close(mlp._routing[0], full_probs[:, t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    context.token_mask = torch.ones(2, 9, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="continues 8 earlier positions of 2 rows that this layer did not see"):
        mlp(x[:, :1])


def test_prefix_mean_needs_a_learned_router():
    base = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="needs a learned router"):
        MoleMLP(base, HIDDEN, 3, R, alpha=8.0, dropout=0.0, routing="domain", context=RoutingContext(),
                router_input="prefix_mean")
