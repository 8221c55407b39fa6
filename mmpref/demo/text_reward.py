"""The text demo's reward model: a tiny ``AutoModelForSequenceClassification`` trained on the preference pairs.

An online arm whose judge is ``demo:reward_model`` (RSO in ``configs/demo_text.yaml``: ``rso_rm``) scores the
policy's samples with it through the library's ``online.judge: {kind: reward_model}``, which loads it with
``from_pretrained``, exactly as a user's reward model.

Bradley-Terry reward modelling (``-log sigmoid(r(x, y_w) - r(x, y_l))``) is what TRL's ``RewardTrainer`` does; TRL is
not a dependency of mmpref, and for a ~100k-parameter model the loop below (sample a batch of pairs, one Adam step)
is all of it. The model starts from the SFT policy's weights with a fresh one-output score head (as TRL's reward
models start from the SFT model), and reads each pair rendered by :func:`mmpref.judges.reward_text`, the rendering
the judge scores with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mmpref.io import atomic_dir


def _scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    from mmpref.judges import reward_text

    texts = [reward_text(tokenizer, p, r) for p, r in zip(prompts, responses)]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return model(**enc).logits[:, 0].float()


def pair_accuracy(model, tokenizer, pairs: Sequence[dict], batch_size: int = 256) -> float:
    """Share of pairs whose ``chosen`` the model scores above ``rejected``."""
    right = 0
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            rows = pairs[s:s + batch_size]
            prompts = [r["prompt"] for r in rows]
            chosen = _scores(model, tokenizer, prompts, [r["chosen"] for r in rows])
            rejected = _scores(model, tokenizer, prompts, [r["rejected"] for r in rows])
            right += int((chosen > rejected).sum())
    return right / max(1, len(pairs))


def train_reward_model(init_dir: str | Path, pairs: Sequence[dict], val_pairs: Sequence[dict], out: Path,
                       steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Train with the Bradley-Terry loss on ``pairs`` and save the model and tokenizer to ``out`` (atomically);
    returns the loss curve's ends and the pair accuracy on ``pairs`` and ``val_pairs`` (also per ``perturbation``
    of the validation pairs)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(init_dir))
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report would list the fresh score head, which is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(init_dir), num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    model.train()
    for _ in range(steps):
        rows = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
        prompts = [r["prompt"] for r in rows]
        margin = (_scores(model, tokenizer, prompts, [r["chosen"] for r in rows])
                  - _scores(model, tokenizer, prompts, [r["rejected"] for r in rows]))
        loss = -F.logsigmoid(margin).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    result = {"steps": steps, "first_loss": losses[0] if losses else None,
              "last_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
              "train_accuracy": pair_accuracy(model, tokenizer, pairs), "val_accuracy": pair_accuracy(
                  model, tokenizer, val_pairs),
              "val_accuracy_by_perturbation": {k: pair_accuracy(model, tokenizer, [p for p in val_pairs if
                                                                                 p.get("perturbation") == k])
                                               for k in dict.fromkeys(p.get("perturbation") for p in val_pairs)}}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return result
