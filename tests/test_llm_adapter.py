"""LLM adapter: exact sequence log-probs, every loss through one training step, reference modes, saving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from mmpref.adapters.llm import LLMAdapter, LLMModelConfig
from mmpref.config import LoraConfig, ReferenceConfig, RunConfig, TrainConfig
from mmpref.data.llm import LLMDataConfig
from mmpref.losses import available_losses, build_loss, loss_spec
from mmpref.toy.llm import build_tiny_llama, synthetic_preferences


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llm")
    pairs, sets = synthetic_preferences(12, seed=1), synthetic_preferences(6, seed=2, losers=3)
    texts = [r["prompt"] + r["chosen"] + "".join(r["rejected"]) for r in pairs + sets]
    model = build_tiny_llama(root / "model", texts * 4, vocab_size=320)
    out = {"model": str(model), "root": str(root)}
    for name, rows in (("pairs", pairs), ("sets", sets)):
        out[name] = str(root / f"{name}.jsonl")
        Path(out[name]).write_text("\n".join(json.dumps(r) for r in rows))
    return out


def make_cfg(assets, data="pairs", loss="dpo", mode="copy", lora=False, **data_kw) -> TrainConfig:
    return TrainConfig(
        modality="llm",
        model=LLMModelConfig(path=assets["model"], logprob_chunk_size=3, kl_max_new_tokens=4),
        data=LLMDataConfig(path=assets[data], **data_kw),
        loss=loss,
        reference=ReferenceConfig(mode=mode, cache_dir=os.path.join(assets["root"], "cache")),
        lora=LoraConfig(enabled=lora, r=4, alpha=8),
        run=RunConfig(batch_size=4, output_dir=os.path.join(assets["root"], "run")),
    )


def first_batch(adapter: LLMAdapter, n: int = 4) -> dict:
    return adapter.collate([adapter.train_dataset[i] for i in range(n)])


def naive_logps(model, prompt: list[int], completion: list[int]) -> float:
    """One unpadded sequence, full log_softmax in float64."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.double().log_softmax(-1)[0, :-1]
    targets = ids[0, 1:]
    return float(logp[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum())


@pytest.mark.parametrize("data,max_length", [("pairs", 1024), ("sets", 1024), ("sets", 16)])
def test_logps_match_naive_float64(assets, data, max_length, caplog):
    adapter = LLMAdapter(make_cfg(assets, data=data, max_length=max_length, max_prompt_length=10))
    rows = [adapter.train_dataset[i] for i in range(4)]
    batch = adapter.collate(rows)
    assert batch["attention_mask"].eq(0).any(), "the batch should contain right padding"
    logps, lengths = adapter.forward_logps(adapter.policy, batch)
    ref = adapter.policy.double().eval()
    expect = [naive_logps(ref, r["prompt_ids"], c) for r in rows for c in r["completion_ids"]]
    torch.testing.assert_close(logps.double(), torch.tensor(expect, dtype=torch.float64), atol=2e-5, rtol=1e-5)
    assert lengths.tolist() == [len(c) for r in rows for c in r["completion_ids"]]
    if max_length < 1024:  # truncation keeps the prompt (its last 10 tokens) and cuts completion tails
        assert all(len(r["prompt_ids"]) + max(map(len, r["completion_ids"])) <= max_length for r in rows)
        assert "rows truncated to max_length=16" in caplog.text


def test_half_precision_logps_use_chunked_float32(assets):
    adapter = LLMAdapter(make_cfg(assets))
    batch = first_batch(adapter)
    full, _ = adapter.forward_logps(adapter.policy, batch)
    adapter.policy.to(torch.bfloat16)
    half, _ = adapter.forward_logps(adapter.policy, batch)
    assert half.dtype == torch.float32
    half.sum().backward()  # through the per-chunk recomputation
    torch.testing.assert_close(half, full, atol=0.5, rtol=0.05)


def _loss_data(name: str) -> tuple[str, object]:
    spec = loss_spec(name)
    if spec.additive:
        return "pairs", {"dpo": 1.0, name: 0.1}
    return "pairs", name


@pytest.mark.parametrize("name", available_losses())
def test_every_loss_trains_one_step(assets, name):
    data, loss_cfg = _loss_data(name)
    adapter = LLMAdapter(make_cfg(assets, data=data, loss=loss_cfg))
    loss = build_loss(loss_cfg)
    adapter.setup(Accelerator(cpu=True))
    opt = torch.optim.AdamW([p for p in adapter.policy.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in adapter.policy.parameters()]
    out = loss(adapter.scores(adapter.policy, first_batch(adapter), loss))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, adapter.policy.parameters()))
    assert (adapter.reference is None) == (not (loss.needs_reference or loss.needs_kl))


