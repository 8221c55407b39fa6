"""Text preference data: load with ``datasets``, validate, render chat templates and tokenise.

Accepted layouts (``schema: auto`` detects them from the columns):

- ``pairs``: ``prompt``, ``chosen``, ``rejected`` strings.
- ``sets``: ``prompt``, ``chosen`` and ``rejected`` as a list of K strings (the same K on every row).
- ``unpaired``: ``prompt``, ``completion``, ``label`` (bool or 0/1; True = desirable), for kto/bco.
- ``completions``: instruction data for an SFT phase, ``prompt`` and ``completion`` with no ``label``, or TRL's
  conversational ``messages`` (the last message is the completion, the ones before it the prompt). Rows are groups
  of one: a winner and no losers, so only losses that read the winners alone (``sft``) can train on them.
- Grouped data may carry soft labels in ``win_prob``: ``P(chosen wins)`` for pairs, or one probability per
  completion (winner first) for sets; they reach ``Scores.win_prob`` (SPPO trains on them).
- ``conversational``: any of the above where the prompt is a list of ``{role, content}`` messages and the
  completions are messages (or strings); rendered with the tokenizer's chat template.
- Implicit prompts (TRL's layouts): ``chosen`` / ``rejected`` only, as strings or full conversations; and the
  H4 / Zephyr layout, a ``prompt`` string beside full conversations. The prompt is the shared prefix of the
  completions, extracted as TRL's ``extract_prompt`` does (:func:`extract_prompt`).

Prepared rows hold token ids only: ``idx`` (row position, used by the reference cache), ``row`` (row number in
the source split, for error messages), ``prompt_ids``, ``completion_ids`` (a list of 1+K sequences, winner first;
one sequence for unpaired data), plus ``label`` and ``kl_completion_ids`` (a completion of another prompt, KTO's
mismatched pair) for unpaired data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from mmpref.data.tables import BUILDERS, HubOptions, Table, load_table
from mmpref.data.udm import UDMConfig
from mmpref.errors import DataError
from mmpref.sources import check_source, looks_local

logger = logging.getLogger(__name__)

SCHEMAS = ("auto", "pairs", "sets", "unpaired", "completions", "conversational")
_SHOW = 5  # offending row numbers quoted per issue


@dataclass
class LLMDataConfig:
    """The ``data:`` section of an LLM run."""

    path: str = ""  # a JSON/JSONL/Parquet/CSV file, a directory of them, or a hub dataset id
    format: str = "auto"  # auto (from the file extension) | json | jsonl | parquet | csv
    split: str = "train"
    subset: str | None = None  # hub datasets (and folders in the hub layout): the configuration (load_dataset's name)
    revision: str | None = None  # hub datasets: branch, tag or commit
    data_dir: str | None = None  # hub datasets: a folder inside the repository
    schema: str = "auto"  # auto | pairs | sets | unpaired | completions | conversational
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    completion_column: str = "completion"
    label_column: str = "label"
    messages_column: str = "messages"  # completions layout: TRL's conversational SFT rows
    win_prob_column: str = "win_prob"  # optional soft labels (SPPO): P(chosen wins), or one per completion (sets)
    max_length: int = 1024  # prompt + completion tokens; completion tails are cut to fit (with a warning)
    max_prompt_length: int | None = None  # prompts longer than this keep their last tokens
    eval_split: str | None = None  # a split name, or a file path
    eval_fraction: float = 0.0  # held out from the training split when eval_split is not given
    skip_invalid: bool = False  # drop invalid rows (with a report) instead of raising
    udm: UDMConfig | None = None  # unpaired + bco: prompt-distribution matching weights (mmpref.data.udm)


class DataValidationError(DataError):
    """Invalid preference rows; the message lists counts and the first offending lines per issue."""


# ----- loading ------------------------------------------------------------------------------------------------------
def load_split(path: str, split: str, fmt: str = "auto", hub: HubOptions | None = None) -> Table:
    """One split from a local file / folder (also ``save_to_disk`` folders) or a hub id; see :mod:`.tables`."""
    return load_table(path, split, fmt, hub=hub)


def detect_layout(columns: list[str], cfg: LLMDataConfig, first: dict[str, Any] | None,
                  where: str = "data") -> tuple[str, bool]:
    """(``pairs`` | ``sets`` | ``unpaired`` | ``completions``, conversational?) from the columns and first row, or
    an error."""
    c = cfg
    has = set(columns)
    grouped_cols = [c.prompt_column, c.chosen_column, c.rejected_column]
    unpaired_cols = [c.prompt_column, c.completion_column, c.label_column]
    completion_cols = [c.prompt_column, c.completion_column]
    if cfg.schema in ("pairs", "sets"):
        need = grouped_cols
    elif cfg.schema == "unpaired":
        need = unpaired_cols
    elif cfg.schema == "completions":
        need = completion_cols
    elif set(unpaired_cols) <= has:
        need = unpaired_cols
    elif set(completion_cols) <= has and not {c.chosen_column, c.rejected_column} & has:
        need = completion_cols
    else:
        need = grouped_cols
    missing = [col for col in need if col not in has]
    if missing:
        raise DataValidationError(
            f"{where}: missing column(s) {missing} for schema {cfg.schema!r}; the data has {sorted(has)}"
            " (rename them with data.prompt_column / chosen_column / rejected_column / completion_column /"
            " label_column)"
        )
    conversational = cfg.schema == "conversational" or (first is not None and _is_messages(first[c.prompt_column]))
    if need == unpaired_cols:
        return "unpaired", conversational
    if need == completion_cols:
        return "completions", conversational
    if cfg.schema == "sets" or (first is not None and _is_list_of_completions(first[c.rejected_column])):
        return "sets", conversational
    return "pairs", conversational


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) and "content" in m for m in x)


def _is_list_of_completions(x: Any) -> bool:
    return isinstance(x, list) and not _is_messages(x)


# ----- implicit prompts ---------------------------------------------------------------------------------------------
def extract_prompt(completions: list[Any]) -> tuple[Any, list[Any]]:
    """(prompt, completions without it): the longest common prefix of the completions (strings: characters,
    conversations: messages), as TRL's ``extract_prompt``; a space where the completions part goes with them."""
    shortest = min(len(c) for c in completions)
    idx = next((i for i in range(shortest) if any(c[i] != completions[0][i] for c in completions[1:])), shortest)
    if isinstance(completions[0], str) and idx > 0 and completions[0][idx - 1] == " ":
        idx -= 1  # "Q? A" / "Q? B": the prompt is "Q?", the completions " A" and " B"
    return completions[0][:idx], [c[idx:] for c in completions]


