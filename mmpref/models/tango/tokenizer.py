"""A tiny T5-style tokenizer trained locally (no download) for the ``tiny`` preset.

BPE over a built-in corpus of sound-event words, with every letter and digit in the alphabet, so any caption
tokenizes (unseen words fall back to sub-words). T5 conventions: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2,
``</s>`` appended to every sequence.
"""

from __future__ import annotations

import os
import string
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]

# Words of typical AudioCaps-style captions; the BPE merges make these single tokens.
_WORDS = """
a an the and or of in on at by with while then before after followed as from to into over under near far
someone somebody person people man men woman women child children baby babies crowd audience group
dog dogs puppy bark barks barking growl growls cat cats meow meows purr bird birds chirp chirps chirping
tweet sing sings singing crow crows rooster duck ducks quack goose geese pigeon coo owl hoot horse neigh
cow cows moo sheep bleat goat pig oink frog frogs croak insect insects buzz buzzing bee bees fly flies
cricket crickets wind blows blowing rain rains raining thunder storm water flows flowing stream river
waves ocean splash splashing drip dripping pour pouring fire crackle crackling leaves rustle rustling
car cars engine engines idle idling rev revs revving accelerate accelerates truck bus train trains
horn horns honk honks siren sirens motorcycle vehicle vehicles passes passing drives driving traffic
aircraft airplane plane jet helicopter propeller boat ship whistle whistles whistling bell bells ring
rings ringing alarm clock tick ticks ticking door doors slam slams knock knocks knocking footsteps walk
walks walking run runs running step steps typing keyboard phone telephone beep beeps beeping click
clicks clicking hammer hammering drill drilling saw sawing machine machinery motor humming hum hums
speak speaks speaking talk talks talking speech voice voices laugh laughs laughing cry cries crying
shout shouts shouting scream screams whisper whispers cough coughs sneeze applause applauding clap
claps clapping cheer cheers cheering music musical guitar piano drum drums violin song plays playing
loud loudly quiet quietly soft softly distant distance close nearby background foreground repeatedly
continuously briefly several multiple many few once twice low high pitched pitch rapid rapidly slow
slowly sound sounds noise noises static white heavy light small large big little young old female male
is are being gets goes comes starts stops begins ends then there here outside inside room street
""".split()


def caption_corpus() -> list[str]:
    """The training text of the tiny tokenizers (AudioLDM 2's tiny preset trains on it too)."""
    # each word several times so merges form whole words; a few phrases teach common pairs
    return [" ".join(_WORDS)] * 4 + [f"a {w} is heard" for w in _WORDS]


def build_tiny_tokenizer(vocab_size: int = 1024, model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """Train the tiny BPE tokenizer (deterministic) and wrap it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation),
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def resolve_tokenizer(tok: Any) -> Any:
    """A tokenizer from what a pipeline config or a caller gives: an object (kept), ``"tiny"`` (this module's), or
    a local folder / hub id (``AutoTokenizer``)."""
    if tok is None or not isinstance(tok, str | os.PathLike):
        return tok
    if tok == "tiny":
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(tok))