def test_unpaired_kto_uses_mismatched_kl_rows(assets):
    adapter = LLMAdapter(make_cfg(assets, loss="kto"))
    ds = adapter.train_dataset
    assert len(ds) == 24 and set(ds["label"]) == {True, False}  # 12 pairs -> 24 unpaired rows
    assert all(r["kl_completion_ids"] != r["completion_ids"][0] for r in ds)
    scores = adapter.scores(adapter.policy, first_batch(adapter), build_loss("kto"))
    assert scores.policy.shape == (4,) and scores.kl_policy.shape == (4,) and scores.labels.dtype == torch.bool


def _perturb_lora(model) -> None:
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("loss_name", ["dpo", "kto"])
def test_lora_and_cached_reference_match_separate_copy(assets, loss_name, tmp_path):
    results = {}
    for mode in ("copy", "lora", "cached"):
        cfg = make_cfg(assets, loss=loss_name, mode=mode, lora=True)
        cfg.reference.cache_dir = str(tmp_path / "cache")
        torch.manual_seed(0)  # the same LoRA initialisation in every mode
        adapter = LLMAdapter(cfg)
        loss = build_loss(loss_name)
        adapter.setup(Accelerator(cpu=True))
        _perturb_lora(adapter.policy)  # the policy now differs from its reference
        results[mode] = loss(adapter.scores(adapter.policy, first_batch(adapter), loss))
    for mode in ("lora", "cached"):
        torch.testing.assert_close(results[mode].loss, results["copy"].loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[mode].rewards, results["copy"].rewards, atol=1e-4, rtol=1e-5)


def test_cached_reference_reused_without_reference_forward(assets, tmp_path, monkeypatch):
    cfg = make_cfg(assets, mode="cached")
    cfg.reference.cache_dir = str(tmp_path)
    first = LLMAdapter(cfg)
    first.setup(Accelerator(cpu=True))
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 1
    second = LLMAdapter(cfg)
    monkeypatch.setattr(second, "_reference_pass", lambda *a: pytest.fail("cache should have been reused"))
    second.setup(Accelerator(cpu=True))
    calls = []
    real = second._forward
    monkeypatch.setattr(second, "_forward", lambda m, b, **kw: calls.append(1) or real(m, b, **kw))
    scores = second.scores(second.policy, first_batch(second), build_loss("dpo"))
    assert len(calls) == 1 and second.reference is None  # policy pass only
    torch.testing.assert_close(scores.reference, scores.policy.detach())  # untrained policy == reference
    cfg.data.max_length = 30  # tokenisation settings are part of the key
    third = LLMAdapter(cfg)
    third.setup(Accelerator(cpu=True))
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 2


def test_reference_free_run_loads_no_reference(assets):
    adapter = LLMAdapter(make_cfg(assets, loss="simpo", mode="copy"))
    assert adapter.reference is None and adapter.ref_mode == "none"
    with pytest.raises(ValueError, match="needs a reference"):
        LLMAdapter(make_cfg(assets, loss="dpo", mode="none"))
    with pytest.raises(ValueError, match="lora.enabled"):
        LLMAdapter(make_cfg(assets, loss="dpo", mode="lora"))


@pytest.mark.parametrize("lora", [False, True])
def test_save_pretrained_safetensors(assets, tmp_path, lora):
    adapter = LLMAdapter(make_cfg(assets, mode="lora" if lora else "copy", lora=lora))
    adapter.save_pretrained(adapter.policy, str(tmp_path))
    files = {p.name for p in tmp_path.iterdir()}
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert weights in files and "tokenizer.json" in files
    assert not any(f.endswith(".bin") for f in files)
    if lora:
        assert "model.safetensors" not in files


