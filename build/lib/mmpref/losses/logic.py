"""Preference losses compiled from Boolean formulas: a loss as the semantic loss of a preference structure.

Each response of a group (winner ``Yw``, losers ``Yl1..YlK``) is a proposition that holds with probability
``p(y) = sigmoid(s(y))``, where the *score form* ``s`` picks what the model says about ``y``:

==================  ==================================  =========================================
``score``           ``s(y)``                            family
==================  ==================================  =========================================
``beta_r``          ``beta * r(y)``                     reference-based (DPO)
``beta_lp``         ``beta * lp(y)``                    reference-free (CPO)
``beta_mean_lp``    ``beta * mean_lp(y)``               length-normalised (SimPO, with ``margin``)
``log_odds``        ``log(P / (1 - P))``, ``P = exp(mean_lp(y))``  so that ``p(y) = P`` (ORPO, ASFT)
==================  ==================================  =========================================

The weighted model count of a formula is ``WMC(phi) = sum over satisfying assignments x of
prod_i p_i^x_i (1 - p_i)^(1 - x_i)``, computed exactly by enumerating the ``2^(1+K)`` assignments in log space
(log-sigmoids and a logsumexp, finite for ``|s|`` up to 1e4). A preference structure is a core formula ``P`` and a
condition ``C`` (default ``true``); its loss is ``-log WMC(P & C) + log WMC(C)``, i.e. ``-log Pr(P | C)``.

Examples (each an identity tested to 1e-6 against the registered loss): ``P = Yw & ~Yl``, ``C = Yw xor Yl`` is
``-log sigmoid(s_w - s_l)``, which is DPO with ``beta_r``, CPO's preference term with ``beta_lp``, SimPO with
``beta_mean_lp`` and ``margin = gamma`` and ORPO's odds-ratio term with ``log_odds``; ``P = Yw & ~Yl`` with no
condition is ``-log sigmoid(s_w) - log sigmoid(-s_l)``, ASFT's alignment term with ``log_odds``.

The semantics follow Richardson, Srikumar and Sabharwal, "Understanding the Logic of Direct Preference Alignment
through Logic" (ICML 2025, arXiv 2412.17696). The formula language, the ``margin`` (subtracted from the winner's
score), the two ways of reading ``Yl`` with K losers and the decompilation search in :mod:`.landscape` are ours.

Formulas: names ``Yw``, ``Yl`` (every loser, see ``losers``) or ``Yl1..YlK``; constants ``true``, ``false``;
operators, loosest first: ``<->``, ``->`` (right-associative), ``|``, ``xor``, ``&``, ``~``; parentheses.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import non_negative, one_of, optional, positive, register_loss
from .scores import ScoreKind, ScoreView

SCORE_FORMS: dict[str, ScoreKind] = {"beta_r": "ratio", "beta_lp": "lp", "beta_mean_lp": "mean_lp",
                                     "log_odds": "log_odds"}
DEFAULT_BETA = 0.1  # for the beta_* forms when beta is not given; log_odds has no beta
MAX_LOSERS = 10  # exact enumeration: 2^(1+K) assignments per group


class FormulaError(ValueError):
    """A formula that does not parse or cannot be used; the message names the character position."""


# ----- parsing ----------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(?P<op><->|->|[~&|()])|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<bad>\S))")
_LOSER = re.compile(r"Yl([1-9][0-9]*)")
_BINARY = {"<->": "iff", "->": "implies", "|": "or", "xor": "xor", "&": "and"}
_LEVELS = ("<->", "->", "|", "xor", "&")  # loosest first


@dataclass(frozen=True)
class Formula:
    """A parsed formula: ``tree`` is nested tuples, ``("var", i)`` (0 = Yw, k = Ylk, -1 = Yl), ``("const", b)``,
    ``("not", a)`` or ``(op, a, b)`` with op in and / or / xor / implies / iff."""

    text: str
    tree: tuple

    @property
    def names(self) -> frozenset[int]:
        return frozenset(_names(self.tree))

    @property
    def plain_loser(self) -> bool:
        """True when the formula says ``Yl`` (any number of losers) rather than ``Yl1..YlK``."""
        return -1 in self.names

    def evaluate(self, w: bool, losers: tuple[bool, ...]) -> bool:
        """Truth value with ``Yw = w`` and ``Ylk = losers[k-1]`` (``Yl`` must have been bound: one loser)."""
        return _eval(self.tree, (w, *losers))


def _names(tree: tuple) -> list[int]:
    if tree[0] == "var":
        return [tree[1]]
    return [n for sub in tree[1:] if isinstance(sub, tuple) for n in _names(sub)]


def _eval(tree: tuple, values: tuple[bool, ...]) -> bool:
    kind = tree[0]
    if kind == "var":
        return values[1 if tree[1] == -1 else tree[1]]
    if kind == "const":
        return tree[1]
    if kind == "not":
        return not _eval(tree[1], values)
    a, b = _eval(tree[1], values), _eval(tree[2], values)
    return {"and": a and b, "or": a or b, "xor": a != b, "implies": (not a) or b, "iff": a == b}[kind]


def parse(text: str) -> Formula:
    """Parse a formula; a :class:`FormulaError` names the first bad character's position (1-based)."""
    if not isinstance(text, str):
        raise FormulaError(f"a formula must be a string, got {type(text).__name__}")
    return _parse(text)


