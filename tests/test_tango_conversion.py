"""Tango checkpoint conversion against a tiny checkpoint written WITHOUT mmpref's key maps.

The VAE's and the vocoder's tensor names and shapes are listed here from AudioLDM's model definitions (LDM's
Encoder / Decoder / ResnetBlock / AttnBlock, HiFi-GAN's Generator and ResBlock1), the UNet's from diffusers 0.15's
``UNet2DConditionModel`` names (the version Tango vendors). The converted parts are then compared numerically with
independent references: diffusers' own LDM VAE converter, and a HiFi-GAN forward written here from the raw tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmpref.models.tango import TangoPipeline
from mmpref.models.tango.presets import build_unet, preset_config

# an asymmetric VAE (channel multipliers 1, 2, 4), so a wrong block order cannot load by accident
DD = {"double_z": True, "z_channels": 8, "resolution": 256, "downsample_time": False, "in_channels": 1, "out_ch": 1,
      "ch": 8, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
      "norm_num_groups": 4}


def _norm(name: str, c: int) -> dict[str, tuple]:
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def _conv(name: str, cout: int, cin: int, k: int) -> dict[str, tuple]:
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def _resnet(name: str, cin: int, cout: int) -> dict[str, tuple]:
    out = {**_norm(f"{name}.norm1", cin), **_conv(f"{name}.conv1", cout, cin, 3), **_norm(f"{name}.norm2", cout),
           **_conv(f"{name}.conv2", cout, cout, 3)}
    if cin != cout:
        out.update(_conv(f"{name}.nin_shortcut", cout, cin, 1))
    return out


def _attn(name: str, c: int) -> dict[str, tuple]:  # LDM's AttnBlock: 1x1 convs
    return {**_norm(f"{name}.norm", c), **{k: v for p in ("q", "k", "v", "proj_out")
                                           for k, v in _conv(f"{name}.{p}", c, c, 1).items()}}


def ldm_vae_shapes(dd: dict) -> dict[str, tuple]:
    """AudioLDM / LDM first-stage model tensors for ``ddconfig`` (names as its Encoder and Decoder define them)."""
    ch, mult, n_res, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    s = _conv("encoder.conv_in", ch, dd["in_channels"], 3)
    block_in = ch
    for i, m in enumerate(mult):
        block_out = ch * m
        for j in range(n_res):
            s.update(_resnet(f"encoder.down.{i}.block.{j}", block_in, block_out))
            block_in = block_out
        if i != len(mult) - 1:
            s.update(_conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3))
    for part in ("encoder", "decoder"):
        c = ch * mult[-1]
        s.update({**_resnet(f"{part}.mid.block_1", c, c), **_attn(f"{part}.mid.attn_1", c),
                  **_resnet(f"{part}.mid.block_2", c, c)})
    s.update({**_norm("encoder.norm_out", block_in), **_conv("encoder.conv_out", 2 * z, block_in, 3)})
    s.update({**_conv("quant_conv", 2 * z, 2 * z, 1), **_conv("post_quant_conv", z, z, 1)})
    block_in = ch * mult[-1]
    s.update(_conv("decoder.conv_in", block_in, z, 3))
    for i in reversed(range(len(mult))):  # LDM's decoder indexes levels by resolution, built from the lowest
        block_out = ch * mult[i]
        for j in range(n_res + 1):
            s.update(_resnet(f"decoder.up.{i}.block.{j}", block_in, block_out))
            block_in = block_out
        if i != 0:
            s.update(_conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3))
    s.update({**_norm("decoder.norm_out", block_in), **_conv("decoder.conv_out", dd["out_ch"], block_in, 3)})
    return s


def hifigan_shapes(v: dict) -> dict[str, tuple]:
    """AudioLDM's HiFi-GAN Generator (ResBlock1) tensors, under ``vocoder.``, weight norm already removed."""
    uic, s = v["upsample_initial_channel"], {}
    s.update({"vocoder.conv_pre.weight": (uic, v["model_in_dim"], 7), "vocoder.conv_pre.bias": (uic,)})
    nk = len(v["resblock_kernel_sizes"])
    for i, (k, _) in enumerate(zip(v["upsample_kernel_sizes"], v["upsample_rates"])):
        cin, cout = uic // 2**i, uic // 2 ** (i + 1)
        s.update({f"vocoder.ups.{i}.weight": (cin, cout, k), f"vocoder.ups.{i}.bias": (cout,)})  # ConvTranspose1d
        for j, (kr, dil) in enumerate(zip(v["resblock_kernel_sizes"], v["resblock_dilation_sizes"])):
            for m in range(len(dil)):
                for convs in ("convs1", "convs2"):
                    s[f"vocoder.resblocks.{i * nk + j}.{convs}.{m}.weight"] = (cout, cout, kr)
                    s[f"vocoder.resblocks.{i * nk + j}.{convs}.{m}.bias"] = (cout,)
    last = uic // 2 ** len(v["upsample_rates"])
    s.update({"vocoder.conv_post.weight": (1, last, 7), "vocoder.conv_post.bias": (1,)})
    return s


