"""Golden values, float64, for every registered loss.

Expected numbers are worked out by hand with ``math`` on the explicit inputs below, never by calling the code under
test. Shared inputs (one group, K = 1)::

    lp = [-1, -4]   lr = [-1.5, -3]   n = [2, 4]
    r  = [0.5, -1]  h = 1.5           mean_lp = [-0.5, -1]   mean_ratio = [0.25, -0.25]  (h' = 0.5)
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from mmpref.losses import Scores, available_losses, build_loss, get_loss


def ls(x: float) -> float:
    """log sigma(x) for moderate x."""
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logodds(m: float) -> float:
    return m - math.log(1 - math.exp(m))


def pair(**extra) -> Scores:
    t = lambda *v: torch.tensor([list(v)], dtype=torch.float64)  # noqa: E731
    return Scores(policy=t(-1.0, -4.0), reference=t(-1.5, -3.0), lengths=t(2.0, 4.0), **extra)


GOLDEN = {
    # name, params -> expected loss on `pair()`
    ("dpo", ()): -ls(0.15),
    ("cdpo", (("e", 0.2),)): -0.8 * ls(0.15) - 0.2 * ls(-0.15),
    ("rdpo", (("e", 0.2),)): (-0.8 * ls(0.15) + 0.2 * ls(-0.15)) / 0.6,
    ("exo", (("e", 0.01),)): sig(0.15) * (ls(0.15) - math.log(0.99)) + sig(-0.15) * (ls(-0.15) - math.log(0.01)),
    ("ipo", (("tau", 0.25),)): (0.5 - 2.0) ** 2,
    ("ipo", (("tau", 0.25), ("form", "sum"))): (1.5 - 2.0) ** 2,
    ("hinge", (("gamma", 0.5),)): 1 - 0.75,
    ("hinge", (("gamma", 1.0),)): 0.0,
    ("slic", (("delta", 4.0),)): 4.0 - (-1.0) + (-4.0),
    ("sppo", (("beta", 0.5),)): (0.5 - 2 * 0.5) ** 2 + (-1.0 - 2 * (-0.5)) ** 2,
    ("simpo", ()): -ls(2.0 * (-0.5 + 1.0) - 0.5),
    ("cpo", ()): -ls(0.1 * 3.0) + 1.0 * 0.5,
    ("cpo", (("alpha", 2.0), ("nll_form", "sum"))): -ls(0.1 * 3.0) + 2.0 * 1.0,
    ("orpo", (("lam", 0.5),)): 0.5 - 0.5 * ls(logodds(-0.5) - logodds(-1.0)),
    ("asft", (("lam", 0.5),)): 0.5 - 0.5 * (ls(logodds(-0.5)) + ls(-logodds(-1.0))),
    ("spo", (("alpha", 0.5),)): -(1 / 0.5) * ls(0.5 * 3.0),
    ("nca", ()): -ls(0.05) - 0.5 * ls(-0.05) - 0.5 * ls(0.1),
    ("apo_zero", ()): (1 - sig(0.05)) + sig(-0.1),
    ("apo_down", ()): sig(0.05) + (1 - sig(0.15)),
    ("set", ()): -ls(0.15),  # K = 1: the softmax over {winner, loser} is DPO
    # f-DPO (Wang et al. 2023, Table 1): f'(u) at u = exp(r), r = (0.5, -1.0)
    ("dpo", (("divergence", "forward_kl"),)): -ls(0.1 * ((1 - math.exp(-0.5)) - (1 - math.exp(1.0)))),
    ("dpo", (("divergence", "js"),)): -ls(0.1 * (ls(0.5) - ls(-1.0))),  # log 2 cancels in the margin
    ("dpo", (("divergence", "alpha"), ("f_alpha", 0.5))):
        -ls(0.1 * ((1 - math.exp(-0.25)) / 0.5 - (1 - math.exp(0.5)) / 0.5)),
    ("ipo", (("tau", 0.25), ("form", "sum"), ("divergence", "js"))): (ls(0.5) - ls(-1.0) - 2.0) ** 2,
    ("hinge", (("gamma", 0.5), ("divergence", "forward_kl"))): max(0.0, 1 - 0.5 * (math.e - math.exp(-0.5))),
    ("cdpo", (("e", 0.2), ("divergence", "js"))):
        -0.8 * ls(0.1 * (ls(0.5) - ls(-1.0))) - 0.2 * ls(-0.1 * (ls(0.5) - ls(-1.0))),
    ("sigmoid_norm", ()): -ls(0.1 * (0.5 / 2 - (-1.0) / 4)),
    ("discopop", ()): (1 - sig(0.15 / 0.05)) * -ls(0.15) + sig(0.15 / 0.05) * math.exp(-0.15),
    ("bco_pair", ()): -ls(0.1 * 0.5) - ls(-0.1 * -1.0),
    ("aot", ()): -ls(0.1 * ((-1.0 + 4.0) - (-1.5 + 3.0))),  # one row: the sorted matching is the pair itself
    ("aot_unpaired", (("e", 0.1),)): -0.9 * ls(0.15) - 0.1 * ls(-0.15),
    ("simpo", (("e", 0.2),)): -0.8 * ls(0.5) - 0.2 * ls(-0.5),
    ("simpo", (("alpha_po", 0.25),)):  # AlphaPO: (1 - p^-a)/a of p = exp(mean_lp), mean_lp = (-0.5, -1.0)
        -ls(2.0 * ((1 - math.exp(0.125)) / 0.25 - (1 - math.exp(0.25)) / 0.25) - 0.5),
    ("cpo", (("pref", "hinge"),)): (1 - 0.1 * 3.0) + 0.5,
    ("cpo", (("pref", "ipo"),)): (0.5 - 1 / (2 * 0.1)) ** 2 + 0.5,  # token-mean margin -0.5 + 1.0
    ("cpo", (("e", 0.1),)): -0.9 * ls(0.3) - 0.1 * ls(-0.3) + 0.5,
    ("cpo", (("alpha_po", 0.5), ("alpha", 0.0))): -ls(0.1 * ((1 - math.exp(0.5)) / 0.5 - (1 - math.exp(2.0)) / 0.5)),
    ("logic", ()): -ls(0.15),  # the defaults are DPO's structure: Yw & ~Yl given Yw xor Yl, beta * r
    ("logic", (("condition", "true"), ("score", "beta_lp"), ("beta", 0.5))): -ls(-0.5) - ls(2.0),
    ("logic", (("formula", "Yw | ~Yl"), ("condition", "true"), ("score", "log_odds"))):
        -math.log(1 - (1 - math.exp(-0.5)) * math.exp(-1.0)),  # p = exp(mean_lp): 1 - Pr(~Yw & Yl)
    ("sft", (("eta", 0.5), ("beta", 0.2))): 0.5 * 0.2 * 1.0,
    ("sft", (("eta", 0.5), ("form", "mean"))): 0.5 * 0.5,
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: f"{k[0]}{dict(k[1]) or ''}")
def test_golden_pairwise(key):
    name, params = key
    out = get_loss(name, **dict(params))(pair())
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(GOLDEN[key], rel=1e-12, abs=1e-12)


def test_every_loss_has_a_golden_value():
    covered = {name for name, _ in GOLDEN} | {"kto", "bco", "kl"}
    assert covered == set(available_losses())


def test_sppo_soft_win_probabilities():
    p = torch.tensor([[0.7, 0.4]], dtype=torch.float64)
    out = get_loss("sppo", beta=0.5)(pair(win_prob=p))
    assert out.loss.item() == pytest.approx((0.5 - 2 * 0.2) ** 2 + (-1.0 - 2 * (-0.1)) ** 2, rel=1e-12)


def test_set_with_two_losers():
    # r = [0.5, -1, 0.5], beta 0.1
    s = Scores(policy=torch.tensor([[-1.0, -4.0, -2.0]], dtype=torch.float64),
               reference=torch.tensor([[-1.5, -3.0, -2.5]], dtype=torch.float64))
    expected = -math.log(math.exp(0.05) / (math.exp(0.05) + math.exp(-0.1) + math.exp(0.05)))
    assert get_loss("set")(s).loss.item() == pytest.approx(expected, rel=1e-12)


def unpaired(lp, lr, labels, kl_p=None, kl_r=None) -> Scores:
    t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return Scores(policy=t(lp), reference=t(lr), labels=torch.tensor(labels), kl_policy=t(kl_p), kl_reference=t(kl_r))


def test_kto_golden():
    # r = [0.5, -1]; kl gaps [0.5, -0.1] -> z0 = 0.2
    s = unpaired([-1.0, -4.0], [-1.5, -3.0], [True, False], [-2.0, -3.0], [-2.5, -2.9])
    out = get_loss("kto", beta=0.1, lambda_d=1.0, lambda_u=2.0)(s)
    expected = ((1 - sig(0.1 * (0.5 - 0.2))) + 2.0 * (1 - sig(0.1 * (0.2 + 1.0)))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["kl/z0"].item() == pytest.approx(0.2, rel=1e-12)
    assert out.rewards.tolist() == pytest.approx([0.05, -0.1], rel=1e-12)


def test_kto_z0_clamped_at_zero():
    s = unpaired([-1.0, -4.0], [-1.5, -3.0], [True, False], [-3.0, -3.0], [-2.5, -2.9])  # mean gap -0.3
    out = get_loss("kto", beta=0.1)(s)
    assert out.metrics["kl/z0"].item() == 0.0
    assert out.loss.item() == pytest.approx(((1 - sig(0.05)) + (1 - sig(0.1))) / 2, rel=1e-12)


def test_bco_golden_and_running_mean():
    loss = get_loss("bco", beta=0.1)
    # batch 1: rewards [0.05, -0.1] -> delta = -0.025 (first batch initialises the estimate)
    out = loss(unpaired([-1.0, -4.0], [-1.5, -3.0], [True, False]))
    assert out.metrics["bco/delta"].item() == pytest.approx(-0.025, rel=1e-12)
    assert out.loss.item() == pytest.approx((-ls(0.05 + 0.025) - ls(-(-0.1 + 0.025))) / 2, rel=1e-12)
    # batch 2: rewards [0.1, 0.0], mean 0.05 -> running mean over 4 rewards = (-0.05 + 0.1) / 4 = 0.0125
    out = loss(unpaired([-1.0, -1.0], [-2.0, -1.0], [False, True]))
    assert out.metrics["bco/delta"].item() == pytest.approx(0.0125, rel=1e-12)
    assert out.loss.item() == pytest.approx((-ls(-(0.1 - 0.0125)) - ls(0.0 - 0.0125)) / 2, rel=1e-12)


def test_bco_udm_weights_scale_undesirable_rows_only():
    s = unpaired([-1.0, -4.0, -2.0], [-1.5, -3.0, -2.0], [True, False, False])  # rewards [0.05, -0.1, 0]
    s.weights = torch.tensor([7.0, 2.0, 0.5], dtype=torch.float64)  # the desirable row's 7 is ignored
    out = get_loss("bco", beta=0.1)(s)
    delta = (0.05 + (-0.1 + 0.0) / 2) / 2  # the midpoint of the class means: 0
    expected = (-ls(0.05 - delta) - 2.0 * ls(-(-0.1 - delta)) - 0.5 * ls(-(0.0 - delta))) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert out.metrics["bco/udm_weight"].item() == pytest.approx(1.25, rel=1e-12)
    only_desirable = unpaired([-1.0], [-1.5], [True])
    only_desirable.weights = torch.tensor([3.0], dtype=torch.float64)
    plain = get_loss("bco", beta=0.1)(unpaired([-1.0], [-1.5], [True])).loss
    assert get_loss("bco", beta=0.1)(only_desirable).loss.item() == pytest.approx(plain.item(), rel=1e-12)
    for bad, match in ((torch.tensor([1.0, 2.0]), "shape"), (torch.tensor([1.0, -2.0, 1.0]), "non-negative")):
        s.weights = bad.double()
        with pytest.raises(ValueError, match=match):
            get_loss("bco", beta=0.1)(s)


def test_bco_shift_is_the_midpoint_of_the_class_means():
    # 1 desirable : 5 undesirable; rewards beta * r = 0.1 * r
    r = [2.0, -1.0, -3.0, 0.5, -2.0, -1.5]
    labels = [True, False, False, False, False, False]
    s = unpaired([x - 1.0 for x in r], [-1.0] * 6, labels)
    rewards = [0.1 * x for x in r]
    pos, neg = rewards[0], sum(rewards[1:]) / 5
    paper = (pos + neg) / 2  # (E+[r] + E-[r]) / 2
    trl = sum(rewards) / 6  # count-weighted mean of all rewards
    assert get_loss("bco")(s).metrics["bco/delta"].item() == pytest.approx(paper, rel=1e-12)
    assert get_loss("bco", shift="all_rewards")(s).metrics["bco/delta"].item() == pytest.approx(trl, rel=1e-12)
    assert abs(paper - trl) > 0.05
    expected = (-ls(rewards[0] - paper) - sum(ls(-(x - paper)) for x in rewards[1:])) / 6
    assert get_loss("bco")(s).loss.item() == pytest.approx(expected, rel=1e-12)
    # running class means over batches; a batch with one class moves only that class's mean
    loss = get_loss("bco")
    loss(s)
    out = loss(unpaired([0.0], [-1.0], [False]))  # one undesirable reward 0.1
    neg2 = (5 * neg + 0.1) / 6
    assert out.metrics["bco/delta"].item() == pytest.approx((pos + neg2) / 2, rel=1e-12)
    # only one class seen so far: its mean alone
    assert get_loss("bco")(unpaired([0.0], [-1.0], [True])).metrics["bco/delta"].item() == pytest.approx(0.1)


def test_bco_resumes_a_state_saved_before_the_class_means():
    old = {"delta": torch.tensor(0.2, dtype=torch.float64), "count": torch.tensor(8.0, dtype=torch.float64)}
    loss = get_loss("bco")
    loss.load_state_dict(old)
    out = loss(unpaired([-1.0, -4.0], [-1.5, -3.0], [True, False]))  # rewards 0.05 (desirable), -0.1
    pos, neg = (4 * 0.2 + 0.05) / 5, (4 * 0.2 - 0.1) / 5  # each class continues from 0.2 with half the count
    assert out.metrics["bco/delta"].item() == pytest.approx((pos + neg) / 2, rel=1e-12)


def test_sppo_mean_is_half_the_sum_and_ipo_soft_labels():
    sum_ = get_loss("sppo", beta=0.5)(pair()).loss.item()
    assert get_loss("sppo", beta=0.5, reduce="mean")(pair()).loss.item() == pytest.approx(sum_ / 2, rel=1e-12)
    # IPO: h' = mean ratios 0.25 - (-0.25) = 0.5, tau 0.25; P = Pr(winner beats loser)
    p = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    soft = get_loss("ipo", tau=0.25)(pair(win_prob=p)).loss.item()
    assert soft == pytest.approx((0.5 - (0.8 - 0.5) / 0.25) ** 2, rel=1e-12)
    hard = get_loss("ipo", tau=0.25)(pair(win_prob=torch.tensor([[1.0, 0.0]], dtype=torch.float64))).loss.item()
    assert hard == pytest.approx((0.5 - 2.0) ** 2, rel=1e-12) == get_loss("ipo", tau=0.25)(pair()).loss.item()
    even = get_loss("ipo", tau=0.25)(pair(win_prob=torch.tensor([[0.5, 0.5]], dtype=torch.float64))).loss.item()
    assert even == pytest.approx(0.5**2, rel=1e-12)  # no preference: the margin is pulled to 0


def test_aot_sorts_margins_over_the_batch():
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    # policy margins lp_w - lp_l = [3, -1, 2]; reference margins [0.5, 1, -2]
    s = Scores(policy=t([[-1.0, -4.0], [-3.0, -2.0], [-1.0, -3.0]]), reference=t([[-1.0, -1.5], [-2.0, -3.0],
                                                                                   [-3.0, -1.0]]))
    d = [-1.0 - -2.0, 2.0 - 0.5, 3.0 - 1.0]  # sorted policy margins minus sorted reference margins
    out = get_loss("aot", beta=0.5, e=0.1)(s)
    assert out.per_sample.tolist() == pytest.approx([-0.9 * ls(0.5 * x) - 0.1 * ls(-0.5 * x) for x in d], rel=1e-12)
    # unpaired: chosen ratios [0, -1, 2] and rejected ratios [-2.5, 1, -2], each sorted on its own
    du = [-1.0 - -2.5, 0.0 - -2.0, 2.0 - 1.0]
    out = get_loss("aot_unpaired", beta=0.5)(s)
    assert out.per_sample.tolist() == pytest.approx([-ls(0.5 * x) for x in du], rel=1e-12)


def test_discopop_is_finite_where_its_exponential_part_overflows():
    s = Scores(policy=torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]), reference=torch.tensor([[0.0, -2e4], [0.0, 0.0]]))
    out = get_loss("discopop", beta=1.0)(s)  # z = -2e4: m = 0, exp(-z) = inf in float32
    assert out.per_sample.tolist() == pytest.approx([2e4, math.log(2) * 0.5 + 0.5], rel=1e-6)


def test_bco_ema():
    loss = get_loss("bco", beta=0.1, momentum=0.9)
    loss(unpaired([-1.0, -4.0], [-1.5, -3.0], [True, False]))  # delta -0.025
    out = loss(unpaired([-1.0, -1.0], [-2.0, -1.0], [False, True]))  # batch mean 0.05
    assert out.metrics["bco/delta"].item() == pytest.approx(0.9 * -0.025 + 0.1 * 0.05, rel=1e-12)


def test_sft_unpaired_uses_desirable_rows():
    s = unpaired([-1.0, -4.0, -3.0], None, [True, False, True])
    assert get_loss("sft")(s).loss.item() == pytest.approx((1.0 + 3.0) / 2, rel=1e-12)


@pytest.mark.parametrize("grad, expected", [("score", [0.1 * 0.5 * 1.5, 0.1 * 0.5 * 0.9]), ("direct", [0.05, 0.05])])
def test_kl_regulariser_value_and_gradient(grad, expected):
    kl_p = torch.tensor([-2.0, -3.0], dtype=torch.float64, requires_grad=True)
    s = Scores(policy=torch.zeros(2, 2, dtype=torch.float64), kl_policy=kl_p,
               kl_reference=torch.tensor([-2.5, -2.9], dtype=torch.float64))
    out = get_loss("kl", beta=0.1, grad=grad)(s)
    assert out.loss.item() == pytest.approx(0.1 * (0.5 - 0.1) / 2, rel=1e-12)
    out.loss.backward()
    # score-function gradient: beta/M * (1 + gap_i); direct: beta/M
    assert kl_p.grad.tolist() == pytest.approx(expected, rel=1e-12)


def test_rpo_combination_golden():
    out = build_loss({"dpo": 1.0, "sft": 0.005})(pair())
    assert out.loss.item() == pytest.approx(-ls(0.15) + 0.005 * 1.0, rel=1e-12)


@pytest.mark.parametrize("doc", ["docs/losses.md", "README.md"])
def test_docs_table_has_one_row_per_loss(doc):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    cells = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `")]
    rows = [c.strip("`") for c in cells if re.fullmatch(r"`[a-z_]+`", c)]  # loss rows, not folder rows
    assert sorted(rows) == available_losses()


def test_log_weights_scale_preference_heads_not_additive_terms():
    lw = torch.tensor([[-0.2, -0.7]], dtype=torch.float64)
    s = pair(log_weights=lw)
    assert get_loss("dpo")(s).loss.item() == pytest.approx(-ls(0.15) * math.exp(-0.9), rel=1e-12)
    assert get_loss("sft", eta=0.5, beta=0.2)(s).loss.item() == pytest.approx(0.5 * 0.2 * 1.0, rel=1e-12)
    assert get_loss("set")(s).loss.item() == pytest.approx(-ls(0.15) * math.exp(-0.9), rel=1e-12)  # group sum
    with pytest.raises(ValueError, match="log_weights has shape"):
        get_loss("dpo")(pair(log_weights=torch.zeros(1, 3, dtype=torch.float64)))