def naive_token_logps(model, prompt: list[int], completion: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion token: log p(y_t) and log sum_v p(v)^2, full softmax in float64."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.double().log_softmax(-1)[0, len(prompt) - 1 : -1]
    picked = logp[torch.arange(len(completion)), torch.tensor(completion)]
    return picked, torch.logsumexp(2 * logp, dim=-1)


def test_ld_alpha_downweights_tokens_past_the_groups_shared_length(assets):
    cfg = make_cfg(assets, data="sets")
    cfg.model.ld_alpha = 0.3
    adapter = LLMAdapter(cfg)
    rows = [adapter.train_dataset[i] for i in range(3)]
    scores = adapter.scores(adapter.policy, adapter.collate(rows), build_loss("dpo"))
    model = adapter.policy.double().eval()
    expect = []
    for r in rows:
        shared = min(map(len, r["completion_ids"]))
        assert max(map(len, r["completion_ids"])) > shared, "the test needs completions of different lengths"
        for c in r["completion_ids"]:
            lp, _ = naive_token_logps(model, r["prompt_ids"], c)
            expect.append(float(lp[:shared].sum() + 0.3 * lp[shared:].sum()))
    expect = torch.tensor(expect, dtype=torch.float64).view(3, -1)
    torch.testing.assert_close(scores.policy.double(), expect, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(scores.reference.double(), expect, atol=2e-5, rtol=1e-5)  # same weights (copy)
    assert scores.lengths.tolist() == [list(map(len, r["completion_ids"])) for r in rows]  # lengths unchanged
    with pytest.raises(ValueError, match="ld_alpha must be in"):
        LLMModelConfig(path="x", ld_alpha=1.5)


def test_wpo_weights_each_pair_by_the_policys_renormalised_probabilities(assets):
    cfg = make_cfg(assets, data="sets")
    cfg.model.wpo = True
    adapter = LLMAdapter(cfg)
    rows = [adapter.train_dataset[i] for i in range(3)]
    scores = adapter.scores(adapter.policy, adapter.collate(rows), build_loss("dpo"))
    model = adapter.policy.double().eval()
    logw = []
    for r in rows:
        for c in r["completion_ids"]:
            lp, lsq = naive_token_logps(model, r["prompt_ids"], c)
            logw.append(float((lp - lsq).mean()))  # WPO: mean_t [log p(y_t) - log sum_v p(v)^2]
    logw = torch.tensor(logw, dtype=torch.float64).view(3, -1)
    torch.testing.assert_close(scores.log_weights.double(), logw, atol=2e-5, rtol=1e-5)
    assert not scores.log_weights.requires_grad
    out = build_loss({"dpo": {"beta": 0.5}})(scores)
    h = (scores.policy - scores.reference).detach().double()
    per_pair = -torch.nn.functional.logsigmoid(0.5 * (h[:, :1] - h[:, 1:])) * torch.exp(logw[:, :1] + logw[:, 1:])
    assert out.loss.item() == pytest.approx(per_pair.mean(1).mean().item(), rel=1e-5)


def test_merge_lora_writes_a_full_model_plain_transformers_loads(assets, tmp_path):
    """run.merge_lora: final/ is the base with the adapter merged (no peft, no path to the base needed) and computes
    what the LoRA policy computes; the adapter alone is in final/adapter/; the policy keeps its adapter."""
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(assets, lora=True, mode="lora")
    cfg.run.merge_lora = True
    adapter = LLMAdapter(cfg)
    with torch.no_grad():  # a trained-looking adapter
        for n, p in adapter.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    adapter.save_pretrained(adapter.policy, str(tmp_path / "final"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not any("lora" in k for k in merged.state_dict()) and merged.config.use_cache
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        want = adapter.policy.eval()(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any("lora_" in n for n, _ in adapter.policy.named_parameters())


def test_qlora_settings_and_refusals_before_anything_loads(assets, monkeypatch):
    from mmpref.adapters.llm import quantized_loading
    from mmpref.errors import ConfigError

    q = quantized_loading(LLMModelConfig(path="x", quantization="4bit"))["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("nothing may load before the quantization checks"))
    cfg = make_cfg(assets, lora=True, mode="lora")
    cfg.model.quantization = "4bit"
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        LLMAdapter(cfg)
    cfg.lora.enabled, cfg.reference.mode = False, "copy"
    with pytest.raises(ConfigError, match="set lora.enabled=true"):
        LLMAdapter(cfg)
    cfg.lora.enabled, cfg.reference.from_phase_start = True, True
    with pytest.raises(ConfigError, match="4bit with reference.from_phase_start"):
        LLMAdapter(cfg)
    with pytest.raises(ValueError, match="4bit or null"):
        LLMModelConfig(path="x", quantization="3bit")
