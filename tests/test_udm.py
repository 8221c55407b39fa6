"""BCO's prompt-distribution matching (mmpref.data.udm): the density ratio it estimates, and its path through the
LLM adapter into the loss."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from mmpref.adapters.llm import LLMAdapter, LLMModelConfig
from mmpref.config import ReferenceConfig, RunConfig, TrainConfig
from mmpref.data.llm import LLMDataConfig
from mmpref.data.udm import UDMConfig, density_ratio_weights, fit_desirable_classifier
from mmpref.losses import build_loss
from mmpref.toy.llm import build_tiny_llama, synthetic_preferences


def test_weights_recover_the_true_density_ratio():
    """Desirable prompts ~ N(mu, I), undesirable ~ N(-mu, I), three times fewer: the true ratio is exp(2 mu.x)
    whatever the class sizes (balanced class weights cancel the prior)."""
    rng = np.random.default_rng(0)
    mu = np.array([0.4, -0.2])
    good, bad = rng.normal(mu, 1, (3000, 2)), rng.normal(-mu, 1, (1000, 2))
    x = np.concatenate([good, bad])
    desirable = np.r_[np.ones(3000, bool), np.zeros(1000, bool)]
    w = density_ratio_weights(fit_desirable_classifier(x, desirable), x, desirable, 0.5, 10.0)
    assert (w[desirable] == 1).all()
    true = np.clip(np.exp(2 * bad @ mu), 0.5, 10.0)
    assert np.median(np.abs(np.log(w[~desirable]) - np.log(true))) < 0.05
    assert w[~desirable].min() >= 0.5 and w[~desirable].max() <= 10.0


def test_one_class_only_is_a_clear_error():
    with pytest.raises(ValueError, match="both desirable and undesirable"):
        fit_desirable_classifier(np.zeros((4, 2)), np.ones(4, bool))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama (also the embedding model) and unpaired rows whose two labels come from different prompts:
    desirable answers mostly to 'alpha' prompts, undesirable ones to 'alpha' and 'omega' prompts alike."""
    root = tmp_path_factory.mktemp("udm")
    base = synthetic_preferences(16, seed=3)
    rows = []
    for i, r in enumerate(base):
        kind = "alpha" if i % 4 else "omega"  # 12 alpha, 4 omega prompts
        rows.append({"prompt": f"{kind} {kind} {r['prompt']}", "completion": r["chosen"], "label": kind == "alpha"})
        rows.append({"prompt": f"omega omega {r['prompt']}", "completion": r["rejected"], "label": False})
        rows.append({"prompt": f"alpha alpha {r['prompt']}", "completion": r["rejected"], "label": False})
    texts = [r["prompt"] + r["completion"] for r in rows]
    model = build_tiny_llama(root / "model", texts * 2, vocab_size=320)
    (root / "unpaired.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"model": str(model), "data": str(root / "unpaired.jsonl"), "root": str(root)}


def make_cfg(assets, loss="bco", udm=True) -> TrainConfig:
    return TrainConfig(
        modality="llm",
        model=LLMModelConfig(path=assets["model"]),
        data=LLMDataConfig(path=assets["data"], udm=UDMConfig(embedding_model=assets["model"]) if udm else None),
        loss=loss,
        reference=ReferenceConfig(mode="copy"),
        run=RunConfig(batch_size=4, output_dir=os.path.join(assets["root"], "run")),
    )


def test_adapter_weights_reach_the_bco_loss(assets):
    adapter = LLMAdapter(make_cfg(assets))
    ds = adapter.train_dataset
    labels, weights = np.array(list(ds["label"]), bool), np.array(list(ds["udm_weight"]))
    prompts = adapter.tokenizer.batch_decode(list(ds["prompt_ids"]), skip_special_tokens=True)
    omega = np.array([p.startswith("omega") for p in prompts])
    assert (weights[labels] == 1).all() and ((weights >= 0.5) & (weights <= 10)).all()
    # undesirable rows on desirable-looking ('alpha') prompts count more than those on 'omega' prompts
    assert weights[~labels & ~omega].mean() > 1.5 * weights[~labels & omega].mean()

    loss = build_loss("bco")
    adapter.setup(Accelerator(cpu=True))
    rows = [ds[i] for i in range(8)]
    batch = adapter.collate(rows)
    scores = adapter.scores(adapter.policy, batch, loss)
    torch.testing.assert_close(scores.weights, torch.tensor([r["udm_weight"] for r in rows]))
    unweighted = build_loss("bco")
    scores_plain = adapter.scores(adapter.policy, batch, unweighted)
    scores_plain.weights = None
    per_row_plain = -torch.nn.functional.logsigmoid(
        torch.where(scores.labels, 1, -1) * (0.1 * (scores_plain.policy - scores_plain.reference)
                                             - 0.1 * (scores_plain.policy - scores_plain.reference).mean()))
    w = torch.where(scores.labels, 1.0, scores.weights)
    expected = (per_row_plain.double() * w.double()).mean()
    assert loss(scores).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_udm_without_bco_is_a_clear_error(assets):
    with pytest.raises(ValueError, match=r"data.udm.*bco.*\['kto'\]"):
        LLMAdapter(make_cfg(assets, loss="kto"))


def test_udm_config_from_yaml_keys(assets, tmp_path):
    from mmpref.config import load_config

    path = tmp_path / "bco.yaml"
    path.write_text(f"modality: llm\nmodel: {{path: {assets['model']}}}\nloss: bco\n"
                    f"data: {{path: {assets['data']}, udm: {{embedding_model: {assets['model']}, max_ratio: 4}}}}\n")
    cfg = load_config(path)
    assert cfg.data.udm == UDMConfig(embedding_model=assets["model"], max_ratio=4.0)
    path.write_text(path.read_text().replace("max_ratio: 4", "max_ratio: 0.1"))
    with pytest.raises(Exception, match="min_ratio <= max_ratio"):
        load_config(path)
