"""Caption parsing and every perturbation, on a table of AudioCaps-style captions with expected events and order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpref.synthesis.captions import content_stems, parse_caption
from mmpref.synthesis.perturb import (
    RuleBasedPerturber,
    add,
    omit,
    replace,
    swap,
    validate_perturbation,
    with_connector,
)
from mmpref.synthesis.vocabulary import Vocabulary

TABLE = [json.loads(line) for line in (Path(__file__).parent / "data" / "captions_audiocaps.jsonl").open()]
MULTI = [r for r in TABLE if len(r["events"]) >= 2]
ORDERED = [r for r in TABLE if len(r["order"]) > 1]


def events_of(caption: str) -> list[str]:
    """Events as standalone clauses, lower-case (what a listener would check off)."""
    return [e.standalone.lower() for e in parse_caption(caption).events]


def test_table_is_big_and_varied():
    assert len(TABLE) >= 30
    connectors = {c for r in TABLE for c in parse_caption(r["caption"]).connectors}
    assert {"then", "followed by", "before", "after", "while", "as", "and", ",", "and then"} <= connectors


@pytest.mark.parametrize("row", TABLE, ids=[r["caption"][:40] for r in TABLE])
def test_parse_events_and_order(row):
    parse = parse_caption(row["caption"])
    got = [e.text if i == 0 else e.standalone for i, e in enumerate(parse.events)]
    assert got == row["events"]
    assert [list(g) for g in parse.order] == row["order"]
    assert parse.has_order == (len(row["order"]) > 1)
    assert parse_caption(row["caption"]) == parse  # deterministic
    assert json.loads(json.dumps(parse.to_dict()))["events"][0]["text"] == parse.events[0].text  # inspectable


def test_relations_and_connectors_by_hand():
    p = parse_caption("A man speaks, a crowd laughs, then applause follows")
    assert p.connectors == ("", ",", "then")
    assert p.relations == [(0, "simultaneous", 1), (1, "before", 2)]
    assert parse_caption("A dog barks after a man speaks").relations == [(0, "after", 1)]
    with pytest.raises(ValueError, match="empty"):
        parse_caption("  ")


@pytest.mark.parametrize("caption,events,order", [
    ("First a beep, then a bell rings, and finally a dog barks", ["a beep", "a bell rings", "a dog barks"],
     [[0], [1], [2]]),
    ("After a knock, a siren wails", ["a knock", "a siren wails"], [[0], [1]]),
    ("While a low hum plays, a bird chirps", ["a low hum plays", "a bird chirps"], [[0, 1]]),
    ("A dog barks, and later a man whistles", ["a dog barks", "a man whistles"], [[0], [1]]),
    ("A dog barks following a bell", ["a dog barks", "a bell"], [[1], [0]]),
    ("A beep preceded by a knock", ["a beep", "a knock"], [[1], [0]]),
    ("Wind blows over a man speaking", ["wind blows", "a man speaking"], [[0, 1]]),
])
def test_more_connectors(caption, events, order):
    """Connectors beyond the basic set, as the demo world and longer AudioCaps captions use them."""
    parse = parse_caption(caption)
    assert [e.standalone.lower() for e in parse.events] == events
    assert [list(g) for g in parse.order] == order


@pytest.mark.parametrize("row", MULTI, ids=[r["caption"][:40] for r in MULTI])
def test_omit_drops_exactly_one_event(row):
    parse = parse_caption(row["caption"])
    expected = [e.lower() for e in row["events"]]
    for i in range(len(parse.events)):
        assert events_of(omit(parse, i)) == expected[:i] + expected[i + 1:]


@pytest.mark.parametrize("row", MULTI, ids=[r["caption"][:40] for r in MULTI])
def test_replace_swaps_one_event_for_a_related_new_one(row):
    vocab = Vocabulary.default()
    parse = parse_caption(row["caption"])
    expected = [e.lower() for e in row["events"]]
    for i, event in enumerate(parse.events):
        assert vocab.category_of(event.concepts) is not None, event  # the default vocabulary covers the table
        options = vocab.related(event.concepts)
        phrase = options[0]
        assert vocab.category_of(content_stems(phrase)) == vocab.category_of(event.concepts)
        assert not content_stems(phrase) & event.concepts
        assert events_of(replace(parse, i, phrase)) == expected[:i] + [phrase] + expected[i + 1:]


@pytest.mark.parametrize("row", TABLE, ids=[r["caption"][:40] for r in TABLE])
def test_add_appends_an_event(row):
    parse = parse_caption(row["caption"])
    expected = [e.lower() for e in row["events"]]
    assert events_of(add(parse, "a phone rings", "then")) == expected + ["a phone rings"]
    assert events_of(add(parse, "a phone rings", "followed by", at_start=True)) == ["a phone rings"] + expected
    assert parse_caption(add(parse, "a phone rings", "then")).has_order  # a temporal addition creates an order


@pytest.mark.parametrize("row", ORDERED, ids=[r["caption"][:40] for r in ORDERED])
def test_swap_and_invert_reverse_the_order(row):
    parse = parse_caption(row["caption"])
    rel = next((i, r) for i, r, _ in parse.relations if r in ("before", "after"))
    i = rel[0]
    first_before = _first_in_time(parse, i, i + 1)
    swapped = parse_caption(swap(parse, i))
    assert {e.standalone.lower() for e in swapped.events} == {e.standalone.lower() for e in parse.events}
    assert _first_in_time(swapped, i, i + 1) != first_before or _texts(swapped, i) != _texts(parse, i)
    assert _texts(swapped, i) == _texts(parse, i)[::-1]  # the two events traded places
    flipped = "after" if rel[1] == "before" else "before"
    inverted = parse_caption(with_connector(parse, i + 1, flipped))
    assert _first_in_time(inverted, i, i + 1) != first_before


def _texts(parse, i):
    return [parse.events[i].standalone.lower(), parse.events[i + 1].standalone.lower()]


def _first_in_time(parse, a, b):
    """Which of events a, b comes first in the parse's time order."""
    step = {e: k for k, group in enumerate(parse.order) for e in group}
    return a if step[a] < step[b] else b


