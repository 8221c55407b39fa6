"""Text preference data: formats, schemas, chat templates, validation reports and truncation."""

from __future__ import annotations

import json

import datasets
import pytest

from mmpref.data.llm import DataValidationError, LLMDataConfig, load_llm_data
from mmpref.toy.llm import synthetic_preferences, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    rows = synthetic_preferences(20, seed=3)
    return train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows] * 3, vocab_size=300)


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        ds.to_parquet(str(path)) if name.endswith(".parquet") else ds.to_csv(str(path), index=False)
    return str(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet", "d.csv"])
def test_pairs_in_every_format(tmp_path, tok, name):
    rows = synthetic_preferences(5, seed=0)
    train, evals = load_llm_data(LLMDataConfig(path=write(tmp_path, rows, name)), tok)
    assert evals is None and len(train) == 5
    r = train[0]
    assert r["prompt_ids"][0] == tok.bos_token_id and len(r["completion_ids"]) == 2
    assert all(c[-1] == tok.eos_token_id for c in r["completion_ids"])
    assert tok.decode(r["completion_ids"][0], skip_special_tokens=True) == rows[0]["chosen"]


def test_sets_unpaired_and_eval_fraction(tmp_path, tok):
    train, evals = load_llm_data(
        LLMDataConfig(path=write(tmp_path, synthetic_preferences(10, losers=3)), eval_fraction=0.2), tok
    )
    assert len(train) == 8 and len(evals) == 2 and len(train[0]["completion_ids"]) == 4
    assert sorted(evals["idx"]) == [0, 1]  # positions within each split (the reference cache relies on it)
    rows = [{"prompt": "a b:", "completion": " cat", "label": i % 2} for i in range(4)]
    rows[2]["prompt"] = "c d:"
    train, _ = load_llm_data(LLMDataConfig(path=write(tmp_path, rows, "u.jsonl")), tok, with_kl=True)
    assert train["label"] == [False, True, False, True]
    assert train[0]["kl_completion_ids"] == train[2]["completion_ids"][0]  # next row with another prompt


def test_conversational_rendering(tmp_path, tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": "name a cat"}],
            "chosen": [{"role": "assistant", "content": "cat"}],
            "rejected": [{"role": "assistant", "content": "saw"}],
        }
    ]
    train, _ = load_llm_data(LLMDataConfig(path=write(tmp_path, rows)), tok)
    r = train[0]
    assert tok.decode(r["prompt_ids"]) == "<|user|>name a cat</s><|assistant|>"
    assert tok.decode(r["completion_ids"][0]) == "cat</s>"


def test_validation_reports_counts_rows_and_file(tmp_path, tok):
    rows = synthetic_preferences(8, seed=0)
    rows[1]["chosen"] = ""
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[4]["prompt"] = 7
    rows[6]["prompt"] = "say " * 40
    path = write(tmp_path, rows)
    cfg = LLMDataConfig(path=path, max_length=32)
    with pytest.raises(DataValidationError) as err:
        load_llm_data(cfg, tok)
    msg = str(err.value)
    assert path in msg and "4 of 8 rows invalid" in msg
    # rows 1, 3, 4, 6 (0-based) are lines 2, 4, 5, 7 of the JSONL file, as an editor numbers them
    assert "1 row(s) with empty or non-string chosen/rejected (line 2)" in msg
    assert "1 row(s) with chosen == rejected (line 4)" in msg
    assert "1 row(s) with empty or non-string prompt (line 5)" in msg
    assert "prompt alone >= max_length=32 tokens (raise data.max_length) (line 7)" in msg
    cfg.skip_invalid = True
    train, _ = load_llm_data(cfg, tok)
    assert train["row"] == [0, 2, 5, 7] and train["idx"] == [0, 1, 2, 3]


def test_missing_columns_name_them(tmp_path, tok):
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['rejected'\]"):
        load_llm_data(LLMDataConfig(path=write(tmp_path, [{"prompt": "a", "chosen": "b"}])), tok)
    renamed = [{"q": "a b:", "good": " cat", "bad": " saw"}]
    cfg = LLMDataConfig(
        path=write(tmp_path, renamed, "r.jsonl"), prompt_column="q", chosen_column="good", rejected_column="bad"
    )
    assert len(load_llm_data(cfg, tok)[0]) == 1


