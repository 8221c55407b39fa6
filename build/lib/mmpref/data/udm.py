"""BCO's underlying-distribution matching (UDM): weights that make undesirable rows' prompts count as if drawn
from the desirable rows' prompt distribution.

Unpaired data often has desirable and undesirable answers to *different* prompts (e.g. thumbs-up logs come from
other users than thumbs-down ones). Jung et al. 2024 ("Binary Classifier Optimization for Large Language Model
Alignment", arXiv 2404.04656) train a classifier on prompt embeddings to tell the two apart; its odds
``p / (1 - p)`` (with balanced class weights, so the label imbalance cancels) estimate the density ratio
``p_desirable(x) / p_undesirable(x)``; clamped to ``[min_ratio, max_ratio]`` (paper: [0.5, 10]) it weights each
undesirable row's loss (:func:`mmpref.losses.pointwise.bco`). Desirable rows get weight 1.

The classifier is scikit-learn's ``LogisticRegression`` (the optional extra ``mmpref[udm]``), fitted once on the
training rows before training; the evaluation rows use the same classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class UDMConfig:
    """``data.udm``: prompt-distribution matching weights for BCO.

    embedding_model: a folder or hub id that ``transformers.AutoModel`` loads (a sentence encoder; a causal LM
        works too). A prompt's embedding is the mean of its last hidden states over the prompt's tokens.
    """

    embedding_model: str
    min_ratio: float = 0.5
    max_ratio: float = 10.0
    batch_size: int = 32
    max_length: int = 512

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= self.max_ratio:
            raise ValueError(f"data.udm: need 0 < min_ratio <= max_ratio, got {self.min_ratio}, {self.max_ratio}")


@torch.no_grad()
def embed_texts(texts: Sequence[str], model_path: str, batch_size: int = 32, max_length: int = 512) -> np.ndarray:
    """Mean-pooled last hidden states ``(N, D)`` (float32) of ``texts`` under ``model_path``'s AutoModel."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(model_path).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tok = tokenizer(list(texts[start: start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(**tok).last_hidden_state.float()
        mask = tok["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def fit_desirable_classifier(embeddings: np.ndarray, desirable: np.ndarray):
    """A logistic classifier of ``p(desirable | embedding)`` with balanced class weights (scikit-learn)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError("data.udm needs scikit-learn: pip install 'mmpref[udm]'") from e
    desirable = np.asarray(desirable, bool)
    if desirable.all() or not desirable.any():
        raise ValueError("data.udm: the training rows need both desirable and undesirable labels to fit the "
                         "prompt classifier")
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    return model.fit(embeddings, desirable)


def density_ratio_weights(classifier, embeddings: np.ndarray, desirable: np.ndarray, min_ratio: float,
                          max_ratio: float) -> np.ndarray:
    """``clamp(p / (1 - p), min_ratio, max_ratio)`` for undesirable rows, 1 for desirable ones (float32)."""
    p = classifier.predict_proba(embeddings)[:, list(classifier.classes_).index(True)]
    ratio = np.clip(p / np.clip(1 - p, 1e-12, None), min_ratio, max_ratio)
    return np.where(np.asarray(desirable, bool), 1.0, ratio).astype(np.float32)


def udm_weights(cfg: UDMConfig, train_prompts: Sequence[str], train_desirable: Sequence[bool],
                *others: tuple[Sequence[str], Sequence[bool]]) -> list[np.ndarray]:
    """Fit on the training rows; weights for them and for every ``(prompts, desirable)`` in ``others``."""
    embed = lambda texts: embed_texts(texts, cfg.embedding_model, cfg.batch_size, cfg.max_length)  # noqa: E731
    train_emb = embed(train_prompts)
    classifier = fit_desirable_classifier(train_emb, np.asarray(train_desirable, bool))
    sets = [(train_emb, train_desirable)] + [(embed(p), d) for p, d in others]
    return [density_ratio_weights(classifier, e, d, cfg.min_ratio, cfg.max_ratio) for e, d in sets]
