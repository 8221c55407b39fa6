"""The causal-LM adapter: summed completion log-probs per sequence for any transformers causal LM.

Design points:
- One forward pass per batch for the policy: a group's winner and its K losers (and KTO's mismatched KL rows) are
  rows of one right-padded batch of ``B * (1+K)`` sequences.
- Log-probs never materialise ``log_softmax`` over (rows, positions, vocab): the label logit is gathered and a
  float32 logsumexp is subtracted, chunk by chunk over positions. Only positions from the shortest prompt onward
  get logits (``logits_to_keep``); for half-precision models each chunk's float32 upcast is recomputed in backward
  (activation checkpointing) instead of being kept for the whole sequence.
- Reference scores come from a frozen copy, the LoRA-disabled policy, a disk cache filled in ``setup``, or
  nowhere, per ``cfg.reference.mode``; no reference model is loaded when no phase of the run needs one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmpref.config import Objective, RolloutConfig, TrainConfig
from mmpref.data.llm import LLMDataConfig, encode_prompt, load_llm_data
from mmpref.data.udm import UDMConfig, udm_weights
from mmpref.errors import ConfigError
from mmpref.io import atomic_file
from mmpref.losses import Scores
from mmpref.models.sampling import generate_completions, sample_batch
from mmpref.sources import check_source, loading
from mmpref.toy.llm import resolve_toy

from .base import Adapter, LossRequirements, local_main_process, unwrap

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class LLMModelConfig:
    """The ``model:`` section of an LLM run."""

    path: str = ""  # a local directory saved with save_pretrained (or a hub id, if you allow downloads)
    tokenizer: str | None = None  # None: the model's own
    torch_dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = 256  # positions per chunk of the log-prob reduction
    kl_max_new_tokens: int = 64  # length of the policy samples scored by the ``kl`` regulariser
    trust_remote_code: bool = False
    # LD-DPO (Liu et al. 2024, arXiv 2409.06411): a completion's tokens past its group's shared length (the shortest
    # completion of the group) count ld_alpha times in its score, policy and reference alike; None: all count 1
    ld_alpha: float | None = None
    # WPO (Zhou et al. 2024, arXiv 2406.11827): each pair's loss weighted by exp(mean_t[log p(y_t) - log sum_v
    # p(v)^2]) of winner and loser under the current policy (no gradient), so pairs the policy itself would
    # produce count more
    wpo: bool = False
    # QLoRA (Dettmers et al. 2023): "4bit" loads the policy's base weights in bitsandbytes NF4 with double
    # quantisation and bf16 compute, prepared with peft's prepare_model_for_kbit_training; LoRA trains on top.
    # Needs a CUDA GPU, the bitsandbytes package and lora.enabled.
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.quantization not in (None, "4bit"):
            raise ValueError(f"model.quantization must be 4bit or null, got {self.quantization!r}")
        if self.ld_alpha is not None and not (isinstance(self.ld_alpha, (int, float)) and 0 <= self.ld_alpha <= 1):
            raise ValueError(f"model.ld_alpha must be in [0, 1] or null, got {self.ld_alpha!r}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for reference passes; restores the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_quantization(mcfg: LLMModelConfig, cfg: TrainConfig) -> None:
    """``model.quantization`` needs LoRA, a CUDA GPU and bitsandbytes: refused here, before anything loads."""
    if mcfg.quantization is None:
        return
    if not cfg.lora.enabled:
        raise ConfigError("model.quantization=4bit (QLoRA) trains LoRA adapters on frozen 4-bit weights: set "
                          "lora.enabled=true")
    if cfg.reference.from_phase_start:
        raise ConfigError("model.quantization=4bit with reference.from_phase_start: the policy's 4-bit weights cannot "
                          "take a phase's LoRA adapter in, nor be copied into a reference; run each phase as its "
                          "own mmpref train with run.merge_lora=true (the next starting from its final/), or drop "
                          "model.quantization")
    if cfg.run.cpu or not torch.cuda.is_available():
        raise ConfigError("model.quantization=4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); this run has none"
                          " (run.cpu or no GPU): remove model.quantization to train in bf16/fp32")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization=4bit needs the bitsandbytes package: pip install bitsandbytes")


def quantized_loading(mcfg: LLMModelConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments for QLoRA: NF4 weights, double quantisation, bf16 compute, on this process's
    GPU (bitsandbytes layers cannot be moved after loading)."""
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": bnb, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


