"""Words of captions: which are function words, and a crude stemmer, shared by the caption parser and the concept
vocabulary (deterministic rules, no model)."""

from __future__ import annotations

import re

DETERMINERS = frozenset(
    "a an the some someone somebody several many multiple few two three people person man men woman women "
    "child children kids baby crowd group he she they it something another one".split()
)
PRONOUNS = frozenset("he she they it something one are is was were being been".split())
ARTICLES = frozenset("a an the some several many multiple few two three another".split())
STOPWORDS = frozenset(
    "a an the of in on at by with from to into over under near far and or is are being as while then before after "
    "followed some several many multiple few loud loudly quiet quietly soft softly distant distance nearby "
    "background foreground repeatedly continuously briefly once twice low high pitched rapid rapidly slow slowly "
    "sound sounds noise noises small large big little young old away up down off out around by itself there "
    "here outside inside very also".split()
)


def stem(word: str) -> str:
    """A crude, deterministic stem (barks/barking/barked -> bark) so related word forms match."""
    w = word.lower()
    if w.endswith("es") and not w[:-2].endswith(("s", "x", "z", "ch", "sh")):
        w = w[:-1]  # whistles -> whistle (then kept), buzzes -> buzz
    for suffix in ("ing", "ed", "es", "s"):
        if len(w) > len(suffix) + 2 and w.endswith(suffix) and not w.endswith("ss"):
            w = w[: -len(suffix)]
            if suffix in ("ing", "ed") and len(w) > 3 and w[-1] == w[-2]:
                w = w[:-1]  # running -> runn -> run
            break
    return w


def content_stems(text: str) -> frozenset[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return frozenset(stem(w) for w in words if w not in STOPWORDS and w not in ARTICLES and w not in PRONOUNS)