def test_swap_by_hand():
    assert swap(parse_caption("A cat meows, then a dog growls"), 0) == "A dog growls then a cat meows"
    assert (with_connector(parse_caption("An engine starts and then idles"), 1, "after")
            == "An engine starts after an engine idles")
    assert (with_connector(parse_caption("A woman sings while a guitar plays"), 1, "then")
            == "A woman sings then a guitar plays")


@pytest.mark.parametrize("row", TABLE, ids=[r["caption"][:40] for r in TABLE])
def test_rule_based_perturber_on_table(row):
    perturber = RuleBasedPerturber(seed=3)
    parse = perturber.parse(row["caption"])
    original = content_stems(row["caption"])
    for strategy in ("concept", "temporal"):
        out = perturber.perturb(parse, strategy, 5)
        if strategy == "temporal" and not parse.is_temporal:
            assert out == []
            continue
        assert 1 <= len(out) <= 5
        assert len({p.caption.lower() for p in out}) == len(out)
        for p in out:
            assert p.strategy == strategy and p.operation
            assert p.caption.lower() != row["caption"].lower()
            assert content_stems(p.caption) & original  # keeps some of the original concepts
            assert validate_perturbation(parse, p.caption, strategy) is None
        assert perturber.perturb(parse, strategy, 5) == out  # deterministic
        if len(out) >= 3 and len(perturber.candidates(parse, strategy)) >= 2:
            assert len({p.operation for p in out}) >= 2  # round-robin over operations


def test_seed_changes_the_choice_and_labels_cover_all_operations():
    captions = [r["caption"] for r in TABLE]
    a = [p.caption for c in captions for p in RuleBasedPerturber(seed=0).perturb(parse_caption(c), "concept", 3)]
    b = [p.caption for c in captions for p in RuleBasedPerturber(seed=1).perturb(parse_caption(c), "concept", 3)]
    assert a != b
    ops = {p.operation for c in captions for s in ("concept", "temporal")
           for p in RuleBasedPerturber().perturb(parse_caption(c), s, 5)}
    assert ops == {"omit", "replace", "add", "swap", "invert", "serialize"}


def test_user_vocabulary(tmp_path):
    path = tmp_path / "vocab.yaml"
    path.write_text("animals: [a dog barks, a wolf howls]\nmachines: [a robot beeps]\n")
    vocab = Vocabulary.load(path)
    perturber = RuleBasedPerturber(vocab, seed=0)
    parse = perturber.parse("A dog barks and a man speaks")
    replaced = [p.caption for p in perturber.perturb(parse, "concept", 20) if p.operation == "replace"]
    # the dog's only relative is the wolf; "a man speaks" has no category here, so any new phrase may replace it
    assert sorted(replaced) == ["A dog barks and a robot beeps", "A dog barks and a wolf howls",
                                "A wolf howls and a man speaks"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("animals: a dog barks\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*'animals'"):
        Vocabulary.load(bad)


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("1. <|assistant|> a dog", "not a plain caption"),
    ("A man speaks followed by a dog barking", "identical"),
    ("Rain falls on a tin roof", "keeps none"),
    ("A dog barking followed by a man speaks", "same concepts"),  # concept: must change concepts
    ("A man speaks followed by a cat meowing", None),
    ("A man speaks", None),
])
def test_llm_output_validation_concept(text, reason):
    parse = parse_caption("A man speaks followed by a dog barking")
    got = validate_perturbation(parse, text, "concept")
    assert (got is None) if reason is None else (reason in got)


def test_llm_output_validation_temporal():
    parse = parse_caption("A man speaks followed by a dog barking")
    assert validate_perturbation(parse, "A dog barking followed by a man speaks", "temporal") is None
    assert "same events in the same order" in validate_perturbation(
        parse, "A man speaks, followed by a dog barking loudly", "temporal")
    plain = parse_caption("A dog barks and a man speaks")
    assert "no temporal relation" in validate_perturbation(plain, "A dog barks and a woman speaks", "temporal")


def test_llm_perturber_rejects_garbage_from_a_random_model(tmp_path):
    from mmpref.synthesis.perturb import LLMPerturber
    from mmpref.toy.llm import build_tiny_llama

    path = build_tiny_llama(tmp_path / "llm", [r["caption"] for r in TABLE] * 3, vocab_size=300)
    parse = parse_caption("A man speaks followed by a dog barking")
    strict = LLMPerturber(str(path), max_new_tokens=12, num_samples=4, fallback=None)
    lines = strict.generate(parse, "concept")
    assert lines == strict.generate(parse, "concept")  # seeded per caption
    kept = strict.perturb(parse, "concept", 3)
    for p in kept:  # whatever survives passed validation
        assert p.operation == "llm" and validate_perturbation(parse, p.caption, "concept") is None
    assert sum(strict.rejections.values()) + len(kept) >= len(lines) - 1  # every line accounted for
    with_rules = LLMPerturber(str(path), max_new_tokens=12, num_samples=4, model=strict.model,
                              tokenizer=strict.tokenizer)
    filled = with_rules.perturb(parse, "concept", 3)
    assert len(filled) == 3 and all(validate_perturbation(parse, p.caption, "concept") is None for p in filled)