# ----- batching and log-probs --------------------------------------------------------------------------------------
def pad_sequences(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """(prompt, completion) id lists -> right-padded ``input_ids``, ``attention_mask``, ``completion_mask``."""
    length = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), length), dtype=torch.long)
    comp = torch.zeros((len(pairs), length), dtype=torch.bool)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        comp[i, len(p) : n] = True
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def _token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) in float32 for one chunk: gathered logit minus logsumexp (no log_softmax tensor)."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


@torch.no_grad()
def _token_log_sum_sq(logits: Tensor) -> Tensor:
    """``log sum_v p(v)^2`` per position (WPO's renormaliser): ``lse(2 x) - 2 lse(x)``, float32, no gradient."""
    x = logits.float()
    return torch.logsumexp(2 * x, dim=-1) - 2 * torch.logsumexp(x, dim=-1)


def sequence_logps(logits: Tensor, labels: Tensor, weights: Tensor, chunk_size: int,
                   wpo: bool = False) -> tuple[Tensor, Tensor | None]:
    """Weighted sums of float32 log-probs of ``labels`` (``weights``: 1 on completion tokens, 0 elsewhere, LD-DPO's
    alpha on a tail); ``logits[:, t]`` predicts ``labels[:, t]``. With ``wpo``, also the sum over the tokens with
    weight > 0 of ``log p(y_t) - log sum_v p(v)^2``, without gradient."""
    total = logits.new_zeros(logits.shape[0], dtype=torch.float32)
    aligned = torch.zeros_like(total) if wpo else None
    recompute = logits.requires_grad and logits.dtype != torch.float32
    for s in range(0, logits.shape[1], chunk_size):
        lg, lab, w = logits[:, s : s + chunk_size], labels[:, s : s + chunk_size], weights[:, s : s + chunk_size]
        m = w != 0
        if not m.any():
            continue
        lab = lab.masked_fill(~m, 0)
        # half-precision logits: recompute the float32 upcast in backward rather than keep it for every chunk
        lp = checkpoint(_token_logps, lg, lab, use_reentrant=False) if recompute else _token_logps(lg, lab)
        total = total + (lp * w).sum(-1)
        if wpo:
            aligned = aligned + ((lp.detach() - _token_log_sum_sq(lg)) * m).sum(-1)
    return total, aligned


