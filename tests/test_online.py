"""Online and iterative training: builders, the geometric mixture, judges, and the engine's online schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_llm import tiny_llm_overrides, write_tiny_llm_assets
from safetensors.torch import load_file

from mmpref.cli import main
from mmpref.errors import ConfigError, DataError
from mmpref.online import builders

ROOT = Path(__file__).resolve().parents[1]
LLM_TINY = str(ROOT / "configs" / "llm_dpo_tiny.yaml")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# ----- builders ------------------------------------------------------------------------------------------------------
def test_best_vs_worst_and_best_vs_k_by_hand():
    r = torch.tensor([0.3, 2.0, -1.0, 2.0, 0.0])
    assert builders.best_vs_worst(r) == [([1, 2], None)]  # tie 1 vs 3: the lower index wins
    assert builders.best_vs_k(r, 2) == [([1, 2, 4], None)]  # the two lowest, lowest first
    with pytest.raises(ValueError, match="at least 6"):
        builders.best_vs_k(r, 5)


def test_rso_accepts_samples_distributed_as_policy_times_exp_reward_over_beta():
    """Discrete toy policy pi over 5 answers with rewards r: the first sample RSO accepts from N = 64 draws follows
    pi * exp(r / beta), normalised (chi-square, 4 degrees of freedom, p = 0.001 critical value 18.47)."""
    pi = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
    reward = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    beta = 1.0
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(5)
    for _ in range(3000):
        answers = torch.multinomial(pi, 64, replacement=True, generator=g)
        first = builders.rso_accept(reward[answers], beta, 1, g)[0]
        counts[int(answers[first])] += 1
    target = (pi * torch.exp(reward / beta)).numpy()
    assert chi_square(counts, target / target.sum()) < 18.47
    assert chi_square(counts, pi.numpy()) > 1000  # and clearly not the policy itself


def test_rso_accepts_m_distinct_samples_and_pairs_them_in_order():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(64, generator=g)
    accepted = builders.rso_accept(r, 0.5, 8, g)
    assert len(accepted) == len(set(accepted)) == 8
    pairs = builders.pair_up(accepted, r)
    assert [sorted(m) for m, _ in pairs] == [sorted(accepted[i:i + 2]) for i in range(0, 8, 2)]
    assert all(r[m[0]] >= r[m[1]] for m, _ in pairs)
    assert builders.groups_per_prompt("rso", 8) == 4 and builders.groups_per_prompt("sppo", 8) == 1


def test_sppo_win_rates_by_hand():
    """P_i = mean over j != i of P(i beats j); with P(i > j) = sigmoid(r_i - r_j), r = (0, 1, 3)."""
    r = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    calls = []

    def prefer(a, b):
        calls.append((a, b))
        return torch.sigmoid(r[a] - r[b])

    rates = builders.win_rates(prefer, 3)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [(s(-1) + s(-3)) / 2, (s(1) + s(-2)) / 2, (s(3) + s(2)) / 2]
    assert rates.tolist() == pytest.approx(want, abs=1e-12)
    assert len(calls) == 1 and len(calls[0][0]) == 3  # one batched call for the 3 unordered pairs
    assert builders.sppo_group(rates) == [([2, 0], [pytest.approx(want[2]), pytest.approx(want[0])])]
    assert builders.labelled_pair(0.3) == [([1, 0], [0.7, 0.3])]


# ----- the geometric mixture -----------------------------------------------------------------------------------------
class _FixedLM(torch.nn.Module):
    """A causal LM whose next-token logits are always ``logits`` (a KV cache of nothing)."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, use_cache=True, cache=None, attention_mask=None, position_ids=None):
        out = {"logits": self.logits.expand(input_ids.shape[0], input_ids.shape[1], -1), "cache": None}
        return type("Out", (dict,), {"__getattr__": dict.__getitem__})(out)


