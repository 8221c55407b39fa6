"""Every preference structure over one winner and one loser: which are real losses, which registered losses they
are, and how they order.

Over the propositions ``(Yw, Yl)`` a structure is fixed by two truth sets, ``P & C`` inside ``C`` (16 x 16 formula
pairs collapse to these). Dropping the unsatisfiable ones (infinite loss) and those with ``P & C = C`` (loss 0)
leaves 50. Everything here is decided numerically on fixed random inputs (float64), never by name:

* :func:`pair_landscape`: each structure's closed form, the signs of its gradient and its nearest named loss;
* :func:`decompile`: the structures (and score form, beta, margin) whose compiled loss equals a registered loss,
  up to a positive weight and an added multiple of the winner's NLL (CPO, ORPO and ASFT add one);
* :func:`strictness_order`: structure A is stricter than B when A's loss is >= B's for every input.

``mmpref losses --logic`` prints the decompilation and the order; ``mmpref losses --logic --table`` prints the
landscape table that ``docs/losses.md`` holds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .logic import SCORE_FORMS, compile_structure, parse, proposition_logits, truth_set
from .registry import available_losses, get_loss, loss_spec
from .scores import Scores, ScoreView

Rows = frozenset[tuple[bool, bool]]  # assignments (Yw, Yl)
ALL: Rows = frozenset(itertools.product((False, True), repeat=2))
# the shortest formula for each of the 16 truth sets over (Yw, Yl); the first listed wins
_SHORTEST = ("true", "false", "Yw", "Yl", "~Yw", "~Yl", "Yw & Yl", "Yw & ~Yl", "~Yw & Yl", "~Yw & ~Yl", "Yw | Yl",
             "Yw | ~Yl", "~Yw | Yl", "~Yw | ~Yl", "Yw xor Yl", "Yw <-> Yl")
_TOL = 1e-9


def formula_of(rows: Rows) -> str:
    """The shortest formula whose truth set over ``(Yw, Yl)`` is ``rows``."""
    return _formulas()[rows]


@lru_cache(maxsize=1)
def _formulas() -> dict[Rows, str]:
    out: dict[Rows, str] = {}
    for text in _SHORTEST:
        out.setdefault(truth_set(parse(text), 1), text)
    assert len(out) == 16, "the 16 two-variable truth tables each need a formula"
    return out


@dataclass(frozen=True)
class Structure:
    """``core`` = the truth set of ``P & C``, ``condition`` = that of ``C``."""

    core: Rows
    condition: Rows

    @property
    def formula(self) -> str:
        return formula_of(self.core)

    @property
    def given(self) -> str:
        return formula_of(self.condition)

    def loss(self, s: Tensor) -> Tensor:
        """Per-row loss on proposition logits ``s`` ``(B, 2)``."""
        return compile_structure(self.formula, self.given, 1).loss(s)

    def __str__(self) -> str:
        return f"P = {self.formula}" + ("" if self.condition == ALL else f", C = {self.given}")


def pair_structures() -> list[Structure]:
    """The 50 structures whose loss is finite and not identically 0, ordered by condition then core size."""
    out = []
    for m in range(1, 5):
        for cond in itertools.combinations(sorted(ALL), m):
            for size in range(1, m):
                out += [Structure(frozenset(core), frozenset(cond)) for core in itertools.combinations(cond, size)]
    return sorted(out, key=lambda st: (-len(st.condition), len(st.core), str(st)))


# ----- fixed random inputs --------------------------------------------------------------------------------------
def _logits(n: int = 512, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64) * 3).requires_grad_(True)


def _scores(n: int = 64, seed: int = 1) -> Scores:
    """Grouped pair scores as an LLM produces them: negative log-likelihoods, lengths 4-40."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 41, (n, 2), generator=g).double()
    lp = -torch.rand(n, 2, generator=g, dtype=torch.float64) * 3 * lengths
    ref = -torch.rand(n, 2, generator=g, dtype=torch.float64) * 3 * lengths
    return Scores(policy=lp, reference=ref, lengths=lengths)


# ----- the landscape ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LandscapeRow:
    structure: Structure
    closed_form: str  # in p = sigmoid(s_w), q = sigmoid(s_l)
    log_sigmoid_form: str  # the same with ls = log sigmoid, where a short one exists
    grad_w: str  # sign of dL/ds_w over the inputs: "-", "+", "0" or "+/-"
    grad_l: str
    nearest: str  # the nearest structure with a registered loss, and the mean |difference|

    @property
    def prefers_winner(self) -> bool:
        """Gradient descent never lowers the winner's logit nor raises the loser's, and moves at least one."""
        return self.grad_w in ("-", "0") and self.grad_l in ("+", "0") and (self.grad_w, self.grad_l) != ("0", "0")


