"""Losses compiled from Boolean formulas: identities with the registered losses, a brute-force weighted model count,
gradients, numerics, the parser's errors, decompilation, the docs table, and training through the CLI's path."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmpref.config import load_config
from mmpref.losses import Scores, build_loss, get_loss
from mmpref.losses.landscape import best_match, decompile, landscape_markdown, pair_landscape, pair_structures
from mmpref.losses.logic import FormulaError, compile_loss, compile_structure, parse, structure_loss
from mmpref.training import train

ROOT = Path(__file__).resolve().parents[1]


def scores(b=48, k=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(3, 40, (b, 1 + k), generator=g).to(dtype)
    lp = (-torch.rand(b, 1 + k, generator=g, dtype=torch.float64) * 2 * n).to(dtype).requires_grad_(True)
    ref = (-torch.rand(b, 1 + k, generator=g, dtype=torch.float64) * 2 * n).to(dtype)
    return Scores(policy=lp, reference=ref, lengths=n)


def ls(x):
    return F.logsigmoid(x)


# ----- identities with the registered losses (the list), float64 and float32 ----------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_structures_reproduce_registered_losses(dtype):
    sc = scores(dtype=dtype)
    lp, ref, n = sc.policy.double(), sc.reference.double(), sc.lengths.double()
    m = lp / n
    lo = m - torch.log(-torch.expm1(m))  # log-odds of exp(mean_lp), written independently of the core's log1mexp
    xor = "Yw xor Yl"
    cases = [  # compiled loss, closed form computed here by hand
        (compile_loss("Yw & ~Yl", xor, "beta_r", beta=0.1), -ls(0.1 * ((lp - ref)[:, 0] - (lp - ref)[:, 1]))),
        (compile_loss("Yw & ~Yl", xor, "beta_lp", beta=0.1), -ls(0.1 * (lp[:, 0] - lp[:, 1]))),
        (compile_loss("Yw & ~Yl", xor, "beta_mean_lp", beta=2.0, margin=0.5), -ls(2.0 * (m[:, 0] - m[:, 1]) - 0.5)),
        (compile_loss("Yw & ~Yl", xor, "log_odds"), -ls(lo[:, 0] - lo[:, 1])),
        (compile_loss("Yw & ~Yl", "true", "log_odds"), -ls(lo[:, 0]) - ls(-lo[:, 1])),
    ]
    tol = 1e-6 if dtype == torch.float64 else 2e-5  # float32: relative to losses of size ~1-30
    for loss, expected in cases:
        got = loss(sc).per_sample.double()
        assert torch.allclose(got, expected, atol=tol, rtol=1e-6), loss
    # and the registered losses themselves (their preference terms)
    nll = -m[:, 0]
    registered = [
        (cases[0][0], get_loss("dpo", beta=0.1)(sc).per_sample),
        (cases[1][0], get_loss("cpo", beta=0.1, alpha=0.0)(sc).per_sample),
        (cases[2][0], get_loss("simpo", beta=2.0, gamma=0.5)(sc).per_sample),
        (cases[3][0], get_loss("orpo", lam=1.0)(sc).per_sample.double() - nll),
        (cases[4][0], get_loss("asft", lam=1.0)(sc).per_sample.double() - nll),
    ]
    for loss, expected in registered:
        assert torch.allclose(loss(sc).per_sample.double(), expected.double(), atol=tol, rtol=1e-6), loss


def test_gradients_equal_the_closed_forms():
    for formula, condition, closed in [
        ("Yw & ~Yl", "Yw xor Yl", lambda s: -ls(s[:, 0] - s[:, 1])),
        ("Yw & ~Yl", "true", lambda s: -ls(s[:, 0]) - ls(-s[:, 1])),
        ("Yw", "Yw | Yl", lambda s: -torch.log(torch.sigmoid(s[:, 0]) / (1 - torch.sigmoid(-s[:, 0])
                                                                          * torch.sigmoid(-s[:, 1])))),
    ]:
        s = (torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
        (g1,) = torch.autograd.grad(structure_loss(s, formula, condition).sum(), s)
        (g2,) = torch.autograd.grad(closed(s).sum(), s)
        assert torch.allclose(g1, g2, atol=1e-12), (formula, condition)
    # through the registry: d loss / d lp of compiled DPO == that of dpo
    a, b = scores(), scores()
    compile_loss("Yw & ~Yl", "Yw xor Yl", beta=0.3)(a).loss.backward()
    get_loss("dpo", beta=0.3)(b).loss.backward()
    assert torch.allclose(a.policy.grad, b.policy.grad, atol=1e-12)


# ----- K losers -------------------------------------------------------------------------------------------------------
def brute_force_loss(s, formula_fn, condition_fn):
    """-log WMC(P & C) + log WMC(C) by summing probabilities over all assignments (no log space), float64."""
    p = torch.sigmoid(s.double())
    out = []
    for row in p:
        num = den = 0.0
        for x in itertools.product((0, 1), repeat=len(row)):
            w = math.prod(float(pi) if xi else 1 - float(pi) for pi, xi in zip(row, x))
            if condition_fn(x):
                den += w
                if formula_fn(x):
                    num += w
        out.append(-math.log(num) + math.log(den))
    return torch.tensor(out, dtype=torch.float64)


def test_weighted_model_count_equals_brute_force_enumeration():
    s = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2  # Yw, Yl1..Yl3
    cases = [
        ("(Yw -> Yl1) xor ~Yl2 | Yl3", "true", lambda x: ((not x[0]) or x[1]) != (not x[2]) or x[3], lambda x: True),
        ("Yw & ~Yl", "Yw xor Yl", lambda x: x[0] and not any(x[1:]),  # Yl = every loser
         lambda x: all(x[0] != xl for xl in x[1:])),
        ("Yw <-> ~Yl2 -> Yl3", "Yw | Yl1", lambda x: x[0] == ((not (not x[2])) or x[3]), lambda x: x[0] or x[1]),
    ]
    for formula, condition, f, c in cases:
        got = structure_loss(s, formula, condition)
        assert torch.allclose(got, brute_force_loss(s, f, c), atol=1e-10), formula


def test_k_losers_all_and_pairs():
    sc = scores(k=3)
    s = 0.1 * (sc.policy - sc.reference).detach()
    # Yw & ~Yl with no condition over 3 losers: -ls(s_w) - sum_k ls(-s_lk)
    got = compile_loss("Yw & ~Yl", "true", beta=0.1)(sc).per_sample
    assert torch.allclose(got, -ls(s[:, 0]) - ls(-s[:, 1:]).sum(1), atol=1e-10)
    # pairs: the pair loss averaged over the K pairs == dpo with K losers
    pairs = compile_loss("Yw & ~Yl", "Yw xor Yl", beta=0.1, losers="pairs")(sc).per_sample
    assert torch.allclose(pairs, get_loss("dpo", beta=0.1)(sc).per_sample, atol=1e-10)
    # all, with the condition: p prod(1-q) / (p prod(1-q) + (1-p) prod q)
    p, q = torch.sigmoid(s[:, 0]), torch.sigmoid(s[:, 1:])
    a, b = p * (1 - q).prod(1), (1 - p) * q.prod(1)
    allk = compile_loss("Yw & ~Yl", "Yw xor Yl", beta=0.1)(sc).per_sample
    assert torch.allclose(allk, -torch.log(a / (a + b)), atol=1e-9)
    with pytest.raises(FormulaError, match="names Yl3, but the groups have 2"):
        structure_loss(torch.zeros(2, 3), "Yw & ~Yl3")


def test_finite_for_large_scores_in_float32():
    s = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [5e3, 5e3], [0.0, -1e4]], dtype=torch.float32, requires_grad=True)
    for formula, condition in [("Yw & ~Yl", "Yw xor Yl"), ("Yw & ~Yl", "true"), ("Yw | ~Yl", "~Yw | ~Yl")]:
        loss = structure_loss(s, formula, condition)
        (g,) = torch.autograd.grad(loss.sum(), s)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    dpo = structure_loss(s.detach(), "Yw & ~Yl", "Yw xor Yl")
    assert torch.allclose(dpo, -ls(s[:, 0] - s[:, 1]).detach(), rtol=1e-6)  # 2e4 for the wrong-way pair


# ----- the formula language -------------------------------------------------------------------------------------------
def truth(text, n=1):
    f = parse(text)
    return [f.evaluate(x[0], x[1:]) for x in itertools.product((False, True), repeat=1 + n)]


def test_precedence_and_associativity():
    assert truth("Yw | Yl & ~Yw") == truth("Yw | (Yl & ~Yw)")
    assert truth("Yw xor Yl & Yw") == truth("Yw xor (Yl & Yw)")
    assert truth("Yw | Yl xor Yw") == truth("Yw | (Yl xor Yw)")
    assert truth("Yl1 -> Yl2 -> Yw", 2) == truth("Yl1 -> (Yl2 -> Yw)", 2) != truth("(Yl1 -> Yl2) -> Yw", 2)
    assert truth("Yw <-> Yl -> Yw") == truth("Yw <-> (Yl -> Yw)")
    assert truth("~~Yw") == truth("Yw") and truth("true & Yw") == truth("Yw") and truth("false | Yl") == truth("Yl")


@pytest.mark.parametrize("text,message", [
    ("Yw & & Yl", "unexpected '&' at character 6"),
    ("Yw & (Yl", "ended early at character 9; expected ')'"),
    ("Yx | Yl", "unknown name 'Yx' at character 1"),
    ("Yw $ Yl", "unexpected character '$' at character 4"),
    ("Yw Yl", "unexpected 'Yl' at character 4"),
    ("(Yw))", "unexpected ')' at character 5"),
    ("", "ended early at character 1"),
    ("Yl & Yl1", "either Yl (every loser) or Yl1..YlK"),
    ("Yl0", "unknown name 'Yl0'"),
])
def test_parser_errors_name_the_position(text, message):
    with pytest.raises(FormulaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        parse(text)


def test_unusable_structures_are_refused_when_the_loss_is_built():
    for params, message in [
        ({"formula": "Yw", "condition": "Yw"}, "the loss is 0 for every input"),
        ({"formula": "Yw & ~Yw", "condition": "true"}, "would be infinite"),
        ({"formula": "Yw", "condition": "false"}, "never true"),
        ({"score": "log_odds", "beta": 0.1}, "log_odds has no beta"),
        ({"score": "beta_q"}, "must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_loss({"logic": params})
    with pytest.raises(ValueError, match="loss.logic: formula 'Yw &&': unexpected '&' at character 5"):
        build_loss({"logic": {"formula": "Yw &&"}})


def test_requirements_follow_the_score_form():
    assert get_loss("logic", score="beta_r").needs_reference
    assert not get_loss("logic", score="beta_lp").needs_reference
    assert get_loss("logic", score="beta_mean_lp").needs_lengths and get_loss("logic", score="log_odds").needs_lengths
    assert not get_loss("logic", score="beta_lp").needs_lengths
    sc = scores()
    out = compile_loss("Yw & ~Yl", "Yw xor Yl", "beta_lp", beta=0.5)(sc)
    assert torch.allclose(out.rewards, 0.5 * sc.policy.detach())  # rewards are the proposition logits


# ----- decompilation, order and the landscape -------------------------------------------------------------------------
def test_decompile_finds_the_registered_structures():
    dpo = best_match(decompile("dpo"))
    assert (dpo.structure.formula, dpo.structure.given, dpo.score, dpo.beta) == ("Yw & ~Yl", "Yw xor Yl", "beta_r", 0.1)
    assert (dpo.weight, dpo.nll, dpo.nll_sum) == (1.0, 0.0, 0.0)
    simpo = best_match(decompile("simpo"))
    assert (simpo.score, simpo.beta, simpo.margin) == ("beta_mean_lp", 2.0, 0.5)
    orpo = best_match(decompile("orpo"))  # NLL + 0.1 * odds-ratio term
    assert (orpo.structure.given, orpo.score, orpo.weight, orpo.nll) == ("Yw xor Yl", "log_odds", 0.1, 1.0)
    asft = best_match(decompile("asft"))
    assert (asft.structure.formula, asft.structure.given, asft.weight, asft.nll) == ("Yw & ~Yl", "true", 0.1, 1.0)
    cpo = best_match(decompile("cpo"))
    assert (cpo.score, cpo.beta, cpo.nll) == ("beta_lp", 0.1, 1.0)
    for name in ("ipo", "hinge", "sppo", "nca", "cdpo"):  # not a -log WMC of any pair structure
        assert decompile(name) == [], name


def test_cli_prints_structures_and_order(capsys):
    from mmpref.cli import main

    assert main(["losses", "--logic"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines()[3:] if line.startswith("  ")}
    assert lines["dpo"] == "logic(P = Yw & ~Yl, C = Yw xor Yl; score=beta_r beta=0.1)"
    assert lines["ipo"] == "none of the space matches"
    # BCO with its shift at 0 is DPO's two log-sigmoids taken apart: the same P with no condition
    assert lines["bco_pair"] == "logic(P = Yw & ~Yl; score=beta_r beta=0.1)"
    assert "asft/bco_pair [P = Yw & ~Yl]  >=  cpo/dpo/orpo/set/simpo/spo [P = Yw & ~Yl, C = Yw xor Yl]" in out


def test_pair_landscape_counts_and_docs_table():
    structures = pair_structures()
    assert len(structures) == len(set(structures)) == 50  # sum over conditions C of (2^|C| - 2) = 3^4 - 31
    rows = pair_landscape()
    for r in rows:  # the gradient signs are those of the closed form where it is a plain log-sigmoid
        if r.log_sigmoid_form == "-ls(s_w - s_l)":
            assert (r.grad_w, r.grad_l) == ("-", "+")
    kept = [r for r in rows if r.prefers_winner]
    assert ("Yw & ~Yl", "Yw xor Yl") in {(r.structure.formula, r.structure.given) for r in kept}
    assert ("Yw | Yl", "true") not in {(r.structure.formula, r.structure.given) for r in kept}  # raises the loser too
    docs = (ROOT / "docs" / "losses.md").read_text()
    assert landscape_markdown() in docs, "regenerate the table: mmpref losses --logic --table"


def test_compiled_structures_are_cached_and_checked():
    assert compile_structure("Yw & ~Yl", "Yw xor Yl", 1) is compile_structure("Yw & ~Yl", "Yw xor Yl", 1)


# ----- through mmpref train: a compiled DPO trains exactly like dpo on both modalities --------------------------------
def logged_losses(result):
    rows = [json.loads(line) for line in Path(result.metrics_file).read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and r.get("phase") != "eval"]


@pytest.mark.parametrize("config,objective,compiled", [
    ("llm_dpo_tiny.yaml", "loss={dpo: {beta: 0.1}}",
     'loss={logic: {formula: "Yw & ~Yl", condition: "Yw xor Yl", score: beta_r, beta: 0.1}}'),
    ("tango2_dpo_tiny.yaml", "phases=[{name: dpo, loss: {dpo: {beta: 200}}, epochs: 1}]",
     'phases=[{name: dpo, loss: {logic: {formula: "Yw & ~Yl", condition: "Yw xor Yl", beta: 200}}, epochs: 1}]'),
])
def test_a_compiled_loss_trains_like_the_registered_one(tmp_path, config, objective, compiled):
    common = ["run.max_steps=4", "run.log_every=1"]
    out = {}
    for name, loss in (("registered", objective), ("compiled", compiled)):
        cfg = load_config(str(ROOT / "configs" / config), [loss, f"run.output_dir={tmp_path / name}", *common])
        out[name] = logged_losses(train(cfg))
    assert len(out["registered"]) == 4
    assert out["compiled"] == pytest.approx(out["registered"], rel=1e-5, abs=1e-7)


def test_diffusion_refuses_length_score_forms_before_training(tmp_path):
    phases = "phases=[{name: dpo, loss: {logic: {score: beta_mean_lp, beta: 2.0}}, epochs: 1}]"
    cfg = load_config(str(ROOT / "configs" / "tango2_dpo_tiny.yaml"), [phases, f"run.output_dir={tmp_path}"])
    with pytest.raises(Exception, match="phase 'dpo', loss 'logic'.*needs completion lengths"):
        train(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first step