@lru_cache(maxsize=1024)  # a loss parses its formulas at every call
def _parse(text: str) -> Formula:
    tokens = _tokenize(text)
    parser = _Parser(text, tokens)
    tree = parser.level(0)
    if parser.i < len(tokens):
        tok, pos = tokens[parser.i]
        raise FormulaError(f"formula {text!r}: unexpected {tok!r} at character {pos}; expected an operator or the end")
    names = _names(tree)
    if -1 in names and any(n > 0 for n in names):
        raise FormulaError(f"formula {text!r}: use either Yl (every loser) or Yl1..YlK (one loser each), not both")
    return Formula(text, tree)


def _tokenize(text: str) -> list[tuple[str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace is left
            break
        start = m.start(m.lastgroup) + 1
        if m.lastgroup == "bad":
            raise FormulaError(f"formula {text!r}: unexpected character {m.group('bad')!r} at character {start}; "
                               "operators are ~ & | xor -> <-> and parentheses")
        tokens.append((m.group(m.lastgroup), start))
        pos = m.end()
    return tokens


class _Parser:
    """Precedence climbing over :data:`_LEVELS`; ``~`` and atoms bind tightest."""

    def __init__(self, text: str, tokens: list[tuple[str, int]]):
        self.text, self.tokens, self.i = text, tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def fail(self, expected: str) -> FormulaError:
        if self.i >= len(self.tokens):
            return FormulaError(f"formula {self.text!r}: ended early at character {len(self.text) + 1}; "
                                f"expected {expected}")
        tok, pos = self.tokens[self.i]
        return FormulaError(f"formula {self.text!r}: unexpected {tok!r} at character {pos}; expected {expected}")

    def level(self, depth: int) -> tuple:
        if depth == len(_LEVELS):
            return self.unary()
        op = _LEVELS[depth]
        left = self.level(depth + 1)
        if op == "->":  # right-associative: a -> b -> c is a -> (b -> c)
            if self.peek() == "->":
                self.i += 1
                return ("implies", left, self.level(depth))
            return left
        while self.peek() == op:
            self.i += 1
            left = (_BINARY[op], left, self.level(depth + 1))
        return left

    def unary(self) -> tuple:
        tok = self.peek()
        if tok == "~":
            self.i += 1
            return ("not", self.unary())
        if tok == "(":
            self.i += 1
            inner = self.level(0)
            if self.peek() != ")":
                raise self.fail("')'")
            self.i += 1
            return inner
        if tok is None or tok in _BINARY or tok == ")":
            raise self.fail("a name (Yw, Yl, Yl1..), true, false, '~' or '('")
        pos = self.tokens[self.i][1]
        self.i += 1
        if tok in ("true", "false"):
            return ("const", tok == "true")
        if tok == "Yw":
            return ("var", 0)
        if tok == "Yl":
            return ("var", -1)
        m = _LOSER.fullmatch(tok)
        if m:
            return ("var", int(m.group(1)))
        raise FormulaError(f"formula {self.text!r}: unknown name {tok!r} at character {pos}; "
                           "names are Yw, Yl and Yl1..YlK")


# ----- compiling: truth tables over the group's propositions ----------------------------------------------------
@dataclass(frozen=True)
class Compiled:
    """Which of the ``2^n`` assignments (rows of :attr:`assignments`) satisfy ``P & C`` and ``C``."""

    assignments: Tensor  # (2^n, n) float 0/1; column 0 is Yw, column k is Ylk
    core: Tensor  # (m1,) row indices satisfying P & C
    condition: Tensor  # (m2,) row indices satisfying C; None when C is true (log WMC(true) = 0)

    def loss(self, s: Tensor) -> Tensor:
        """``-log WMC(P & C) + log WMC(C)`` per row of ``s`` ``(..., n)``, in ``s``'s dtype.

        Counted in float64: the two log-counts can be ~1e4 and nearly equal (``s = (5e3, 5e3)`` under DPO's
        structure gives ``log 2`` as a difference of two numbers near -5e3), which float32 resolves to only ~5e-4.
        The tensors are ``(B, 2^n)`` with n <= 11, so this costs nothing next to the model."""
        x = s.double()
        a = self.assignments.to(x.device)
        log_w = F.logsigmoid(x) @ a.T + F.logsigmoid(-x) @ (1 - a).T  # (..., 2^n): log weight of each assignment
        out = -log_w[..., self.core.to(x.device)].logsumexp(-1)
        if self.condition is not None:
            out = out + log_w[..., self.condition.to(x.device)].logsumexp(-1)
        return out.to(s.dtype)


def truth_set(formula: Formula, n_losers: int) -> frozenset[tuple[bool, ...]]:
    """The assignments ``(Yw, Yl1..YlK)`` that satisfy ``formula``; a plain ``Yl`` must hold for every loser."""
    rows = itertools.product((False, True), repeat=1 + n_losers)
    if formula.plain_loser:
        return frozenset(r for r in rows if all(formula.evaluate(r[0], (r[k],)) for k in range(1, 1 + n_losers)))
    return frozenset(r for r in rows if formula.evaluate(r[0], r[1:]))


@lru_cache(maxsize=256)
def compile_structure(formula: str, condition: str = "true", n_losers: int = 1) -> Compiled:
    """The truth tables of ``P & C`` and ``C`` over ``1 + n_losers`` propositions, checked for a usable loss."""
    p, c = parse(formula), parse(condition)
    top = max([n for f in (p, c) for n in f.names if n > 0], default=0)
    if top > n_losers:
        raise FormulaError(f"formula {formula!r} / condition {condition!r} names Yl{top}, but the groups have "
                           f"{n_losers} loser(s)")
    if n_losers > MAX_LOSERS:
        raise FormulaError(f"{n_losers} losers per group: exact weighted model counting enumerates 2^(1+K) "
                           f"assignments; use at most {MAX_LOSERS} losers or losers: pairs")
    rows = list(itertools.product((False, True), repeat=1 + n_losers))
    c_set = truth_set(c, n_losers)
    pc_set = truth_set(p, n_losers) & c_set
    if not c_set:
        raise FormulaError(f"condition {condition!r} is never true: nothing to condition on")
    if not pc_set:
        raise FormulaError(f"formula {formula!r} is never true together with condition {condition!r}: the loss "
                           "would be infinite")
    if pc_set == c_set:
        raise FormulaError(f"formula {formula!r} holds whenever condition {condition!r} does: the loss is 0 for "
                           "every input, so it would train nothing")
    index = {r: i for i, r in enumerate(rows)}
    return Compiled(
        assignments=torch.tensor(rows, dtype=torch.float64),
        core=torch.tensor(sorted(index[r] for r in pc_set)),
        condition=None if len(c_set) == len(rows) else torch.tensor(sorted(index[r] for r in c_set)),
    )


def structure_loss(s: Tensor, formula: str, condition: str = "true", losers: str = "all") -> Tensor:
    """The loss of ``(formula, condition)`` on proposition logits ``s`` ``(B, 1+K)``.

    A formula with a plain ``Yl`` and ``losers="pairs"`` is applied to each (winner, loser k) pair: ``(B, K)``;
    otherwise one loss per group ``(B,)`` over all ``1+K`` propositions (``Yl`` must then hold for every loser).
    """
    k = s.shape[-1] - 1
    if losers == "pairs" and (parse(formula).plain_loser or parse(condition).plain_loser):
        pairs = torch.stack([s[:, :1].expand(-1, k), s[:, 1:]], dim=-1)  # (B, K, 2)
        return compile_structure(formula, condition, 1).loss(pairs)
    return compile_structure(formula, condition, k).loss(s)


def proposition_logits(view: ScoreView, score: str, beta: float | None, margin: float = 0.0) -> Tensor:
    """``s(y)`` for every member ``(B, 1+K)``; ``margin`` is subtracted from the winner's (SimPO's gamma)."""
    s = view.log_odds if score == "log_odds" else _beta(score, beta) * view.get(SCORE_FORMS[score])
    if margin:
        s = torch.cat([s[:, :1] - margin, s[:, 1:]], dim=1)
    return s


def _beta(score: str, beta: float | None) -> float:
    return 1.0 if score == "log_odds" else DEFAULT_BETA if beta is None else beta


def _validate(params: dict[str, Any]) -> None:
    """Build-time checks: both formulas parse (errors name the position) and beta fits the score form."""
    if params["score"] == "log_odds" and params["beta"] is not None:
        raise ValueError("score log_odds has no beta (its proposition probability is exp(mean_lp) itself); "
                         "remove beta or use beta_mean_lp")
    p, c = parse(params["formula"]), parse(params["condition"])
    compile_structure(params["formula"], params["condition"],
                      max([1, *(n for f in (p, c) for n in f.names)]))  # unusable structures fail here, not mid-run


@register_loss(
    "logic",
    needs_reference=lambda p: p["score"] == "beta_r",
    needs_lengths=lambda p: p["score"] in ("beta_mean_lp", "log_odds"),
    reward=lambda p: SCORE_FORMS[p["score"]],
    reward_scale=lambda p: _beta(p["score"], p["beta"]),
    checks={"score": one_of(*SCORE_FORMS), "beta": optional(positive()), "margin": non_negative(),
            "losers": one_of("all", "pairs")},
    validate=_validate,
)
def logic(view: ScoreView, *, formula: str = "Yw & ~Yl", condition: str = "Yw xor Yl", score: str = "beta_r",
          beta: float | None = None, margin: float = 0.0, losers: str = "all") -> Tensor:
    """A loss compiled from a preference structure: ``-log WMC(formula & condition) + log WMC(condition)``.

    ``score`` picks the proposition logits (``beta_r``, ``beta_lp``, ``beta_mean_lp``, ``log_odds``; ``beta``
    defaults to 0.1, ``log_odds`` takes none); ``margin`` is subtracted from the winner's logit. With K losers a
    plain ``Yl`` means every loser (``losers="all"``: one count over all ``1+K`` propositions, so ``Yw & ~Yl`` is
    ``Yw & ~Yl1 & ... & ~YlK``) or each loser in turn (``"pairs"``: the pair loss averaged over the K pairs, as the
    registered pairwise losses do). The defaults are DPO.
    Paper: Richardson, Srikumar and Sabharwal 2025, "Understanding the Logic of Direct Preference Alignment through
    Logic" (arXiv 2412.17696).
    """
    return structure_loss(proposition_logits(view, score, beta, margin), formula, condition, losers)


def compile_loss(formula: str, condition: str = "true", score: str = "beta_r", **params: Any):
    """``compile_loss("Yw & ~Yl", condition="Yw xor Yl", score="beta_r", beta=0.1)``: a bound loss, used like
    :func:`mmpref.losses.get_loss`'s (``loss(Scores(...)) -> LossOutput``)."""
    from .registry import get_loss

    return get_loss("logic", formula=formula, condition=condition, score=score, **params)