def implicit_prompt(columns: list[str], first: dict[str, Any] | None, cfg: LLMDataConfig) -> bool:
    """True when the prompt must be extracted: no prompt column beside chosen / rejected, or a prompt string
    beside conversations that repeat it (H4 / Zephyr); TRL's ``maybe_extract_prompt`` decides the same way."""
    c = cfg
    if cfg.schema == "unpaired" or not {c.chosen_column, c.rejected_column} <= set(columns):
        return False
    if c.prompt_column not in columns:
        return True
    return first is not None and _is_messages(first[c.chosen_column]) and not _is_messages(first[c.prompt_column])


def with_extracted_prompts(raw: datasets.Dataset, cfg: LLMDataConfig) -> datasets.Dataset:
    """``raw`` with ``prompt`` / ``chosen`` / ``rejected`` rewritten by :func:`extract_prompt` (sets: over the
    winner and all K losers). Rows that are not text are left for the row checks to report."""
    c = cfg

    def split(row: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = row[c.chosen_column], row[c.rejected_column]
        sets = isinstance(rejected, list) and not _is_messages(rejected)
        members = [chosen, *(rejected if sets else [rejected])]
        if not all(isinstance(m, (str, list)) and len(m) for m in members) or \
                len({type(m) for m in members}) > 1:
            return {c.prompt_column: None, c.chosen_column: chosen, c.rejected_column: rejected}
        prompt, rest = extract_prompt(members)
        return {c.prompt_column: prompt, c.chosen_column: rest[0], c.rejected_column: rest[1:] if sets else rest[1]}

    return raw.map(split, desc="extract prompts")


def _messages_only(columns: list[str], cfg: LLMDataConfig) -> bool:
    """TRL's conversational SFT layout: a ``messages`` column and no prompt / completion / chosen columns."""
    return cfg.messages_column in columns and not {cfg.prompt_column, cfg.completion_column, cfg.chosen_column} & \
        set(columns) and cfg.schema in ("auto", "completions", "conversational")


def with_split_messages(raw: datasets.Dataset, cfg: LLMDataConfig) -> datasets.Dataset:
    """``messages`` -> ``prompt`` (every message but the last) and ``completion`` (the last, as a one-message
    list). Rows that are not a conversation ending in a reply are left empty for the row checks to report."""

    def split(row: dict[str, Any]) -> dict[str, Any]:
        msgs = row[cfg.messages_column]
        if not (_is_messages(msgs) and len(msgs) >= 2):
            return {cfg.prompt_column: None, cfg.completion_column: None}
        return {cfg.prompt_column: msgs[:-1], cfg.completion_column: msgs[-1:]}

    return raw.map(split, remove_columns=[cfg.messages_column], desc="split messages")


# ----- row checks ---------------------------------------------------------------------------------------------------
def _text_ok(x: Any, conversational: bool) -> bool:
    """A non-empty string, or (conversational) non-empty messages with non-empty string contents."""
    if conversational and isinstance(x, list):
        return _is_messages(x) and all(isinstance(m["content"], str) and m["content"].strip() for m in x)
    return isinstance(x, str) and bool(x.strip())


def row_issues(row: dict[str, Any], layout: str, conversational: bool, cfg: LLMDataConfig, k: int | None) -> list[str]:
    """Problems of one raw row (empty list when valid)."""
    issues = []
    if not _text_ok(row[cfg.prompt_column], conversational):
        issues.append("empty or non-string prompt")
    if layout in ("unpaired", "completions"):
        if not _text_ok(row[cfg.completion_column], conversational):
            issues.append("empty or non-string completion")
        if layout == "unpaired" and row[cfg.label_column] not in (True, False, 0, 1):
            issues.append("label not bool or 0/1")
        return issues
    chosen, rejected = row[cfg.chosen_column], row[cfg.rejected_column]
    losers = rejected if layout == "sets" else [rejected]
    if not isinstance(losers, list) or not losers:
        return [*issues, "rejected is not a non-empty list"]
    if not _text_ok(chosen, conversational) or not all(_text_ok(r, conversational) for r in losers):
        issues.append("empty or non-string chosen/rejected")
    elif any(r == chosen for r in losers):
        issues.append("chosen == rejected")
    if k is not None and len(losers) != k:
        issues.append(f"number of rejected differs from K={k}")
    if cfg.win_prob_column in row:  # the column is all or nothing: a batch has soft labels or hard ones
        if win_probs(row[cfg.win_prob_column], 1 + len(losers)) is None:
            issues.append(f"{cfg.win_prob_column} not a probability (pairs) or one per completion (sets) in [0, 1]")
    return issues


def win_probs(value: Any, n: int) -> list[float] | None:
    """Soft labels for ``n`` completions (winner first): a pair's ``P(chosen wins)`` gives ``[p, 1 - p]``; a list
    must hold ``n`` probabilities. None when ``value`` is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and n == 2:
        value = [float(value), 1.0 - float(value)]
    if not isinstance(value, list) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in value):
        return None
    return [float(v) for v in value]


def format_report(issues: dict[str, list[int]], where: str, table: Table) -> str:
    """``WHERE: 3 of 40 rows invalid: 2 row(s) with chosen == rejected (line 4, line 9); ...``"""
    parts = [f"{len(rows)} row(s) with {name} ({table.labels(sorted(rows), _SHOW)})" for name, rows in issues.items()]
    bad = len({r for rows in issues.values() for r in rows})
    return f"{where}: {bad} of {len(table.data)} rows invalid: " + "; ".join(parts)


# ----- rendering and tokenisation -----------------------------------------------------------------------------------
def encode_prompt(tok: PreTrainedTokenizerBase, prompt: Any) -> list[int]:
    """A prompt's token ids as a completion follows them: the chat template (with its generation prompt) for a
    list of messages, the tokenizer's own special tokens (e.g. BOS) for plain text."""
    if isinstance(prompt, list):
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt, add_special_tokens=True)["input_ids"]