def hifigan_forward(sd: dict, v: dict, mel: torch.Tensor) -> torch.Tensor:
    """HiFi-GAN's forward written from the paper's Generator / ResBlock1, on the raw tensors (mel: (B, T, n_mels))."""
    w = lambda n: (sd[f"vocoder.{n}.weight"], sd[f"vocoder.{n}.bias"])  # noqa: E731
    x = F.conv1d(mel.transpose(1, 2), *w("conv_pre"), padding=3)
    nk, slope = len(v["resblock_kernel_sizes"]), v["leaky_relu_slope"]
    for i, (rate, k) in enumerate(zip(v["upsample_rates"], v["upsample_kernel_sizes"])):
        x = F.conv_transpose1d(F.leaky_relu(x, slope), *w(f"ups.{i}"), stride=rate, padding=(k - rate) // 2)
        total = 0
        for j, (kr, dil) in enumerate(zip(v["resblock_kernel_sizes"], v["resblock_dilation_sizes"])):
            xs = x
            for m, d in enumerate(dil):
                t = F.conv1d(F.leaky_relu(xs, slope), *w(f"resblocks.{i * nk + j}.convs1.{m}"), dilation=d,
                             padding=(kr * d - d) // 2)
                t = F.conv1d(F.leaky_relu(t, slope), *w(f"resblocks.{i * nk + j}.convs2.{m}"), padding=(kr - 1) // 2)
                xs = xs + t
            total = total + xs
        x = total / nk
    return torch.tanh(F.conv1d(F.leaky_relu(x), *w("conv_post"), padding=3)).squeeze(1)


# diffusers 0.15 UNet2DConditionModel names that Tango's checkpoints carry (after "unet.")
UNET_015_KEYS = (
    "conv_in.weight", "time_embedding.linear_1.weight", "time_embedding.linear_2.bias",
    "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight",
    "down_blocks.0.downsamplers.0.conv.weight", "down_blocks.1.attentions.0.norm.weight",
    "down_blocks.1.attentions.0.proj_in.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.norm3.weight", "down_blocks.1.attentions.0.proj_out.weight",
    "mid_block.resnets.1.conv2.weight", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight",
    "up_blocks.0.attentions.0.transformer_blocks.0.norm1.bias", "up_blocks.0.upsamplers.0.conv.weight",
    "up_blocks.1.resnets.1.conv_shortcut.weight", "conv_norm_out.weight", "conv_out.bias",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tango_ckpt")
    g = torch.Generator().manual_seed(0)
    cfg = preset_config("tiny")
    vae = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in ldm_vae_shapes(DD).items()}
    vae.update({k: torch.randn(shape, generator=g) * 0.1 for k, shape in hifigan_shapes(cfg["vocoder"]).items()})
    unet = build_unet(cfg["unet"])
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05, generator=g)
    main = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    torch.save(main, folder / "pytorch_model_main.bin")
    torch.save(vae, folder / "pytorch_model_vae.bin")
    (folder / "vae_config.json").write_text(json.dumps({"ddconfig": DD, "embed_dim": 8, "scale_factor": 0.7}))
    return folder, main, vae, cfg


def test_independently_named_checkpoint_converts_and_computes_the_same(checkpoint):
    from diffusers import AutoencoderKL
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_vae_checkpoint

    folder, main, vae, cfg = checkpoint
    assert all(f"unet.{k}" in main for k in UNET_015_KEYS)  # the names Tango's checkpoints carry exist today
    te = folder / "te"
    pipe_parts = TangoPipeline.from_preset("tiny")
    pipe_parts.text_encoder.save_pretrained(te)
    pipe_parts.tokenizer.save_pretrained(te)
    pipe = TangoPipeline.from_tango_checkpoint(folder, preset="tiny", text_encoder=te)
    # UNet: the names are diffusers' own, taken as they are
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, main[f"unet.{k}"]), k
    # VAE: diffusers' own LDM converter, on the same raw tensors, gives the same model
    ref_cfg = {k: v for k, v in pipe.vae.config.items() if not k.startswith("_")}
    ref = AutoencoderKL(**ref_cfg)
    ref.load_state_dict(convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in vae.items()
                                                    if not k.startswith("vocoder.")}, ref_cfg))
    assert pipe.vae.config.scaling_factor == 0.7
    mel = torch.randn(1, 1, 32, 64)
    with torch.no_grad():
        ours, theirs = pipe.vae(mel, sample_posterior=False).sample, ref(mel, sample_posterior=False).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # vocoder: HiFi-GAN's forward on the raw tensors
    mel = torch.randn(2, 12, cfg["vocoder"]["model_in_dim"])
    with torch.no_grad():
        ours = pipe.vocoder(mel)
        theirs = hifigan_forward(vae, cfg["vocoder"], mel)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