# ----- the adapter --------------------------------------------------------------------------------------------------
class LLMAdapter(Adapter):
    """Causal LMs (any ``AutoModelForCausalLM``), optionally with LoRA (peft)."""

    name = "llm"
    model_config_class = LLMModelConfig
    data_config_class = LLMDataConfig
    supports_phase_data = True

    def __init__(self, cfg: TrainConfig, objectives: Sequence[Objective] | None = None):
        super().__init__(cfg, objectives)  # checks the objectives, resolves the reference mode
        # toy:llm, toy:prefs, toy:heldout (the tiny recipes' assets) become paths here, not in the saved config
        self.mcfg: LLMModelConfig = replace(cfg.model, path=resolve_toy(cfg.model.path),
                                            tokenizer=resolve_toy(cfg.model.tokenizer))
        self.ref_path = resolve_toy(cfg.reference.path)
        self.dcfg = replace(cfg.data, path=resolve_toy(cfg.data.path), eval_split=resolve_toy(cfg.data.eval_split))
        losses = [o.loss for o in self.objectives]
        self.unpaired = any(loss.unpaired for loss in losses)
        self.needs_kl = any(loss.needs_kl for loss in losses)
        if self.ref_mode == "cached" and self.needs_kl and not self.unpaired:
            raise ConfigError("reference.mode=cached cannot score on-policy KL samples (the kl term); use copy or lora")
        check_quantization(self.mcfg, cfg)  # before any weight loads
        check_source(self.mcfg.path, "model.path", "a causal LM folder saved with save_pretrained, or a hub id")
        if self.mcfg.tokenizer:
            check_source(self.mcfg.tokenizer, "model.tokenizer", "a tokenizer folder or a hub id")
        if self.ref_path:
            check_source(self.ref_path, "reference.path", "a causal LM folder or a hub id")
        tok_key, tok_source = ("model.tokenizer", self.mcfg.tokenizer) if self.mcfg.tokenizer else \
            ("model.path", self.mcfg.path)
        with loading(tok_key, tok_source, "a tokenizer (saved with save_pretrained)", "model.trust_remote_code"):
            self.tokenizer = AutoTokenizer.from_pretrained(tok_source,
                                                           trust_remote_code=self.mcfg.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.policy = self._load_policy()
        self.reference = (
            self._load_model(self.ref_path, self.cfg.reference.dtype, frozen=True)
            if (self.ref_mode == "copy")
            else None
        )
        self._last: dict[str, float] = {}
        if cfg.online is not None:  # the data are the policy's own samples (mmpref.online)
            self._check_online(cfg)
            self._train = self._eval = None
            return
        # one (train, eval) pair per phase: the run's `data:`, or a phase's own (loaded once per distinct section)
        loaded: dict[str, tuple[Any, Any]] = {}
        self._phase_data = []
        for i, o in enumerate(self.objectives):
            own = cfg.phases[i].data if cfg.phases else None
            dcfg, key = (self.dcfg, "data") if own is None else \
                (replace(own, path=resolve_toy(own.path), eval_split=resolve_toy(own.eval_split)), f"phases.{i}.data")
            if repr(dcfg) not in loaded:
                loaded[repr(dcfg)] = self._load_data(dcfg, key)
            self._phase_data.append(loaded[repr(dcfg)])
            self._check_losers(o, self._phase_data[-1][0], key, dcfg)
        self._train, self._eval = self._phase_data[0]

    def _load_data(self, dcfg: LLMDataConfig, key: str) -> tuple[Any, Any]:
        """(train, eval or None) prepared rows of one data section; ``key`` names it in errors."""
        train, evl = load_llm_data(dcfg, self.tokenizer, seed=self.cfg.run.seed, unpaired=self.unpaired,
                                   with_kl=self.needs_kl)
        if "completion_ids" in train.column_names and "label" in train.column_names and not self.unpaired:
            raise ConfigError(f"{key}.path: {dcfg.path} holds unpaired rows (prompt, completion, label); they need "
                              "an unpaired loss such as kto or bco")
        return self._add_udm_weights(dcfg.udm, train, evl, key) if dcfg.udm is not None else (train, evl)

    def _check_losers(self, objective: Objective, train: Any, key: str, dcfg: LLMDataConfig) -> None:
        """Instruction rows (prompt, completion) have a winner and no losers: only winner-only losses train on them."""
        if self.unpaired or len(train[0]["completion_ids"]) > 1 or not objective.loss.uses_losers:
            return
        raise ConfigError(f"{objective.label}: {key}.path {dcfg.path} holds prompt/completion rows without losers; "
                          f"this loss compares winners with losers: give it preference data (phases.N.data) or "
                          f"train these rows with sft")

    def _add_udm_weights(self, udm: UDMConfig, train: Any, evl: Any, key: str) -> tuple[Any, Any]:
        """A ``udm_weight`` column on the train (and eval) rows: BCO's prompt density ratios (mmpref.data.udm)."""
        heads = {h for o in self.objectives for h in o.loss.heads}
        if "bco" not in heads:
            raise ConfigError(f"{key}.udm: prompt-distribution weights are used by the bco loss only; this run's "
                              f"losses are {sorted(heads)} (remove {key}.udm or train with bco)")
        check_source(udm.embedding_model, f"{key}.udm.embedding_model", "a text encoder folder or a hub id")
        sets = [d for d in (train, evl) if d is not None]
        prompts = [(self.tokenizer.batch_decode(list(d["prompt_ids"]), skip_special_tokens=True), list(d["label"]))
                   for d in sets]
        weights = udm_weights(udm, *prompts[0], *prompts[1:])
        train, *rest = [d.add_column("udm_weight", w.tolist()) for d, w in zip(sets, weights)]
        undesirable = weights[0][~np.asarray(prompts[0][1], bool)]
        logger.info("%s.udm: undesirable rows' weights mean %.3f, range [%.3f, %.3f]", key, undesirable.mean(),
                    undesirable.min(), undesirable.max())
        return train, (rest[0] if evl is not None else None)

    # ----- construction -------------------------------------------------------------------------------------------
    def _load_model(self, path: str | None, dtype: str | None, frozen: bool, quantize: bool = False) -> nn.Module:
        dtype = dtype or self.mcfg.torch_dtype
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        key = "reference.path" if path else "model.path"
        what = "a causal LM (saved with save_pretrained)"
        with loading(key, path or self.mcfg.path, what, "model.trust_remote_code"):
            model = AutoModelForCausalLM.from_pretrained(
                path or self.mcfg.path,
                dtype=_DTYPES[dtype],
                attn_implementation=self.mcfg.attn_implementation,
                trust_remote_code=self.mcfg.trust_remote_code,
                **(quantized_loading(self.mcfg) if quantize else {}),
            )
        if frozen:
            model.eval().requires_grad_(False)
        return model

    def _load_policy(self) -> nn.Module:
        model = self._load_model(None, None, frozen=False, quantize=self.mcfg.quantization is not None)
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if self.mcfg.quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.mcfg.gradient_checkpointing)
        elif self.mcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        lc = self.cfg.lora
        if not lc.enabled:
            return model
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=lc.r,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=lc.target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_cfg)

    # ----- datasets and batches -----------------------------------------------------------------------------------
    @property
    def train_dataset(self) -> Any:
        return self._train

    @property
    def eval_dataset(self) -> Any | None:
        return self._eval

    @property
    def phase_train_datasets(self) -> list[Any]:
        return [train for train, _ in self._phase_data] if self._train is not None else super().phase_train_datasets

    @property
    def phase_eval_datasets(self) -> list[Any | None]:
        return [evl for _, evl in self._phase_data] if self._train is not None else super().phase_eval_datasets

    def data_fingerprint(self) -> str:
        """datasets' fingerprints of the prepared splits (every phase's): they follow the source files (path and
        modification time) and every preparation step (tokeniser, lengths, layout)."""
        sets = {id(pair[0]): pair for pair in self._phase_data} if self._train is not None else {}
        parts = [d._fingerprint for pair in sets.values() for d in pair if d is not None]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def collate(self, rows: list[dict]) -> dict:
        """Rows -> one right-padded batch: all 1+K completions of each group (row-major), then KL rows."""
        pairs = [(r["prompt_ids"], c) for r in rows for c in r["completion_ids"]]
        if self.unpaired and self.needs_kl:
            pairs += [(r["prompt_ids"], r["kl_completion_ids"]) for r in rows]
        batch = pad_sequences(pairs, self.tokenizer.pad_token_id)
        batch["idx"] = torch.tensor([r["idx"] for r in rows])
        if self.unpaired:
            batch["desirable"] = torch.tensor([bool(r["label"]) for r in rows])
            if "udm_weight" in rows[0]:
                batch["udm_weight"] = torch.tensor([r["udm_weight"] for r in rows])
        if "win_prob" in rows[0]:  # soft labels (SPPO): one probability per completion
            batch["win_prob"] = torch.tensor([r["win_prob"] for r in rows], dtype=torch.float32)
        if self.mcfg.ld_alpha is not None:  # LD-DPO: each row's group-shared completion length
            shared = [min(map(len, r["completion_ids"])) if not self.unpaired else len(c)
                      for r in rows for c in r["completion_ids"]]
            shared += [len(r["kl_completion_ids"]) for r in rows] if self.unpaired and self.needs_kl else []
            batch["ld_shared"] = torch.tensor(shared)
        if "ref" in rows[0]:  # cached reference scores, in the same row order
            refs = [x for r in rows for x in r["ref"]] + [r["kl_ref"] for r in rows if "kl_ref" in r]
            batch["ref"] = torch.tensor(refs, dtype=torch.float32)
        return batch

    # ----- scores -------------------------------------------------------------------------------------------------
    def forward_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(summed completion log-probs, completion lengths), one float32 value per row of ``batch``."""
        return self._forward(model, batch)[:2]

    def _forward(self, model: nn.Module, batch: dict[str, Tensor],
                 wpo: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`forward_logps`, and with ``wpo`` each row's mean ``log p(y_t) - log sum_v p(v)^2`` (no grad)."""
        ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        first = int(comp.float().argmax(-1).min())  # earliest completion token over the batch
        keep = ids.shape[1] - first + 1
        kwargs = {"logits_to_keep": keep} if self._keep_logits else {}
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False, **kwargs).logits
        logits = logits[:, -keep:-1]  # positions first-1 .. L-2 predict tokens first .. L-1
        weights = self._token_weights(batch)[:, first:]
        logps, aligned = sequence_logps(logits, ids[:, first:], weights, self.mcfg.logprob_chunk_size, wpo)
        lengths = comp.sum(-1)
        return logps, lengths, None if aligned is None else aligned / lengths.clamp_min(1)

    def _token_weights(self, batch: dict[str, Tensor]) -> Tensor:
        """1 on completion tokens; with ``model.ld_alpha``, alpha on those past the row's ``ld_shared`` length."""
        comp = batch["completion_mask"]
        if self.mcfg.ld_alpha is None or "ld_shared" not in batch:
            return comp.float()
        tail = comp.cumsum(-1) > batch["ld_shared"][:, None]  # 1-based position within the completion
        return comp.float() * torch.where(tail, float(self.mcfg.ld_alpha), 1.0)

    def reference_logps(self, policy: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Reference log-probs per row, without gradients."""
        if self.ref_mode == "cached":
            return batch["ref"]
        model = self.reference if self.ref_mode == "copy" else policy
        adapter_off = unwrap(policy).disable_adapter() if self.ref_mode == "lora" else contextlib.nullcontext()
        with torch.no_grad(), adapter_off, eval_mode(model):
            return self.forward_logps(model, batch)[0]

    def scores(self, policy: nn.Module, batch: dict, loss: LossRequirements) -> Scores:
        """Summed completion log-probs of every row of ``batch`` under the policy, and what ``loss`` needs besides.

        Grouped data gives ``(B, 1+K)`` scores (winner first) with lengths; unpaired data ``(B,)`` scores with
        ``labels`` (and BCO's ``weights``). The reference pass runs first, without gradients, so its activations
        are freed before the policy's graph is built. KL scores come from the batch's mismatched rows (KTO) or from
        fresh policy samples (the ``kl`` term).
        """
        b = batch["idx"].shape[0]
        kl_rows = self.unpaired and self.needs_kl
        need_ref = loss.needs_reference or (loss.needs_kl and kl_rows)
        ref = self.reference_logps(policy, batch) if need_ref else None  # before the policy pass: lower peak
        logps, lengths, aligned = self._forward(policy, batch, wpo=self.mcfg.wpo and not self.unpaired)
        out = Scores(policy=logps, reference=ref, lengths=lengths, log_weights=aligned)
        if self.unpaired:
            out.labels, out.weights = batch["desirable"], batch.get("udm_weight")
            if kl_rows and loss.needs_kl:
                out.kl_policy, out.kl_reference = logps[b:], ref[b:]
            out.policy, out.lengths = logps[:b], lengths[:b]
            out.reference = ref[:b] if loss.needs_reference else None
        else:
            out = Scores(**{k: None if v is None else v.view(b, -1) for k, v in vars(out).items()})
            out.win_prob = batch.get("win_prob")
            if loss.needs_kl:
                out.kl_policy, out.kl_reference = self.sampled_kl_scores(policy, batch)
        self._last = {"tokens/completion": float(lengths.float().mean()), "tokens/rows": float(len(lengths))}
        return out

    def sampled_kl_scores(self, policy: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Policy and reference log-probs of one fresh policy sample per prompt (the ``kl`` regulariser)."""
        b = batch["idx"].shape[0]
        group = batch["input_ids"].shape[0] // b
        winners = {k: batch[k][::group] for k in ("input_ids", "completion_mask")}
        prompts = [
            ids[: int(m.float().argmax())].tolist() for ids, m in zip(winners["input_ids"], winners["completion_mask"])
        ]
        samples = self._sample(policy, prompts)
        kl_batch = {
            k: v.to(batch["input_ids"].device)
            for k, v in pad_sequences(list(zip(prompts, samples)), self.tokenizer.pad_token_id).items()
        }
        ref = self.reference_logps(policy, kl_batch)
        return self.forward_logps(policy, kl_batch)[0], ref

    def _sample(self, policy: nn.Module, prompts: list[list[int]]) -> list[list[int]]:
        """One sampled completion per prompt (the policy in eval mode), cut after EOS."""
        model = unwrap(policy)
        with eval_mode(model):
            return generate_completions(model, prompts, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                                        self.mcfg.kl_max_new_tokens)

    def step_metrics(self) -> dict[str, float]:
        return dict(self._last)

    # ----- online: the policy's own samples (mmpref.online) ---------------------------------------------------------
    def _check_online(self, cfg: TrainConfig) -> None:
        if self.unpaired:
            raise ConfigError("online: unpaired losses (kto, bco) train on labelled rows; online rollouts make "
                              "winner/loser groups: use a grouped loss (dpo, ipo, sppo, ...)")
        if self.ref_mode == "cached":
            raise ConfigError("reference.mode=cached cannot score samples drawn during training; use copy or lora")
        if cfg.online.generation.mixture and self.ref_mode != "copy":
            raise ConfigError("online.generation.mixture samples from the policy and a reference model: it needs "
                              "reference.mode=copy")
        if cfg.online.update_reference and self.ref_mode != "copy":
            raise ConfigError("online.update_reference copies the policy into the reference: it needs "
                              "reference.mode=copy")

    def sample(self, policy: nn.Module, prompts: Sequence[Any], n: int, seeds: Sequence[int],
               rollout: RolloutConfig) -> list[list[list[int]]]:
        """``n`` completions (token ids) per prompt, all prompts in one batch; prompt i's randomness is ``seeds[i]``
        alone (the batch's padding still depends on which prompts share it: the online source fixes that)."""
        model = unwrap(policy)
        with eval_mode(model):
            return sample_batch(model, [self.prompt_ids(p) for p in prompts], n, self.tokenizer.eos_token_id,
                                rollout.max_new_tokens, [torch.Generator().manual_seed(int(s)) for s in seeds],
                                pad_id=self.tokenizer.pad_token_id, reference=self.reference, mixture=rollout.mixture,
                                temperature=rollout.temperature, top_p=rollout.top_p)

    def prompt_ids(self, prompt: Any) -> list[int]:
        """A prompt's token ids as training sees them (chat template for message lists), cut to max_prompt_length."""
        ids = encode_prompt(self.tokenizer, prompt)
        mp = self.dcfg.max_prompt_length
        return ids[-mp:] if mp else ids

    def judge_inputs(self, rollouts: Sequence[list[int]]) -> list[str]:
        """What a judge reads: the decoded completions."""
        return self.tokenizer.batch_decode(list(rollouts), skip_special_tokens=True)

    def group_row(self, index: int, prompt: Any, members: Sequence[list[int]],
                  win_prob: Sequence[float] | None) -> dict:
        """One group in the offline layout (winner first), so :meth:`collate` and :meth:`scores` serve it as is."""
        row = {"idx": index, "prompt_ids": self.prompt_ids(prompt), "completion_ids": [list(m) for m in members]}
        if win_prob is not None:
            row["win_prob"] = list(win_prob)
        return row

    def rollout_record(self, rollout: list[int]) -> list[int]:
        return list(rollout)

    def rollout_from_record(self, record: Any) -> list[int]:
        return list(record)

    # ----- setup: device placement and the reference cache --------------------------------------------------------
    def setup(self, accelerator: Any) -> None:
        if self.reference is not None:
            self.reference.to(accelerator.device)
        if self.ref_mode == "cached":
            cached: dict[int, Any] = {}  # one cache per distinct dataset
            for i, pair in enumerate(self._phase_data):
                names = ("train", "eval") if i == 0 else (f"phase{i}-train", f"phase{i}-eval")
                for ds, name in zip(pair, names):
                    if ds is not None and id(ds) not in cached:
                        cached[id(ds)] = self._attach_cache(accelerator, ds, name)
            self._phase_data = [tuple(cached.get(id(d)) if d is not None else None for d in p)
                                for p in self._phase_data]
            self._train, self._eval = self._phase_data[0]

    def _attach_cache(self, accelerator: Any, ds: Any, split: str) -> Any:
        """Add ``ref`` (and ``kl_ref``) columns of reference log-probs, computed once and stored on disk."""
        model = self.policy if not (self.ref_path or self.cfg.reference.dtype) else None
        model = model or self._load_model(self.ref_path, self.cfg.reference.dtype, frozen=True)
        cache_dir = self.cfg.reference.cache_dir or os.path.join(self.cfg.run.output_dir, "reference_cache")
        path = os.path.join(cache_dir, f"{split}-{self.cache_fingerprint(ds, model)}.safetensors")
        with accelerator.main_process_first():
            if not os.path.exists(path):
                if accelerator.is_main_process:
                    logger.info("computing reference log-probs for %d %s rows -> %s", len(ds), split, path)
                    with atomic_file(path) as tmp:  # a killed run never leaves a half cache
                        save_file(self._reference_pass(model, ds, accelerator.device), str(tmp))
            else:
                logger.info("reusing cached reference log-probs %s", path)
            cache = load_file(path)
        ds = ds.add_column("ref", cache["ref"].tolist())
        return ds.add_column("kl_ref", cache["kl_ref"].tolist()) if "kl_ref" in cache else ds

    @torch.no_grad()
    def _reference_pass(self, model: nn.Module, ds: Any, device: torch.device) -> dict[str, Tensor]:
        base = unwrap(model)
        was = next(base.parameters()).device
        base.to(device)
        adapter_off = base.disable_adapter() if hasattr(base, "disable_adapter") else contextlib.nullcontext()
        refs, kls = [], []
        bs = self.cfg.run.batch_size
        with adapter_off, eval_mode(base):
            for s in tqdm(range(0, len(ds), bs), desc="reference log-probs", unit="batch",
                          disable=not local_main_process()):
                rows = [ds[i] for i in range(s, min(s + bs, len(ds)))]
                batch = {k: v.to(device) for k, v in self.collate(rows).items()}
                lp = self.forward_logps(base, batch)[0].float().cpu()
                n = len(rows) * (1 if self.unpaired else len(rows[0]["completion_ids"]))
                refs.append(lp[:n].view(len(rows), -1))
                kls.append(lp[n:])
        base.to(was)
        out = {"ref": torch.cat(refs).contiguous()}
        if self.unpaired and self.needs_kl:
            out["kl_ref"] = torch.cat(kls).contiguous()
        return out

    def cache_fingerprint(self, ds: Any, model: nn.Module) -> str:
        """Hash of the tokenised rows, the reference weights (LoRA weights excluded) and tokenisation settings."""
        h = hashlib.blake2b(digest_size=16)
        d = self.dcfg
        settings = [d.max_length, d.max_prompt_length, self.unpaired, self.needs_kl, type(unwrap(model)).__name__]
        settings += [self.mcfg.ld_alpha] if self.mcfg.ld_alpha is not None else []  # older caches keep their key
        h.update(json.dumps(settings).encode())
        cols = [c for c in ("prompt_ids", "completion_ids", "kl_completion_ids") if c in ds.column_names]
        for chunk in ds.select_columns(cols).iter(batch_size=4096):
            h.update(json.dumps(chunk).encode())
        for name, t in sorted(unwrap(model).state_dict().items()):
            if "lora_" not in name:
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ----- saving -------------------------------------------------------------------------------------------------
    def card_metadata(self) -> dict[str, Any]:
        adapter_only = self.cfg.lora.enabled and not self.cfg.run.merge_lora
        if adapter_only:  # final/ is the adapter: peft finds the base model from its adapter_config.json
            usage = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                     "model = AutoPeftModelForCausalLM.from_pretrained({repo})\n")
        else:
            usage = "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n" \
                    "model = AutoModelForCausalLM.from_pretrained({repo})\n"
        return {"library_name": "peft" if adapter_only else "transformers", "base_model": self.cfg.model.path,
                "pipeline_tag": "text-generation", "usage": usage + "tokenizer = AutoTokenizer.from_pretrained({repo})"}

    def save_pretrained(self, policy: nn.Module, path: str) -> None:
        """safetensors weights and the tokenizer. With LoRA: the adapter alone, or with ``run.merge_lora`` the
        merged full model (the adapter alone in ``adapter/``), which ``AutoModelForCausalLM`` loads as it is."""
        model = unwrap(policy)
        if self.cfg.lora.enabled and self.cfg.run.merge_lora:
            model.save_pretrained(os.path.join(path, "adapter"))
            merged = copy.deepcopy(model).merge_and_unload()  # the policy itself keeps its adapter
            merged.config.use_cache = True  # turned off for training only
            merged.save_pretrained(path)
        else:
            model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