def test_next_token_distribution_is_the_renormalised_geometric_mixture():
    from mmpref.models.sampling import next_token_distribution

    p, q = torch.tensor([0.5, 0.3, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    mix = next_token_distribution(p.log()[None], q.log()[None], mixture=0.25)[0]
    closed = p ** 0.75 * q ** 0.25
    torch.testing.assert_close(mix, closed / closed.sum(), atol=1e-7, rtol=0)
    torch.testing.assert_close(next_token_distribution(p.log()[None])[0], p, atol=1e-7, rtol=0)
    nucleus = next_token_distribution(p.log()[None], top_p=0.6)[0]  # the smallest set with mass >= 0.6
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-7, rtol=0)


def test_sampling_from_the_mixture_matches_the_closed_form():
    from mmpref.models.sampling import sample_completions

    p, q = torch.tensor([0.5, 0.3, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = sample_completions(_FixedLM(p.log().tolist()), [0], 6000, None, 1, torch.Generator().manual_seed(0),
                               reference=_FixedLM(q.log().tolist()), mixture=0.25)
    counts = np.bincount([d[0] for d in draws], minlength=4)
    closed = (p ** 0.75 * q ** 0.25).numpy()
    assert chi_square(counts, closed / closed.sum()) < 16.27  # 3 degrees of freedom, p = 0.001
    assert chi_square(counts, p.numpy()) > 100


# ----- judges ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    return write_tiny_llm_assets(tmp_path_factory.mktemp("online-llm"))


def test_reward_model_round_trip_and_a_folder_without_a_score_head(assets, tmp_path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from mmpref.judges import BradleyTerry, SequenceClassifierReward
    from mmpref.toy.llm import tiny_llama_config

    tok = AutoTokenizer.from_pretrained(assets["model"])
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(tiny_llama_config(len(tok), num_labels=1)).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = SequenceClassifierReward(str(tmp_path / "rm"))
    prompts, responses = ["list: a, b =>", "list: c =>"], [" a, b", " c, c, c"]
    got = judge.rewards(prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=False)
        with torch.no_grad():
            direct = rm(**tok(text, return_tensors="pt")).logits[0, 0]
        assert got[i].item() == pytest.approx(direct.item(), abs=1e-5)
    pref = BradleyTerry(judge).prefer(prompts, responses, responses[::-1])
    swapped = judge.rewards(prompts, responses[::-1])  # each prompt with the other response
    torch.testing.assert_close(pref, torch.sigmoid(got - swapped))
    with pytest.raises(ConfigError, match="no trained score head"):
        SequenceClassifierReward(assets["model"])  # a causal LM folder


@pytest.mark.parametrize("fn, message", [("nan_reward", "returned nan for response 0"),
                                         ("short_reward", "returned 2 values for 3 responses")])
def test_a_judge_returning_nan_or_the_wrong_shape_is_an_error(fn, message):
    from mmpref.judges import CallableJudge

    judge = CallableJudge.from_path(f"helpers.judges:{fn}")
    with pytest.raises(DataError, match=message):
        judge.rewards(["p"] * 3, ["a", "b", "c"])


def test_bad_judge_paths_and_too_few_samples_are_config_errors(assets, tmp_path):
    from mmpref.config import load_config

    base = online_argv(assets, tmp_path, "step", "best_vs_worst")[1:]
    with pytest.raises(ConfigError, match=r"online.samples \(from override 'online.samples=4'\): must be >= 8 "
                                          r"for builder 'rso'"):
        load_config(base[0], [*base[1:], "online.builder=rso", "online.samples=4"])
    assert main(online_argv(assets, tmp_path, "step", "best_vs_worst", "online.judge.path=helpers.judges:nope")) == 1


# ----- the engine's online schedules ---------------------------------------------------------------------------------
def online_argv(assets: dict, tmp: Path, schedule: str, builder: str, *extra: str) -> list[str]:
    over = [o for o in tiny_llm_overrides(assets, tmp / "run") if not o.startswith("data.path")
            and o != "run.resume=false"]
    judge = "helpers.judges:letter_preference" if builder in ("sppo", "pair") else "helpers.judges:letter_reward"
    online = (f"online={{prompts: {assets['prefs']}, schedule: {schedule}, builder: {builder}, samples: 4, "
              f"judge: {{kind: callable, path: '{judge}', preference: {str(builder in ('sppo', 'pair')).lower()}}}, "
              "generation: {max_new_tokens: 6}, prompts_per_round: 4, rounds: 3}")
    return ["train", LLM_TINY, *over, "data.eval_split=null", "optim.lr=5e-3", "optim.warmup_steps=0",
            "run.save_every=1", "run.keep_checkpoints=10", online, *extra]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_step_schedule_resumed_after_a_crash_equals_the_uninterrupted_run(assets, tmp_path, monkeypatch):
    from mmpref.online.source import OnlineSource

    whole = tmp_path / "whole"
    assert main(online_argv(assets, whole, "step", "best_vs_worst", "run.max_steps=4")) == 0
    crashed = tmp_path / "crashed"
    real, calls = OnlineSource.draw, []

    def draw(self, policy, positions):
        calls.append(positions)
        if len(calls) == 3:
            raise RuntimeError("killed while sampling")
        return real(self, policy, positions)

    monkeypatch.setattr(OnlineSource, "draw", draw)
    assert main(online_argv(assets, crashed, "step", "best_vs_worst", "run.max_steps=4")) == 1
    monkeypatch.setattr(OnlineSource, "draw", real)
    assert main(online_argv(assets, crashed, "step", "best_vs_worst", "run.max_steps=4")) == 0
    for name, value in final_weights(whole / "run").items():
        assert torch.equal(final_weights(crashed / "run")[name], value), name
    logs = [(r / "run" / "rollouts" / "steps-rank0.jsonl").read_text().splitlines() for r in (whole, crashed)]
    assert logs[0] == logs[1] and [json.loads(x)["micro_batch"] for x in logs[0]] == [0, 0, 1, 1, 2, 2, 3, 3]
    first = json.loads(logs[0][0])
    best, worst = first["groups"][0][0]
    assert first["rewards"][best] == max(first["rewards"]) and first["rewards"][worst] == min(first["rewards"])


def test_round_schedule_moves_the_reference_exactly_at_round_boundaries(assets, tmp_path, monkeypatch):
    """3 rounds of 4 prompts, 2 groups per micro-batch: 2 steps per round. With update_reference the reference of
    round k is the policy after step 2k: DPO's rewards (beta * log-ratios) are exactly 0 at the first step of every
    round and not at the second; the saved reference is that step's checkpoint; rounds are saved before training."""
    from mmpref.online.source import OnlineSource

    drawn = []
    real = OnlineSource.draw
    monkeypatch.setattr(OnlineSource, "draw", lambda self, p, q: drawn.append(list(q)) or real(self, p, q))
    run = tmp_path / "run"
    assert main(online_argv(assets, tmp_path, "round", "best_vs_worst", "online.update_reference=true")) == 0
    assert drawn == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # one draw per round, at its start
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        at_round_start = r["step"] % 2 == 1
        assert (r["rewards/chosen"] == 0.0) == at_round_start, r
    reference = load_file(str(run / "rollouts" / "reference-0002.safetensors"))
    policy_at_4 = load_file(str(run / "checkpoint-00000004" / "model.safetensors"))
    for name, value in policy_at_4.items():
        assert torch.equal(reference[name], value), name
    assert not (run / "rollouts" / "reference-0001.safetensors").exists()  # only the latest is kept
    assert sorted(p.name for p in (run / "rollouts").glob("round-*")) == ["round-0000", "round-0001", "round-0002"]


def test_round_schedule_resumed_mid_round_reads_the_saved_rollouts(assets, tmp_path, monkeypatch):
    from mmpref.online.source import OnlineSource

    argv = lambda out: online_argv(assets, out, "round", "sppo", "online.update_reference=true")  # noqa: E731
    assert main(argv(tmp_path / "whole")) == 0
    real, drawn = OnlineSource.draw, []
    crash_at = {"n": 0}

    def batches(self, policy, first):  # kill the run at micro-batch 3 (round 1's second step)
        for m, batch in enumerate(real_batches(self, policy, first), start=first):
            if m == 3 and crash_at["n"] == 0:
                crash_at["n"] += 1
                raise RuntimeError("killed")
            yield batch

    real_batches = OnlineSource.batches
    monkeypatch.setattr(OnlineSource, "batches", batches)
    assert main(argv(tmp_path / "crashed")) == 1
    monkeypatch.setattr(OnlineSource, "draw", lambda self, p, q: drawn.append(list(q)) or real(self, p, q))
    assert main(argv(tmp_path / "crashed")) == 0
    assert drawn == [[8, 9, 10, 11]]  # round 1 was read back; only round 2 was drawn
    for name, value in final_weights(tmp_path / "whole" / "run").items():
        assert torch.equal(final_weights(tmp_path / "crashed" / "run")[name], value), name
    record = json.loads((tmp_path / "whole" / "run" / "rollouts" / "round-0000" / "records.jsonl")
                        .read_text().splitlines()[0])
    from helpers.judges import letter_preference

    heard = record["responses"]
    by_hand = [np.mean([letter_preference(["p"], [heard[i]], [heard[j]])[0] for j in range(4) if j != i])
               for i in range(4)]
    assert record["win_rates"] == pytest.approx(by_hand, abs=1e-6)
    best, worst = int(np.argmax(by_hand)), int(np.argmin(by_hand))
    assert record["groups"] == [[[best, worst], [pytest.approx(by_hand[best]), pytest.approx(by_hand[worst])]]]


def test_offline_win_prob_column_reaches_the_scores(assets, tmp_path):
    """A pair's win_prob p becomes Scores.win_prob = [p, 1 - p] through mmpref train's adapter."""
    from mmpref.adapters.llm import LLMAdapter
    from mmpref.config import load_config
    from mmpref.losses import build_loss

    rows = [json.loads(line) for line in Path(assets["prefs"]).read_text().splitlines()[:4]]
    for r, p in zip(rows, (0.9, 0.6, 0.75, 1.0)):
        r["win_prob"] = p
    data = tmp_path / "soft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = [o for o in tiny_llm_overrides(assets, tmp_path / "run") if not o.startswith("data.path")]
    cfg = load_config(LLM_TINY, [*over, f"data.path={data}", "data.eval_split=null", "loss={sppo: {}}"])
    adapter = LLMAdapter(cfg)
    batch = adapter.collate([adapter.train_dataset[i] for i in range(4)])
    scores = adapter.scores(adapter.policy, batch, build_loss("sppo"))
    by_idx = {i: p for i, p in zip(range(4), (0.9, 0.6, 0.75, 1.0))}
    want = torch.tensor([[by_idx[int(i)], 1 - by_idx[int(i)]] for i in batch["idx"]])
    torch.testing.assert_close(scores.win_prob, want)
    rows[1]["win_prob"] = 1.5
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"win_prob not a probability .* \(line 2\)"):
        LLMAdapter(load_config(LLM_TINY, [*over, f"data.path={data}", "data.eval_split=null", "loss={sppo: {}}"]))


def test_generate_serves_a_causal_lm_folder(assets, tmp_path):
    """`mmpref generate` on a causal LM folder writes completions: greedy ones equal transformers' own greedy
    decoding; sampled ones are reproducible per seed and differ between samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = tmp_path / "p.txt"
    prompts.write_text("tell name cat dog:\nlist give saw:\n")
    base = ["generate", "--model", assets["model"], "--prompts-file", str(prompts), "--max-new-tokens", "6"]
    assert main([*base, "--greedy", "--out", str(tmp_path / "greedy")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "greedy" / "generations.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
        assert row["completion"] == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    sampled = []
    for out in ("s1", "s2"):
        assert main([*base, "--num-samples", "3", "--seed", "5", "--out", str(tmp_path / out)]) == 0
        sampled.append((tmp_path / out / "generations.jsonl").read_text())
    assert sampled[0] == sampled[1]
    completions = [json.loads(x)["completion"] for x in sampled[0].splitlines()]
    assert len(completions) == 6 and len(set(completions[:3])) > 1


def test_diffusion_rollouts_are_the_pipelines_samples_judged_as_waves(tmp_path):
    """Iterative Tango 2's round: the saved latents are what the current pipeline samples for each caption with
    its recorded seed; the judge heard those latents decoded (VAE, vocoder); the training rows hold the latents
    themselves (posterior std 0: nothing is re-encoded) with the caption's T5 encoding."""
    from helpers.judges import wave_loudness

    from mmpref.cli import main as cli

    out = tmp_path / "run"
    assert cli(["train", str(ROOT / "configs" / "tango2_online_tiny.yaml"), f"run.output_dir={out}",
                "online.judge={kind: callable, path: 'helpers.judges:wave_loudness'}", "online.rounds=1",
                f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    from helpers.fakes import FakeAccelerator

    from mmpref.adapters.diffusion import DiffusionAdapter
    from mmpref.config import load_config
    from mmpref.online.source import _load_records, read_prompts

    cfg = load_config(ROOT / "configs" / "tango2_online_tiny.yaml", [f"run.output_dir={tmp_path / 'again'}"])
    adapter = DiffusionAdapter(cfg)
    adapter.setup(FakeAccelerator())
    records = _load_records(out / "rollouts" / "round-0000")
    assert [r["position"] for r in records] == list(range(8))
    rec = records[0]
    caption = read_prompts("toy:captions", "prompt")[rec["prompt_index"]]
    again = adapter.sample(adapter.policy, [caption], 3, [rec["seed"]], cfg.online.generation)[0]
    for saved, fresh in zip(rec["rollouts"], again):  # the policy at round 0 is the starting pipeline
        torch.testing.assert_close(saved, fresh, atol=1e-5, rtol=1e-5)
    heard = adapter.judge_inputs(rec["rollouts"])
    assert rec["rewards"] == pytest.approx(wave_loudness([caption] * 3, heard), abs=1e-6)
    members, _ = rec["groups"][0]
    assert rec["rewards"][members[0]] == max(rec["rewards"])
    row = adapter.group_row(0, caption, [rec["rollouts"][i] for i in members], None)
    torch.testing.assert_close(row["mean"], torch.stack([rec["rollouts"][i] for i in members]))
    assert row["std"].abs().max() == 0 and row["mask"].sum() == row["hidden"].shape[0]
