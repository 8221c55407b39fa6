"""The text demo: task, perturbations and metrics by hand; bootstrap against a naive loop; `--quick` end to end."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import yaml

from mmpref.demo import text
from mmpref.demo.text import (
    DEFAULT_CONFIG,
    Example,
    compare,
    error_counts,
    format_answer,
    load_demo_config,
    make_examples,
    parse_answer,
    perturb,
    preference_pairs,
    score_answer,
)
from mmpref.stats import bootstrap_ci

TASK = load_demo_config(DEFAULT_CONFIG, quick=True, loss="dpo")["task"]


def test_answers_format_and_parse_back():
    assert format_answer(["red", "cat", "seven"]) == " red, cat, seven"
    assert parse_answer(" red, cat, seven") == ["red", "cat", "seven"]
    assert parse_answer(" red,, cat ,") == ["red", "cat"]
    assert parse_answer("") == []


@pytest.mark.parametrize(
    "predicted,exact,order,recall",
    [
        (["a", "b", "c"], 1.0, 1.0, 1.0),
        (["a", "c", "b"], 0.0, 2 / 3, 1.0),  # (b, c) swapped
        (["a", "c"], 0.0, 1 / 3, 2 / 3),  # b missing fails (a, b) and (b, c)
        (["c", "b", "a"], 0.0, 0.0, 1.0),
        (["a", "b", "c", "x"], 0.0, 1.0, 1.0),  # an extra item: not exact, order and recall intact
        (["a", "b", "a", "c"], 0.0, 1.0, 1.0),  # a repeated item counts at its first mention
        ([], 0.0, 0.0, 0.0),
    ],
)
def test_score_answer_by_hand(predicted, exact, order, recall):
    assert score_answer(predicted, ["a", "b", "c"]) == pytest.approx(
        {"exact_match": exact, "order_accuracy": order, "item_recall": recall}
    )


def test_examples_follow_the_prompt_order():
    examples = make_examples(TASK, 200, random.Random(0))
    assert examples == make_examples(TASK, 200, random.Random(0))
    reversed_count = 0
    for ex in examples:
        head, listed = ex.prompt.removesuffix(" =>").split(":")
        items = parse_answer(listed)
        assert TASK["min_items"] <= len(items) <= TASK["max_items"] and len(set(items)) == len(items)
        assert set(items) <= set(TASK["items"])
        reverse = head == "list in reverse"
        reversed_count += reverse
        assert list(ex.gold) == (items[::-1] if reverse else items)
        assert ex.answer == format_answer(ex.gold)
    assert 60 < reversed_count < 140  # reverse_fraction 0.5


def test_perturbations_make_one_specific_error():
    rng = random.Random(1)
    gold = ["red", "cat", "seven", "sun"]
    for _ in range(50):
        omitted = perturb(gold, "omission", TASK["items"], rng)
        assert len(omitted) == 3 and [g for g in gold if g in omitted] == omitted
        replaced = perturb(gold, "replacement", TASK["items"], rng)
        changed = [i for i, (a, b) in enumerate(zip(gold, replaced)) if a != b]
        assert len(replaced) == 4 and len(changed) == 1 and replaced[changed[0]] not in gold
        swapped = perturb(gold, "reordering", TASK["items"], rng)
        changed = [i for i, (a, b) in enumerate(zip(gold, swapped)) if a != b]
        assert sorted(swapped) == sorted(gold) and len(changed) == 2
        assert swapped[changed[0]] == gold[changed[1]] and swapped[changed[1]] == gold[changed[0]]
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(gold, "insertion", TASK["items"], rng)


def test_preference_pairs_put_gold_first_with_distinct_perturbations():
    examples = make_examples(TASK, 30, random.Random(2))
    rows = preference_pairs(examples, TASK, random.Random(3))
    assert len(rows) == 30 * TASK["pairs_per_prompt"]
    for k, ex in enumerate(examples):
        group = rows[k * TASK["pairs_per_prompt"]:(k + 1) * TASK["pairs_per_prompt"]]
        assert all(r["prompt"] == ex.prompt and r["chosen"] == ex.answer != r["rejected"] for r in group)
        assert len({r["perturbation"] for r in group}) == len(group)


def test_bootstrap_matches_a_naive_loop():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0]
    rng = np.random.default_rng(7)
    means = sorted(float(np.mean([values[i] for i in rng.integers(0, len(values), len(values))]))
                   for _ in range(500))
    ci = bootstrap_ci(values, 500, seed=7)
    assert ci["lo"] == pytest.approx(np.percentile(means, 2.5))
    assert ci["hi"] == pytest.approx(np.percentile(means, 97.5))
    const = bootstrap_ci([0.25] * 10, 100, seed=0)
    assert (const["lo"], const["mean"], const["hi"], const["n"]) == pytest.approx((0.25, 0.25, 0.25, 10))
    with_nan = bootstrap_ci([1.0, float("nan"), 0.0], 100, seed=0)  # a metric that does not apply to a row
    assert with_nan["n"] == 2 and with_nan["mean"] == 0.5


def test_paired_difference_and_error_counts():
    gold = ["a", "b", "c"]
    scored = lambda outputs: [{"output": o, "gold": gold, **score_answer(parse_answer(o), gold)} for o in outputs]
    before, after = scored(["a, b", "a, c, b", "a, b, c"]), scored(["a, b, c"] * 3)
    diff = compare(before, after, 200, seed=0)
    assert diff["exact_match"]["mean"] == pytest.approx(2 / 3)
    assert diff["order_accuracy"]["mean"] == pytest.approx((2 / 3 + 1 / 3) / 3)
    assert diff["item_recall"]["mean"] == pytest.approx(1 / 9)
    assert error_counts(before) == {"exact": 1, "missing_item": 1, "extra_item": 0, "order_only": 1}
    assert error_counts([{"output": "a, x, c", "gold": gold, "exact_match": 0.0}])["extra_item"] == 1


def test_config_errors_name_the_key(tmp_path):
    from mmpref.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown; available"):
        load_demo_config(DEFAULT_CONFIG, quick=False, loss="nope")
    with pytest.raises(ConfigError, match="sft.train.max_stepz"):
        load_demo_config(DEFAULT_CONFIG, quick=False, loss="dpo", settings=["sft.train.max_stepz=3"])
    cfg = load_demo_config(DEFAULT_CONFIG, quick=False, loss="kto", settings=["align.run.max_steps=7"])
    assert cfg["align"]["loss"] == {"kto": {"beta": 0.1}} and cfg["align"]["run"]["max_steps"] == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [1]\n")
    with pytest.raises(ConfigError, match="bad.yaml: section `task`"):
        load_demo_config(bad, quick=False, loss="dpo")


def test_quick_demo_end_to_end_dpo_then_kto_reusing_the_sft_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert text.main(["--quick", "--out", str(out), "--seed", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    arms = ("online_dpo", "rso", "sppo", "rso_rm")
    assert report["loss"] == "dpo" and set(report["models"]) == {"sft", "aligned", *arms}
    assert set(report["difference"]) == {"aligned-sft"} | {f"{a}-{b}" for a in arms for b in ("sft", "aligned")}
    assert set(report["validation"]["models"]) == set(report["models"])
    for arm, builder in (("online_dpo", "best_vs_worst"), ("rso", "rso"), ("sppo", "sppo"), ("rso_rm", "rso")):
        arm_cfg = yaml.safe_load((out / arm / "config.yaml").read_text())
        judge = arm_cfg["online"]["judge"]
        if arm == "rso_rm":  # the demo's reward model, which the library loads from its folder
            assert judge["kind"] == "reward_model" and judge["path"] == str(out / "reward_model")
        else:
            assert judge["path"] == "mmpref.demo.text:rule_reward"
        assert arm_cfg["online"]["builder"] == builder and report["online_steps"][arm] == 4
        assert arm_cfg["online"]["prompts"] == str(out / "data" / "online.jsonl")
    assert report["reward_model"]["steps"] == 20 and 0 <= report["reward_model"]["val_accuracy"] <= 1
    assert (out / "sppo" / "rollouts" / "round-0001" / "complete").exists()  # its second round ran
    md = (out / "report.md").read_text()
    assert "| exact_match |" in md
    assert f"its own samples for {TASK['online_prompts']} prompts without gold answers" in md
    # the report's means are the means of the scored generations, and the scores are those of the outputs
    for name in ("sft", "aligned"):
        rows = json.loads((out / f"eval_{name}.done.json").read_text())["result"]["rows"]
        assert len(rows) == report["data"]["eval_prompts"]
        for r in rows:
            assert {k: r[k] for k in text.METRICS} == score_answer(parse_answer(r["output"]), r["gold"])
        for m in text.METRICS:
            s = report["models"][name][m]
            assert s["mean"] == pytest.approx(np.mean([r[m] for r in rows]))
            assert s["lo"] <= s["mean"] <= s["hi"]
    train_prompts = {json.loads(line)["prompt"] for line in (out / "data" / "prefs.jsonl").read_text().splitlines()}
    eval_prompts = {r["prompt"] for r in rows}
    val_prompts = {json.loads(line)["prompt"] for line in (out / "data" / "val.jsonl").read_text().splitlines()}
    assert not train_prompts & eval_prompts  # held out
    assert len(val_prompts) == report["data"]["val_prompts"] and not val_prompts & (train_prompts | eval_prompts)
    # the online arms' prompts have no answers and meet no other set
    online_rows = [json.loads(line) for line in (out / "data" / "online.jsonl").read_text().splitlines()]
    online_prompts = {r["prompt"] for r in online_rows}
    assert all(set(r) == {"prompt"} for r in online_rows)
    assert len(online_prompts) == report["data"]["online_prompts"] == TASK["online_prompts"] > 0
    assert not online_prompts & (train_prompts | eval_prompts | val_prompts)
    capsys.readouterr()

    # an unpaired loss on the same pairs; data, model and SFT stages come from the cache
    assert text.main(["--quick", "--out", str(out), "--seed", "1", "--loss", "kto"]) == 0
    log = capsys.readouterr().out
    assert "[sft] cached" in log and "[model] cached" in log and "[eval_sft] cached" in log
    assert "[online_dpo] cached" in log and "[sppo] cached" in log  # online arms do not use the offline loss
    assert "[align] cached" not in log
    kto = json.loads((out / "report.json").read_text())
    assert kto["loss"] == "kto" and kto["models"]["sft"] == report["models"]["sft"]
    assert yaml.safe_load((out / "align" / "config.yaml").read_text())["loss"] == {"kto": {"beta": 0.1}}


@pytest.mark.parametrize("prompt,response,reward", [
    ("list: red, cat, owl =>", " red, cat, owl", 3.0),  # exact + all 3 pairs in order + all items
    ("list in reverse: red, cat, owl =>", " owl, cat, red", 3.0),
    ("list in reverse: red, cat, owl =>", " red, cat, owl", 0.0 + 0.0 + 1.0),  # every pair reversed
    ("list: red, cat, owl =>", " red, owl", 0.0 + 1 / 3 + 2 / 3),  # cat missing: only (red, owl) in order
    ("list: red, cat =>", " red, cat, sun", 0.0 + 1.0 + 1.0 - 1 / 2),  # an unlisted item costs 1/len(gold)
])
def test_rule_reward_by_hand(prompt, response, reward):
    assert text.rule_reward([prompt], [response]) == [pytest.approx(reward)]


def test_example_dataclass_answer():
    assert Example("list: a, b =>", ("a", "b")).answer == " a, b"


def test_stages_cache_by_fingerprint_and_rerun_when_stale(tmp_path):
    calls = []

    def stage(tag: str):
        def fn():
            calls.append(tag)
            (tmp_path / "s" / f"{tag}.txt").write_text(tag)
            return {"final": str(tmp_path / "s")}, f"ran {tag}"
        return fn

    assert text.run_cached(tmp_path, "s", "k1", stage("a")) == {"final": str(tmp_path / "s")}
    text.run_cached(tmp_path, "s", "k1", stage("b"))  # cached: not called
    assert calls == ["a"]
    text.run_cached(tmp_path, "s", "k2", stage("c"))  # another fingerprint: the old stage directory is wiped first
    assert calls == ["a", "c"] and not (tmp_path / "s" / "a.txt").exists()
    shutil.rmtree(tmp_path / "s")  # the cached result's directory vanished: run again
    text.run_cached(tmp_path, "s", "k2", stage("d"))
    assert calls == ["a", "c", "d"]
    # an interrupted run (no marker) keeps its folder when the fingerprint is the same, wipes it when not
    (tmp_path / "s.done.json").unlink()
    text.run_cached(tmp_path, "s", "k2", stage("e"))
    assert (tmp_path / "s" / "d.txt").exists()
    (tmp_path / "s.done.json").unlink()
    text.run_cached(tmp_path, "s", "k3", stage("f"))
    assert not (tmp_path / "s" / "e.txt").exists() and calls == ["a", "c", "d", "e", "f"]


def test_without_an_online_pool_the_arms_answer_the_sft_prompts(tmp_path):
    cfg = load_demo_config(DEFAULT_CONFIG, quick=True, loss="dpo", settings=["task.online_prompts=0"])
    data = text.build_data(cfg, 3, tmp_path)[0]
    sft = [json.loads(line)["prompt"] for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    online = [json.loads(line)["prompt"] for line in (tmp_path / "online.jsonl").read_text().splitlines()]
    assert online == sft and data["online_prompts"] == len(sft) == cfg["task"]["train_prompts"]
    # the pool has its own generator: adding one leaves every other set as it was
    with_pool = load_demo_config(DEFAULT_CONFIG, quick=True, loss="dpo", settings=["task.online_prompts=50"])
    text.build_data(with_pool, 3, tmp_path / "pool")
    for name in ("sft.jsonl", "prefs.jsonl", "eval.jsonl", "val.jsonl"):
        assert (tmp_path / "pool" / name).read_text() == (tmp_path / name).read_text()


def test_report_comparisons_and_which_arms_beat_the_control():
    assert text.comparisons(["sft", "sft_control", "aligned", "rso", "sppo"]) == [
        ("aligned", "sft"), ("aligned", "sft_control"), ("rso", "sft"), ("rso", "sft_control"), ("rso", "aligned"),
        ("sppo", "sft"), ("sppo", "sft_control"), ("sppo", "aligned")]
    gold = ["a", "b", "c"]
    right = {"output": "a, b, c", "gold": gold, **score_answer(["a", "b", "c"], gold)}
    wrong = {"output": "a, c", "gold": gold, **score_answer(["a", "c"], gold)}
    rows = {"sft": [wrong] * 40, "sft_control": [wrong] * 30 + [right] * 10, "aligned": [wrong] * 40,
            "rso": [right] * 40, "sppo": [wrong] * 40}
    r = text.build_report({}, {k: [dict(x, prompt=f"p{i}") for i, x in enumerate(v)] for k, v in rows.items()},
                          200, 0)
    assert r["beat_control"] == ["rso"]  # sppo equals sft: below the control
    assert r["difference"]["rso-sft_control"]["exact_match"]["mean"] == pytest.approx(0.75)
    assert text.beats(r["difference"]["rso-sft"]) and not text.beats(r["difference"]["sppo-sft_control"])


def test_reward_model_learns_the_pairs_and_reloads_as_a_judge(tmp_path):
    """Bradley-Terry on pairs whose winner is the gold list: the saved model ranks held-out pairs, and the library's
    reward-model judge (from_pretrained) gives the same scores as the trained model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mmpref.demo.text_reward import _scores, train_reward_model
    from mmpref.judges import SequenceClassifierReward
    from mmpref.toy.llm import build_tiny_llama

    rng = random.Random(0)
    train = preference_pairs(make_examples(TASK, 300, rng), {**TASK, "perturbations": ["omission"]}, rng)
    val = preference_pairs(make_examples(TASK, 100, rng), {**TASK, "perturbations": ["omission"]}, rng)
    texts = [r["prompt"] + r["chosen"] for r in train + val]
    init = build_tiny_llama(tmp_path / "init", texts, vocab_size=256, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    result = train_reward_model(init, train, val, tmp_path / "rm", steps=80, batch_size=32, lr=3e-3, seed=0)
    assert result["last_loss"] < result["first_loss"] and result["val_accuracy"] > 0.9  # shorter answer loses
    judge = SequenceClassifierReward(str(tmp_path / "rm"))
    prompts, answers = [r["prompt"] for r in val[:8]], [r["rejected"] for r in val[:8]]
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        one_by_one = torch.stack([_scores(model, tok, [p], [a])[0] for p, a in zip(prompts, answers)])
    torch.testing.assert_close(judge.rewards(prompts, answers), one_by_one, atol=1e-4, rtol=1e-4)