def pair_landscape() -> list[LandscapeRow]:
    """One row per structure of :func:`pair_structures`."""
    s = _logits()
    named = _named_structures()
    rows = []
    for st in pair_structures():
        loss = st.loss(s)
        (grad,) = torch.autograd.grad(loss.sum(), s)
        rows.append(LandscapeRow(st, _closed_form(st), _log_sigmoid_form(loss.detach(), s.detach()),
                                 _sign(grad[:, 0]), _sign(grad[:, 1]), _nearest(loss.detach(), s.detach(), named)))
    return rows


def _sign(g: Tensor) -> str:
    pos, neg = bool((g > _TOL).any()), bool((g < -_TOL).any())
    return "+/-" if pos and neg else "+" if pos else "-" if neg else "0"


def _wmc_text(rows: Rows) -> str:
    """``WMC`` of a truth set in ``p``, ``q``, written short."""
    if rows == ALL:
        return "1"
    for var, i in (("p", 0), ("q", 1)):
        for val in (True, False):
            if rows == frozenset(r for r in ALL if r[i] == val):
                return var if val else f"(1-{var})"
    term = lambda r: ("p" if r[0] else "(1-p)") + ("q" if r[1] else "(1-q)")  # noqa: E731
    if len(rows) == 3:
        (missing,) = ALL - rows
        return f"1 - {term(missing)}"
    return " + ".join(term(r) for r in sorted(rows, reverse=True))


def _closed_form(st: Structure) -> str:
    num, den = (_wmc_text(r) for r in (st.core, st.condition))
    wrap = lambda t: f"({t})" if " " in t else t  # noqa: E731  (sums and differences need parentheses)
    if den == "1":
        return f"-log[{num[1:-1] if num.count('(') == 1 and num.startswith('(') else num}]"
    return f"-log[{wrap(num)} / {wrap(den)}]"


def _log_sigmoid_forms() -> dict[str, callable]:
    forms = {}
    for a, b in itertools.product((1, -1), repeat=2):
        sa, sb = ("" if a > 0 else "-"), ("" if b > 0 else "-")
        forms[f"-ls({sa}s_w) - ls({sb}s_l)"] = \
            lambda s, a=a, b=b: -F.logsigmoid(a * s[:, 0]) - F.logsigmoid(b * s[:, 1])
    for sign in (1, -1):
        forms["-ls(s_w - s_l)" if sign > 0 else "-ls(s_l - s_w)"] = \
            lambda s, sign=sign: -F.logsigmoid(sign * (s[:, 0] - s[:, 1]))
        for i, v in enumerate(("s_w", "s_l")):
            forms[f"-ls({'' if sign > 0 else '-'}{v})"] = lambda s, i=i, sign=sign: -F.logsigmoid(sign * s[:, i])
    return forms


def _log_sigmoid_form(loss: Tensor, s: Tensor) -> str:
    return next((name for name, f in _log_sigmoid_forms().items() if torch.allclose(f(s), loss, atol=1e-10)), "")


@lru_cache(maxsize=1)
def _named_structures() -> dict[Structure, tuple[str, ...]]:
    """Structure -> the registered losses whose :func:`best_match` it is."""
    out: dict[Structure, list[str]] = {}
    for name, matches in decompile_all().items():
        if matches:
            out.setdefault(best_match(matches).structure, []).append(name)
    return {st: tuple(names) for st, names in out.items()}


def _nearest(loss: Tensor, s: Tensor, named: dict[Structure, tuple[str, ...]]) -> str:
    if not named:
        return ""
    dist = {st: float((st.loss(s) - loss).abs().mean()) for st in named}
    best = min(dist, key=dist.get)
    return f"{'/'.join(named[best])} ({dist[best]:.2f})"


# ----- decompiling the registered losses --------------------------------------------------------------------------
@dataclass(frozen=True)
class Decompiled:
    """``loss == weight * logic(structure, score, beta, margin) + nll * NLL(y_w)`` on every input tried."""

    structure: Structure
    score: str
    beta: float | None
    margin: float
    weight: float
    nll: float  # coefficient of the winner's token-mean NLL
    nll_sum: float  # coefficient of the winner's summed NLL

    def __str__(self) -> str:
        opts = "" if self.score == "log_odds" else f" beta={self.beta:g}"
        opts += f" margin={self.margin:g}" if self.margin else ""
        text = f"{'' if math.isclose(self.weight, 1) else f'{self.weight:g} * '}logic({self.structure}; " \
               f"score={self.score}{opts})"
        for coef, what in ((self.nll, "NLL_mean(y_w)"), (self.nll_sum, "NLL_sum(y_w)")):
            text += f" + {coef:g} * {what}" if abs(coef) > 1e-9 else ""
        return text


