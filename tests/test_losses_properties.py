"""Properties of the loss core: invariants, gradients, dtypes, extremes, state, combination and error messages."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpref.losses import Scores, available_losses, build_loss, get_loss

FAST = settings(max_examples=20, deadline=None, derandomize=True)
UNPAIRED = ["kto", "bco"]
GROUPED = [n for n in available_losses() if n not in UNPAIRED and n != "kl"]
# set is one softmax per group, not a mean over pairs; so is logic by default (a plain Yl means every loser)
PAIRWISE = [n for n in GROUPED if n not in ("set", "logic")]
SCALE = {"tau": 0.1, "gamma": 0.05, "alpha": 1.0, "lam": 0.1, "delta": 1.0}  # the param playing beta's role


def scale_of(name: str) -> float:
    loss = get_loss(name)
    for key in ("beta", "tau", "gamma", "alpha", "lam"):
        if key in loss.params:
            return 0.1 if loss.params[key] is None else loss.params[key]  # logic: beta None means 0.1
    return 1.0


def grouped(b: int = 3, k: int = 1, seed: int = 0, dtype=torch.float64, grad: bool = True) -> Scores:
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, 1 + k, generator=g, dtype=torch.float64) * 20 - 0.1
    lr = -torch.rand(b, 1 + k, generator=g, dtype=torch.float64) * 20 - 0.1
    n = torch.randint(1, 30, (b, 1 + k), generator=g).to(torch.float64)
    kl_p = -torch.rand(4, generator=g, dtype=torch.float64) * 10
    kl_r = -torch.rand(4, generator=g, dtype=torch.float64) * 10
    return Scores(policy=lp.to(dtype).requires_grad_(grad), reference=lr.to(dtype), lengths=n, kl_policy=kl_p,
                  kl_reference=kl_r)


def unpaired(b: int = 6, seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores(
        policy=(-torch.rand(b, generator=g, dtype=torch.float64) * 20).requires_grad_(),
        reference=-torch.rand(b, generator=g, dtype=torch.float64) * 20,
        labels=torch.arange(b) % 2 == 0,
        kl_policy=-torch.rand(b, generator=g, dtype=torch.float64) * 10,
        kl_reference=-torch.rand(b, generator=g, dtype=torch.float64) * 10,
    )


def swap(s: Scores) -> Scores:
    flip = lambda t: None if t is None else t.detach().flip(1)  # noqa: E731  (K = 1: winner <-> loser)
    return Scores(policy=flip(s.policy).requires_grad_(), reference=flip(s.reference), lengths=flip(s.lengths),
                  kl_policy=s.kl_policy, kl_reference=s.kl_reference)


def with_h(h: float, shift: float = 0.0) -> Scores:
    """One pair whose margin h = r_w - r_l is exactly ``h`` (float64)."""
    return Scores(policy=torch.tensor([[-2.0 + shift, -3.0]], dtype=torch.float64, requires_grad=True),
                  reference=torch.tensor([[-2.0 + shift - h, -3.0]], dtype=torch.float64))


# ----- Bradley-Terry family -------------------------------------------------------------------------------------
@FAST
@given(st.floats(-50, 0), st.floats(-50, 0), st.floats(-5, 5), st.floats(0.01, 100))
def test_dpo_at_zero_margin_is_log2(a, b, c, beta):
    s = Scores(policy=torch.tensor([[a, b]], dtype=torch.float64),
               reference=torch.tensor([[a + c, b + c]], dtype=torch.float64))
    assert get_loss("dpo", beta=beta)(s).loss.item() == pytest.approx(math.log(2), rel=1e-12)


@FAST
@given(st.integers(0, 10_000), st.sampled_from(["cdpo", "rdpo"]), st.floats(0.01, 10))
def test_smoothed_dpo_at_e0_is_dpo(seed, name, beta):
    s = grouped(seed=seed, k=2)
    assert get_loss(name, beta=beta, e=0.0)(s).loss.item() == pytest.approx(
        get_loss("dpo", beta=beta)(s).loss.item(), rel=1e-12)


def test_rdpo_is_unbiased_under_random_flips():
    """E over flips (rate e) of rdpo on noisy labels == clean dpo (Monte Carlo, 200k draws)."""
    e, beta, n = 0.2, 1.0, 200_000
    g = torch.Generator().manual_seed(0)
    clean = grouped(b=4, seed=1)
    lp, lr = clean.policy.detach().repeat(n // 4, 1), clean.reference.repeat(n // 4, 1)
    flip = torch.rand(n, generator=g) < e
    noisy_lp, noisy_lr = torch.where(flip[:, None], lp.flip(1), lp), torch.where(flip[:, None], lr.flip(1), lr)
    noisy = Scores(policy=noisy_lp, reference=noisy_lr)
    per = get_loss("rdpo", beta=beta, e=e)(noisy).per_sample
    exact = get_loss("dpo", beta=beta)(clean).loss.item()
    stderr = per.std().item() / math.sqrt(n)
    assert per.mean().item() == pytest.approx(exact, abs=4 * stderr)
    # and the non-robust DPO on the same noisy labels is measurably biased
    assert abs(get_loss("dpo", beta=beta)(noisy).loss.item() - exact) > 0.05


def test_ipo_minimised_at_half_inverse_tau():
    tau = 0.25
    h_star = 1 / (2 * tau)
    loss = get_loss("ipo", tau=tau, form="sum")
    s = with_h(h_star)
    out = loss(s)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0, abs=1e-20)
    assert s.policy.grad.abs().max().item() < 1e-12
    for d in (-0.1, 0.1):
        assert loss(with_h(h_star + d)).loss.item() > 0


@FAST
@given(st.integers(0, 10_000), st.floats(0.01, 10))
def test_set_with_one_loser_is_dpo(seed, beta):
    s = grouped(seed=seed)
    assert get_loss("set", beta=beta)(s).per_sample.tolist() == pytest.approx(
        get_loss("dpo", beta=beta)(s).per_sample.tolist(), rel=1e-10)


# ----- properties of every grouped loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", GROUPED)
def test_swapping_winner_and_loser_flips_rewards(name):
    s = grouped(seed=3)
    a, b = get_loss(name)(s), get_loss(name)(swap(s))
    torch.testing.assert_close(a.rewards.flip(1), b.rewards)
    assert b.metrics["rewards/margins"].item() == pytest.approx(-a.metrics["rewards/margins"].item())
    assert a.metrics["rewards/accuracies"].item() + b.metrics["rewards/accuracies"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", GROUPED + UNPAIRED + ["kl"])
def test_gradients_reach_policy_only(name):
    s = unpaired() if name in UNPAIRED else grouped(k=2)
    s.reference.requires_grad_()
    s.kl_reference.requires_grad_()
    s.kl_policy.requires_grad_()  # the policy's own samples: the kl regulariser trains through them
    s.lengths = None if s.lengths is None else s.lengths.requires_grad_()
    out = get_loss(name)(s)
    out.loss.backward()
    assert s.reference.grad is None and s.kl_reference.grad is None
    assert s.lengths is None or s.lengths.grad is None
    trained = s.kl_policy if name == "kl" else s.policy
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    if name == "kto":
        assert s.kl_policy.grad is None  # z0 is detached
    assert not out.rewards.requires_grad and all(not v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("name", GROUPED + UNPAIRED)
def test_bf16_inputs_give_the_float32_result(name):
    base = unpaired() if name in UNPAIRED else grouped(k=2)
    ref = {}
    for dtype in (torch.float32, torch.bfloat16):
        s = Scores(**{**base.__dict__, "policy": base.policy.detach().to(torch.bfloat16).to(dtype),
                      "reference": base.reference.to(torch.bfloat16).to(dtype)})
        out = get_loss(name)(s)
        assert out.loss.dtype == torch.float32
        ref[dtype] = out.loss.item()
    assert ref[torch.bfloat16] == pytest.approx(ref[torch.float32], rel=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", GROUPED + UNPAIRED + ["kl"])
def test_finite_at_extreme_margins(name, sign):
    """|scale * h| = 1e4 (scale = beta, tau, gamma, alpha or lam): loss and gradients stay finite, in float32."""
    h = sign * 1e4 / scale_of(name)
    if name in UNPAIRED:
        s = Scores(policy=torch.tensor([-1.0, -1.0 - h]).requires_grad_(), reference=torch.tensor([-1.0, -1.0]),
                   labels=torch.tensor([True, False]), kl_policy=torch.tensor([0.0, -h]), kl_reference=torch.zeros(2))
    else:
        lp = torch.tensor([[-1.0, -1.0 - abs(h)]]) if sign > 0 else torch.tensor([[-1.0 - abs(h), -1.0]])
        s = Scores(policy=lp.requires_grad_(), reference=torch.tensor([[-1.0, -1.0]]), lengths=torch.ones(1, 2),
                   kl_policy=torch.tensor([-1.0, -1.0 - h], requires_grad=True), kl_reference=torch.zeros(2))
    out = get_loss(name)(s)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_sample).all()
    grad = s.kl_policy.grad if name == "kl" else s.policy.grad
    assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", PAIRWISE)
def test_k_losers_is_the_mean_of_k_pair_calls(name):
    s = grouped(b=3, k=3, seed=7)
    full = get_loss(name)(s)
    parts = []
    for j in range(1, 4):
        cols = [0, j]
        parts.append(get_loss(name)(Scores(policy=s.policy[:, cols], reference=s.reference[:, cols],
                                           lengths=s.lengths[:, cols])).per_sample)
    assert full.per_sample.tolist() == pytest.approx(torch.stack(parts).mean(0).tolist(), rel=1e-10)


def test_accuracies_count_ties_as_half():
    s = Scores(policy=torch.tensor([[-1.0, -1.0], [-1.0, -2.0]]), reference=torch.zeros(2, 2))
    assert get_loss("dpo")(s).metrics["rewards/accuracies"].item() == pytest.approx(0.75)


def test_reward_metrics_report_scaled_rewards():
    s = grouped(seed=5)
    out = get_loss("dpo", beta=0.5)(s)
    torch.testing.assert_close(out.rewards, 0.5 * (s.policy - s.reference).detach())
    assert out.metrics["rewards/chosen"].item() == pytest.approx(out.rewards[:, 0].mean().item())


# ----- unpaired, state, distributed -------------------------------------------------------------------------------
def test_bco_state_round_trip():
    a = get_loss("bco")
    for seed in range(3):
        a(unpaired(seed=seed))
    b = get_loss("bco")
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"delta", "desirable_delta", "desirable_count", "undesirable_delta",
                                   "undesirable_count"}
    with torch.no_grad():  # evaluation: no update, same stored delta
        assert b(unpaired(seed=9)).loss.item() == a(unpaired(seed=9)).loss.item()
    assert b.state_dict()["delta"].item() == a.state_dict()["delta"].item()
    # training continues identically
    assert a(unpaired(seed=4)).metrics["bco/delta"].item() == b(unpaired(seed=4)).metrics["bco/delta"].item()
    # a combined objective saves and restores its terms' state too
    c, d = build_loss({"bco": 1.0, "sft": 0.1}), build_loss({"bco": 1.0, "sft": 0.1})
    c(unpaired(seed=1))
    d.load_state_dict(c.state_dict())
    assert d.terms[0][1].state_dict()["delta"].item() == c.terms[0][1].state_dict()["delta"].item()


def test_bco_does_not_update_without_grad():
    loss = get_loss("bco")
    with torch.no_grad():
        out = loss(unpaired())
    assert loss.state_dict() == {} and out.metrics["bco/delta"].item() == 0.0


def _z0_worker(rank: int, world: int, init: str, q) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    gap = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7.0])][rank]  # uneven shards: global mean 13/4
    s = Scores(policy=torch.tensor([-1.0]), reference=torch.tensor([-1.0]), labels=torch.tensor([True]),
               kl_policy=gap, kl_reference=torch.zeros_like(gap))
    q.put((rank, get_loss("kto")(s).metrics["kl/z0"].item()))
    dist.destroy_process_group()


def test_kto_z0_is_all_reduced(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path / 'pg'}"
    procs = [ctx.Process(target=_z0_worker, args=(r, 2, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: pytest.approx(3.25), 1: pytest.approx(3.25)}


# ----- combination ------------------------------------------------------------------------------------------------
def test_combined_equals_weighted_sum():
    s1, s2, s3 = grouped(seed=2), grouped(seed=2), grouped(seed=2)
    combined = build_loss({"dpo": 1.0, "sft": 0.005})(s1)
    dpo, sft = get_loss("dpo")(s2), get_loss("sft")(s3)
    assert combined.loss.item() == pytest.approx(dpo.loss.item() + 0.005 * sft.loss.item(), rel=1e-12)
    assert combined.per_sample.tolist() == pytest.approx((dpo.per_sample + 0.005 * sft.per_sample).tolist())
    combined.loss.backward()
    dpo.loss.backward()
    sft.loss.backward()
    torch.testing.assert_close(s1.policy.grad, s2.policy.grad + 0.005 * s3.policy.grad)
    assert combined.metrics["loss/dpo"].item() == dpo.loss.item()
    assert combined.metrics["loss/sft"].item() == sft.loss.item()
    assert combined.rewards.tolist() == dpo.rewards.tolist()


def test_nested_spec_and_requirement_flags():
    loss = build_loss({"sft": {"weight": 0.5, "form": "mean"}, "ipo": {"tau": 0.2, "form": "sum"}})
    assert loss.needs_reference and loss.needs_lengths and not loss.needs_kl and not loss.unpaired
    assert loss.terms[1][1].params["tau"] == 0.2
    assert not get_loss("ipo", form="sum").needs_lengths and get_loss("ipo").needs_lengths
    assert build_loss({"spo": 1.0, "kl": {"beta": 0.05}}).needs_kl
    assert build_loss({"kto": 1.0, "sft": 0.1}).unpaired
    # reward metrics come from the preference head even when the regulariser is listed first
    s = grouped()
    assert loss(s).rewards.tolist() == get_loss("ipo", tau=0.2, form="sum")(s).rewards.tolist()


def test_pure_sft_phase_needs_no_reference_nor_lengths():
    loss = build_loss({"sft": 1.0})
    assert not loss.needs_reference and not loss.needs_lengths
    lp = torch.tensor([[-3.0, -5.0]], requires_grad=True)
    out = loss(Scores(policy=lp))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(3.0)
    assert lp.grad.tolist() == [[-1.0, 0.0]]


# ----- errors name their argument --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: get_loss("dpoo"), KeyError, ["'dpoo'", "available"]),
        (lambda: get_loss("dpo", bta=0.1), TypeError, ["bta", "beta"]),
        (lambda: get_loss("rdpo", e=0.5), ValueError, ["e=0.5", "[0, 0.5)"]),
        (lambda: get_loss("cdpo", e=-0.1), ValueError, ["e=-0.1"]),
        (lambda: get_loss("dpo", beta=0.0), ValueError, ["beta=0.0"]),
        (lambda: get_loss("dpo", beta="0.1"), ValueError, ["beta='0.1'"]),
        (lambda: get_loss("ipo", form="avg"), ValueError, ["form='avg'", "mean"]),
        (lambda: get_loss("bco", momentum=1.0), ValueError, ["momentum=1.0"]),
        (lambda: build_loss({"rdpo": {"e": 0.7}}), ValueError, ["loss.rdpo", "e=0.7"]),
        (lambda: build_loss({"dpo": -1.0}), ValueError, ["loss.dpo.weight"]),
        (lambda: build_loss({"dpo": "x"}), TypeError, ["loss.dpo"]),
        (lambda: build_loss({"nope": 1.0}), KeyError, ["loss.nope", "'nope'"]),
        (lambda: build_loss({"dpo": 1.0, "kto": 1.0}), ValueError, ["paired and unpaired"]),
    ],
)
def test_construction_errors_name_the_argument(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for w in words:
        assert w in str(info.value)


def _mutate(**changes) -> Scores:
    return Scores(**{**grouped(grad=False).__dict__, **changes})


@pytest.mark.parametrize(
    "name, scores, words",
    [
        ("dpo", _mutate(reference=torch.zeros(3, 3)), ["Scores.reference", "(3, 3)"]),
        ("dpo", _mutate(policy=torch.tensor([[0.0, float("nan")]] * 3)), ["Scores.policy", "NaN"]),
        ("dpo", _mutate(reference=torch.full((3, 2), float("inf"))), ["Scores.reference", "NaN or inf"]),
        ("dpo", _mutate(reference=None), ["Scores.reference is None"]),
        ("simpo", _mutate(lengths=None), ["Scores.lengths is None"]),
        ("simpo", _mutate(lengths=torch.zeros(3, 2)), ["Scores.lengths", "positive"]),
        ("dpo", _mutate(policy=torch.zeros(3, 1)), ["(B, 1+K)", "(3, 1)"]),
        ("dpo", _mutate(policy=torch.zeros(3, 2, dtype=torch.long)), ["Scores.policy", "floating"]),
        ("dpo", _mutate(policy=torch.zeros(2), reference=torch.zeros(2), lengths=None, labels=torch.ones(2).bool()),
         ["Scores.labels"]),
        ("sppo", _mutate(win_prob=torch.full((3, 2), 1.5)), ["Scores.win_prob", "[0, 1]"]),
        ("sppo", _mutate(win_prob=torch.full((3, 3), 0.5)), ["Scores.win_prob", "(3, 3)"]),
        ("kl", _mutate(kl_reference=torch.zeros(5)), ["Scores.kl_policy", "(5,)"]),
        ("kl", _mutate(kl_reference=None), ["Scores.kl_policy and Scores.kl_reference"]),
        ("kto", _mutate(), ["unpaired", "Scores.labels"]),
        ("kto", Scores(policy=torch.zeros(2), reference=torch.zeros(2), labels=torch.tensor([0.5, 1.0]),
                       kl_policy=torch.zeros(1), kl_reference=torch.zeros(1)), ["Scores.labels", "bool"]),
        ("kto", Scores(policy=torch.zeros(2), reference=torch.zeros(2), labels=torch.ones(3).bool(),
                       kl_policy=torch.zeros(1), kl_reference=torch.zeros(1)), ["Scores.labels", "(3,)"]),
    ],
)
def test_bad_scores_raise_naming_the_argument(name, scores, words):
    with pytest.raises((ValueError, TypeError)) as info:
        get_loss(name)(scores)
    for w in words:
        assert w in str(info.value)


def test_registration_rejects_checks_on_unknown_parameters():
    from mmpref.losses import register_loss
    from mmpref.losses.registry import positive

    with pytest.raises(ValueError, match="unknown parameter"):
        register_loss("_typo_loss", checks={"betta": positive()})(lambda view, *, beta=0.1: view.ratio)
    assert "_typo_loss" not in available_losses()


def test_sft_accepts_winner_only_groups_and_preference_losses_do_not():
    """An SFT phase (e.g. pretraining or Tango 2's SFT epoch) may feed winners only: shape (B, 1)."""
    lp = torch.tensor([[-2.0], [-4.0]], dtype=torch.float64)
    out = get_loss("sft")(Scores(policy=lp))
    assert out.loss.item() == pytest.approx(3.0)
    assert "rewards/accuracies" not in out.metrics
    with pytest.raises(ValueError, match="K >= 1"):
        get_loss("dpo")(Scores(policy=lp, reference=lp))