def test_truncation_keeps_prompt_and_cuts_completion_tails(tmp_path, tok, caplog):
    rows = [{"prompt": "tell say cat dog:", "chosen": " cat dog owl fox bee elk", "rejected": " saw"}]
    full = load_llm_data(LLMDataConfig(path=write(tmp_path, rows)), tok)[0][0]
    n = len(full["prompt_ids"]) + 3
    cut = load_llm_data(LLMDataConfig(path=write(tmp_path, rows), max_length=n), tok)[0][0]
    assert cut["prompt_ids"] == full["prompt_ids"]
    assert cut["completion_ids"][0] == full["completion_ids"][0][:3]
    assert "1 of 1 rows truncated" in caplog.text


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_trl_implicit_prompt_layouts(tmp_path, tok):
    """TRL's layouts without a prompt column, and H4 / Zephyr's prompt string beside full conversations, give the
    same prepared rows as the explicit layout they stand for."""
    cases = {
        "standard": ([{"chosen": "name a cat: cat", "rejected": "name a cat: saw"}],
                     [{"prompt": "name a cat:", "chosen": " cat", "rejected": " saw"}]),
        "sets": ([{"chosen": "a b: cat", "rejected": ["a b: saw", "a b: nut"]}],
                 [{"prompt": "a b:", "chosen": " cat", "rejected": [" saw", " nut"]}]),
        "conversational": ([{"chosen": [user("name a cat"), bot("cat")], "rejected": [user("name a cat"), bot("saw")]}],
                           [{"prompt": [user("name a cat")], "chosen": [bot("cat")], "rejected": [bot("saw")]}]),
        "h4": ([{"prompt": "name a cat", "chosen": [user("name a cat"), bot("cat")],
                 "rejected": [user("name a cat"), bot("saw")]}],
               [{"prompt": [user("name a cat")], "chosen": [bot("cat")], "rejected": [bot("saw")]}]),
    }
    for name, (implicit, explicit) in cases.items():
        got, _ = load_llm_data(LLMDataConfig(path=write(tmp_path, implicit, f"{name}.jsonl")), tok)
        want, _ = load_llm_data(LLMDataConfig(path=write(tmp_path, explicit, f"{name}-x.jsonl")), tok)
        assert got["prompt_ids"] == want["prompt_ids"] and got["completion_ids"] == want["completion_ids"], name
    # a row with nothing shared, or nothing after the shared part, is reported by line
    bad = [{"chosen": "name a cat: cat", "rejected": "name a cat: saw"}, {"chosen": "cat", "rejected": "saw"},
           {"chosen": "x y", "rejected": "x y"}]
    with pytest.raises(DataValidationError, match=r"2 of 3 rows invalid.*prompt \(line 2\)") as err:
        load_llm_data(LLMDataConfig(path=write(tmp_path, bad, "b.jsonl")), tok)
    assert "chosen/rejected (line 3)" in str(err.value)


def test_hub_layout_folder_subset_and_data_dir(tmp_path, tok):
    """A local folder in the hub's layout (nothing downloads): a README's configs name subsets; data_dir picks a
    folder; both are refused, by name, for a plain file."""
    repo = tmp_path / "repo"
    for sub, rows in (("easy", synthetic_preferences(3, seed=1)), ("hard", synthetic_preferences(5, seed=2))):
        (repo / sub).mkdir(parents=True)
        (repo / sub / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: easy\n  data_files: easy/*.jsonl\n"
                                    "- config_name: hard\n  data_files: hard/*.jsonl\n---\n")
    assert len(load_llm_data(LLMDataConfig(path=str(repo), subset="hard"), tok)[0]) == 5
    assert len(load_llm_data(LLMDataConfig(path=str(repo), subset="easy"), tok)[0]) == 3
    plain = tmp_path / "plain"
    for sub, n in (("a", 2), ("b", 4)):
        (plain / sub).mkdir(parents=True)
        (plain / sub / "train.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_preferences(n)))
    assert len(load_llm_data(LLMDataConfig(path=str(plain), data_dir="b"), tok)[0]) == 4
    from mmpref.errors import DataError

    with pytest.raises(DataError, match="data.subset only apply to hub datasets"):
        load_llm_data(LLMDataConfig(path=str(plain / "a" / "train.jsonl"), subset="x"), tok)


def test_hub_ids_get_subset_revision_and_data_dir(monkeypatch):
    from mmpref.data import tables

    seen = {}

    def fake_load_dataset(path, **kw):
        seen.update(path=path, **kw)
        return datasets.Dataset.from_list(synthetic_preferences(2))

    monkeypatch.setattr(tables.datasets, "load_dataset", fake_load_dataset)
    tables.load_table("org/prefs", "test", hub=tables.HubOptions("en", "v1.0", "data/clean"))
    assert seen == {"path": "org/prefs", "split": "test", "name": "en", "revision": "v1.0", "data_dir": "data/clean"}