def decompile(name: str) -> list[Decompiled]:
    """The structures (over a winner and one loser) whose compiled loss is the registered loss ``name`` with its
    default parameters, up to a positive weight and added multiples of the winner's NLL; ``[]`` when none is.

    Tried: every score form, beta in {the loss's own beta / alpha / tau / gamma, 1}, margin in {0, its gamma}."""
    spec = loss_spec(name)
    if spec.data != "grouped" or spec.additive or name == "logic":
        return []
    loss = get_loss(name)
    scores = _scores()
    target = loss(scores).per_sample.detach()
    view = ScoreView(scores)
    nll_mean, nll_sum = -view.mean_lp[:, 0], -view.lp[:, 0]
    params = loss.params
    betas = sorted({float(params[k]) for k in ("beta", "alpha", "tau", "gamma")
                    if isinstance(params.get(k), (int, float)) and params[k] > 0} | {1.0})
    margins = sorted({0.0} | ({float(params["gamma"])} if isinstance(params.get("gamma"), float) else set()))
    found = []
    structures = pair_structures()
    for score in SCORE_FORMS:
        for beta, margin in itertools.product([None] if score == "log_odds" else betas, margins):
            s = proposition_logits(view, score, beta, margin)
            for st in structures:
                fit = _fit(target, st.loss(s), nll_mean, nll_sum)
                if fit is not None:
                    found.append(Decompiled(st, score, beta, margin, *fit))
    return found


def best_match(matches: tuple[Decompiled, ...] | list[Decompiled]) -> Decompiled:
    """The reading to show: least NLL added, then the shortest structure. Several can be exact: with ``log_odds``,
    ``-ls(s_w)`` is the winner's token-mean NLL itself, so ASFT also reads as ``P = ~Yl`` plus more NLL."""
    return min(matches, key=lambda m: (abs(m.nll) + abs(m.nll_sum), len(str(m.structure)), m.score))


def _fit(target: Tensor, compiled: Tensor, nll_mean: Tensor, nll_sum: Tensor) -> tuple[float, float, float] | None:
    """Least squares ``target ~ w * compiled + a * nll_mean + b * nll_sum``; the coefficients when exact, w > 0."""
    x = torch.stack([compiled, nll_mean, nll_sum], dim=1)
    coef = torch.linalg.lstsq(x, target[:, None]).solution[:, 0]
    resid = (x @ coef - target).abs().max()
    if resid > 1e-8 * (1 + target.abs().max()) or coef[0] <= 1e-6:
        return None
    return tuple(round(float(c), 9) for c in coef)


@lru_cache(maxsize=1)
def decompile_all() -> dict[str, tuple[Decompiled, ...]]:
    """:func:`decompile` for every registered grouped preference loss (additive terms and unpaired losses have no
    pair structure)."""
    return {name: tuple(decompile(name)) for name in available_losses()
            if loss_spec(name).data == "grouped" and not loss_spec(name).additive and name != "logic"}


def strictness_order(structures: list[Structure]) -> list[tuple[Structure, Structure, bool]]:
    """Pairs ``(A, B, entailed)`` where A's loss is >= B's for every input and somewhere greater; ``entailed``:
    the sufficient logical condition holds (``P&C`` of A entails that of B, and B's condition entails A's)."""
    s = _logits().detach()
    losses = {st: st.loss(s) for st in structures}
    out = []
    for a, b in itertools.permutations(structures, 2):
        diff = losses[a] - losses[b]
        if bool((diff >= -_TOL).all()) and bool((diff > _TOL).any()):
            out.append((a, b, a.core <= b.core and b.condition <= a.condition))
    return out


# ----- printing ---------------------------------------------------------------------------------------------------
def describe_registered() -> str:
    """What ``mmpref losses --logic`` prints."""
    lines = ["Registered pair losses as preference structures over (Yw, Yl): loss = -log WMC(P & C) + log WMC(C),",
             "found by trying all 50 structures x score forms on random inputs (mmpref.losses.landscape).", ""]
    found = decompile_all()
    width = max(len(name) for name in found)
    for name, matches in found.items():
        lines.append(f"  {name:{width}s}  {best_match(matches) if matches else 'none of the space matches'}")
    named = _named_structures()
    structures = sorted(named, key=str)
    lines += ["", "Strictness (A >= B: A's loss is at least B's for every score; same score form):"]
    for a, b, entailed in strictness_order(structures):
        why = "P&C of A entails P&C of B and C of B entails C of A" if entailed else "numerically only"
        lines.append(f"  {'/'.join(named[a])} [{a}]  >=  {'/'.join(named[b])} [{b}]   ({why})")
    return "\n".join(lines)


def landscape_markdown() -> str:
    """The pair landscape as a markdown table (``docs/losses.md``): the structures that prefer the winner."""
    head = ["| P (as P & C) | C | loss, p = s(s_w), q = s(s_l) | in log-sigmoids | dL/ds_w | dL/ds_l | nearest "
            "registered (mean abs diff) |", "|---|---|---|---|---|---|---|"]
    cell = lambda text: f"`{text}`".replace("|", "\\|") if text else ""  # noqa: E731  (a bare | ends a cell)
    body = [f"| {cell(r.structure.formula)} | {cell(r.structure.given)} | {cell(r.closed_form)} | "
            f"{cell(r.log_sigmoid_form)} | {r.grad_w} | {r.grad_l} | {r.nearest} |"
            for r in pair_landscape() if r.prefers_winner]
    return "\n".join(head + body)