class Tokenize:
    """Raw row -> prompt ids and completion ids, rendering chat templates; truncation keeps the prompt."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: LLMDataConfig, layout: str, conversational: bool):
        self.tok, self.cfg, self.layout, self.conv = tokenizer, cfg, layout, conversational

    def completions(self, row: dict[str, Any]) -> list[Any]:
        c = self.cfg
        if self.layout in ("unpaired", "completions"):
            return [row[c.completion_column]]
        rejected = row[c.rejected_column]
        return [row[c.chosen_column], *(rejected if self.layout == "sets" else [rejected])]

    def render(self, prompt: Any, completion: Any) -> tuple[str, str]:
        """Chat-rendered (prompt, completion) texts whose concatenation is the full conversation."""
        if not isinstance(prompt, list):
            prompt = [{"role": "user", "content": prompt}]
        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        head = self.tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = self.tok.apply_chat_template(prompt + reply, tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return head, full[len(head) :]

    def ids(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = row[self.cfg.prompt_column]
        comps = self.completions(row)
        if self.conv:
            texts = [self.render(prompt, c) for c in comps]
            prompt_ids = self.ids(texts[0][0], special=False)  # the template writes its own special tokens
            comp_ids = [self.ids(t[1], special=False) for t in texts]
        else:
            prompt_ids = self.ids(prompt, special=True)
            comp_ids = [self.ids(c, special=False) + [self.tok.eos_token_id] for c in comps]
        truncated = False
        mp = self.cfg.max_prompt_length
        if mp is not None and len(prompt_ids) > mp:
            prompt_ids, truncated = prompt_ids[-mp:], True
        room = max(self.cfg.max_length - len(prompt_ids), 0)
        if any(len(c) > room for c in comp_ids):
            comp_ids, truncated = [c[:room] for c in comp_ids], True
        out = {"prompt_ids": prompt_ids, "completion_ids": comp_ids, "truncated": truncated}
        if self.layout == "unpaired":
            out["label"] = bool(row[self.cfg.label_column])
        elif self.cfg.win_prob_column in row:
            out["win_prob"] = win_probs(row[self.cfg.win_prob_column], len(comp_ids))
        return out


# ----- the whole pipeline -------------------------------------------------------------------------------------------
def prepare_split(
    table: Table,
    tokenizer: PreTrainedTokenizerBase,
    cfg: LLMDataConfig,
    where: str,
    unpaired: bool = False,
    with_kl: bool = False,
) -> datasets.Dataset:
    """Validate and tokenise; ``unpaired`` turns groups into (winner: desirable, losers: undesirable) rows;
    ``with_kl`` adds mismatched KL completions to unpaired rows. See the module docstring."""
    raw = table.data
    first = raw[0] if len(raw) else None
    if _messages_only(raw.column_names, cfg):
        raw = with_split_messages(raw, cfg)
        first = raw[0] if len(raw) else None
    if implicit_prompt(raw.column_names, first, cfg):
        logger.info("%s: the prompt is implicit in chosen / rejected; using their shared prefix", where)
        raw = with_extracted_prompts(raw, cfg)
        first = raw[0] if len(raw) else None
    layout, conv = detect_layout(raw.column_names, cfg, first, where)
    k = None
    if layout == "sets" and isinstance(first[cfg.rejected_column], list):
        k = len(first[cfg.rejected_column])  # every row must have the first row's K
    issues: dict[str, list[int]] = {}
    valid = []
    for i, row in enumerate(raw):
        found = row_issues(row, layout, conv, cfg, k)
        for name in found:
            issues.setdefault(name, []).append(i)
        if not found:
            valid.append(i)
    if not valid:
        raise DataValidationError(f"{format_report(issues, where, table)}: no valid row is left; fix the data")
    rows = raw.select(valid).add_column("row", valid)
    tok = rows.map(Tokenize(tokenizer, cfg, layout, conv), remove_columns=raw.column_names, desc="tokenise")
    dropped = _token_level_issues(tok, cfg, layout)
    issues.update(dropped)
    report = ""
    if issues:
        report = format_report(issues, where, table)
        if not cfg.skip_invalid:
            raise DataValidationError(report + ". Fix the data or set data.skip_invalid=true to drop these rows.")
        logger.warning("%s; skipping them (data.skip_invalid=true)", report)
        bad = {r for rows in dropped.values() for r in rows}
        tok = tok.filter(lambda r: r not in bad, input_columns="row")
    if not len(tok):
        raise DataValidationError(f"{where}: none of the {len(raw)} rows is usable ({report})")
    n_trunc = sum(tok["truncated"])
    if n_trunc:
        logger.warning(
            "%s: %d of %d rows truncated to max_length=%d (completion tails dropped)",
            where,
            n_trunc,
            len(tok),
            cfg.max_length,
        )
    tok = tok.remove_columns("truncated")
    if layout == "completions" and unpaired:
        raise DataValidationError(f"{where}: prompt/completion rows without a label cannot train an unpaired loss "
                                  f"(kto, bco): add a {cfg.label_column!r} column (True = desirable)")
    if layout not in ("unpaired", "completions") and unpaired:
        tok = tok.map(explode_groups, batched=True, remove_columns=tok.column_names)
        layout = "unpaired"
    if layout == "unpaired" and with_kl:
        tok = tok.add_column("kl_completion_ids", mismatched_completions(tok, cfg.max_length))
    return tok.map(lambda _, i: {"idx": i}, with_indices=True)


def _token_level_issues(tok: datasets.Dataset, cfg: LLMDataConfig, layout: str) -> dict[str, list[int]]:
    """Rows that only fail once tokenised: a prompt that fills max_length, and a loser that becomes identical to
    its winner when both are cut to max_length (a zero margin: the pair teaches nothing but Adam noise)."""
    issues: dict[str, list[int]] = {}
    too_long = [r for r, n in zip(tok["row"], map(len, tok["prompt_ids"])) if n >= cfg.max_length]
    if too_long:
        issues[f"prompt alone >= max_length={cfg.max_length} tokens (raise data.max_length)"] = too_long
    if layout not in ("unpaired", "completions"):
        same = [r for r, comps in zip(tok["row"], tok["completion_ids"]) if any(c == comps[0] for c in comps[1:])]
        if same:
            issues[f"chosen and rejected identical once cut to max_length={cfg.max_length} tokens (raise "
                   "data.max_length)"] = same
    return issues


def explode_groups(batch: dict[str, list]) -> dict[str, list]:
    """Grouped rows -> unpaired rows: the winner is desirable, each loser undesirable (as TRL does for KTO)."""
    out: dict[str, list] = {"row": [], "prompt_ids": [], "completion_ids": [], "label": []}
    for row, prompt, comps in zip(batch["row"], batch["prompt_ids"], batch["completion_ids"]):
        for j, c in enumerate(comps):
            out["row"].append(row)
            out["prompt_ids"].append(prompt)
            out["completion_ids"].append([c])
            out["label"].append(j == 0)
    return out


def mismatched_completions(ds: datasets.Dataset, max_length: int) -> list[list[int]]:
    """For row i, the completion of the next row with a different prompt (KTO's KL pairs; fixed, so cacheable)."""
    prompts, comps = ds["prompt_ids"], [c[0] for c in ds["completion_ids"]]
    n, out = len(prompts), []
    for i in range(n):
        j = next((j % n for j in range(i + 1, i + n) if prompts[j % n] != prompts[i]), (i + 1) % n)
        out.append(comps[j][: max(max_length - len(prompts[i]), 1)])
    return out


def load_llm_data(
    cfg: LLMDataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    unpaired: bool = False,
    with_kl: bool = False,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval or None) prepared datasets for ``cfg``; see :func:`prepare_split` for the flags."""
    if cfg.schema not in SCHEMAS:
        raise DataError(f"data.schema must be one of {list(SCHEMAS)}; got {cfg.schema!r}")
    hub = HubOptions(cfg.subset, cfg.revision, cfg.data_dir)
    train = prepare_split(load_split(cfg.path, cfg.split, cfg.format, hub), tokenizer, cfg,
                          f"{cfg.path} [{cfg.split}]", unpaired, with_kl)
    if cfg.eval_split:
        if looks_local(cfg.eval_split) or os.path.splitext(cfg.eval_split)[1].lower() in BUILDERS:
            check_source(cfg.eval_split, "data.eval_split", "a data file, or the name of a split of data.path")
        own_file = os.path.isfile(cfg.eval_split)
        path, split = (cfg.eval_split, "train") if own_file else (cfg.path, cfg.eval_split)
        table = load_table(path, split, cfg.format, key="data.eval_split", hub=None if own_file else hub)
        return train, prepare_split(table, tokenizer, cfg, f"{path} [{split}]", unpaired, with_kl)
    if cfg.eval_fraction > 0:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        reindex = lambda d: d.map(lambda _, i: {"idx": i}, with_indices=True)
        return reindex(parts["train"]), reindex(parts["test"])
    return train, None
