"""A tiny random CLAP (transformers' ``ClapModel``) with a locally trained tokenizer: the LAION CLAP code path at a
size that runs in CPU tests, the demo, and ``preset:tiny`` scorers of ``mmpref synth``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmpref.scoring.clap import ClapScorer
from mmpref.toy.llm import train_tokenizer

# what the tokenizer learns when no texts are given: a few sound events of each kind
DEFAULT_TEXTS = (
    "a dog barks", "a cat meows", "birds chirp", "a rooster crows", "a man speaks", "a woman sings", "a baby cries",
    "people applaud", "a car engine revs", "a train passes", "a siren wails", "wind blows", "rain falls",
    "thunder rumbles", "water flows in a stream", "a door slams", "a phone rings", "glass shatters",
    "a bell rings", "an alarm beeps", "a drill whirs", "a hammer pounds", "a guitar plays", "drums beat",
)


def tiny_clap_parts(seed: int = 0, texts: Sequence[str] | None = None, max_length_s: int = 2) -> tuple[Any, Any]:
    """A random tiny ``ClapModel`` (~0.2M parameters, 16 mel bins) and its processor with a locally trained
    tokenizer: same code path as LAION CLAP, sized for CPU tests. Deterministic in ``seed``. The tokenizer is trained
    on ``texts`` (default: a few sound-event phrases): pass the captions it will score, so they do not split into
    bytes."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    corpus = list(texts) if texts else list(DEFAULT_TEXTS)
    tokenizer = train_tokenizer(corpus * 4, vocab_size=400)
    extractor = ClapFeatureExtractor(feature_size=16, max_length_s=max_length_s, truncation="rand_trunc",
                                     padding="repeatpad")
    config = ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id),
        audio_config=dict(spec_size=64, num_mel_bins=16, window_size=4, depths=[1, 1], num_attention_heads=[1, 2],
                          patch_embeds_hidden_size=16, hidden_size=32, num_hidden_layers=2),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClapModel(config).eval()
    return model, ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def make_tiny_clap(path: str | os.PathLike, seed: int = 0, texts: Sequence[str] | None = None) -> Path:
    """Build :func:`tiny_clap_parts` and save model + processor to ``path`` (a loadable CLAP checkpoint)."""
    path = Path(path)
    model, processor = tiny_clap_parts(seed, texts)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_clap_scorer(seed: int = 0, texts: Sequence[str] | None = None, **kwargs: Any) -> ClapScorer:
    """An in-memory tiny CLAP scorer (``preset:tiny`` in a synth config); ``kwargs`` go to :class:`ClapScorer`."""
    model, processor = tiny_clap_parts(seed, texts)
    return ClapScorer(model=model, processor=processor, name=f"preset:tiny(seed={seed})", **kwargs)
