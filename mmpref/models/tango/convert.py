"""Weight-name conversion between the public Tango checkpoints and :class:`TangoPipeline`'s stock parts.

A Tango / Tango 2 checkpoint folder (e.g. ``declare-lab/tango2``, downloaded by the user) holds:

* ``pytorch_model_main.bin``: Tango's ``AudioDiffusion`` wrapper; ``unet.*`` is already a diffusers
  ``UNet2DConditionModel`` (names kept); ``text_encoder.*`` (FLAN-T5 encoder) is used when present;
* ``pytorch_model_vae.bin`` + ``vae_config.json``: AudioLDM's own ``AutoencoderKL`` (LDM names: ``encoder.down.0
  .block.0.conv1``, ``mid.attn_1.q`` as 1x1 convs, ...) with its HiFi-GAN under ``vocoder.*`` (``ups.i`` for the
  upsamplers, weight norm already removed);
* ``main_config.json``: Tango's ``AudioDiffusion`` arguments: ``text_encoder_name`` (FLAN-T5, named in errors),
  ``scheduler_name`` and ``unet_model_config_path``, the UNet architecture (a JSON file in Tango's repository,
  ``configs/diffusion_model_config.json``), read when it can be found (beside the checkpoint, or as given).

The maps below are built from the *target* modules' own state-dict keys (diffusers name -> original name), so
converting is a lookup plus a reshape (1x1 conv <-> linear), and the inverse (:func:`save_tango_checkpoint`)
writes a checkpoint in the original layout, which the tests load back.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpref.models.tango import presets

logger = logging.getLogger(__name__)

MAIN_FILES = ("pytorch_model_main.bin", "pytorch_model_main.safetensors")
VAE_FILES = ("pytorch_model_vae.bin", "pytorch_model_vae.safetensors")
_STRIP_PREFIXES = ("first_stage_model.", "vae.", "module.")  # AudioLDM full checkpoints / DDP dumps
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# ---------------------------------------------------------------------------------------------- key maps
def vae_original_key(key: str, num_up_blocks: int) -> str:
    """diffusers ``AutoencoderKL`` key -> AudioLDM/LDM key."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # diffusers orders decoder blocks from the lowest resolution; LDM indexes them by resolution level
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
                 lambda m: f".mid.attn_1.{_ATTN[m[1]]}.", key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def vocoder_original_key(key: str) -> str | None:
    """``SpeechT5HifiGan`` key -> AudioLDM HiFi-GAN key inside the VAE file (``None``: not in the original)."""
    if key in ("mean", "scale"):  # input normalisation, unused by AudioLDM (normalize_before=False)
        return None
    return "vocoder." + re.sub(r"^upsampler\.", "ups.", key)


def unet_original_key(key: str) -> str:
    return "unet." + key


def text_encoder_original_key(key: str) -> str:
    return "text_encoder." + key


# ---------------------------------------------------------------------------------------------- conversion
def convert_state_dict(original: dict[str, torch.Tensor], module: nn.Module, key_fn, what: str) -> dict:
    """Gather ``module``'s state dict from ``original`` through ``key_fn`` (target key -> original key)."""
    target = module.state_dict()
    out, missing = {}, []
    for key, ref in target.items():
        okey = key_fn(key)
        if okey is None:
            out[key] = _default_tensor(key, ref)
        elif okey in original:
            t = original[okey]
            if t.numel() != ref.numel():
                raise ValueError(f"{what}: {okey} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            out[key] = t.reshape(ref.shape)  # 1x1 conv <-> linear for the VAE attention
        else:
            missing.append(okey)
    if missing:
        raise KeyError(f"{what}: {len(missing)} weights missing from the checkpoint, e.g. {missing[:5]}")
    return out


def _default_tensor(key: str, ref: torch.Tensor) -> torch.Tensor:
    if key == "mean":
        return torch.zeros(ref.shape)
    if key == "scale":
        return torch.ones(ref.shape)
    raise KeyError(key)


def fold_weight_norm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs (HiFi-GAN saved with weight norm: ``weight_g``/``weight_v``, or torch's
    ``parametrizations.weight.original0/1``) by the plain ``weight`` they stand for."""
    out = dict(sd)
    for suffix_g, suffix_v in (("weight_g", "weight_v"),
                               ("parametrizations.weight.original0", "parametrizations.weight.original1")):
        for gk in [k for k in sd if k == suffix_g or k.endswith("." + suffix_g)]:
            stem = gk[: -len(suffix_g)]
            g, v = out.pop(gk), out.pop(stem + suffix_v)
            norm = v.flatten(1).norm(dim=1).reshape(g.shape)  # torch's weight_norm, dim=0
            out[stem + "weight"] = v * (g / norm)
    return out


def _strip(sd: dict[str, torch.Tensor], prefixes=_STRIP_PREFIXES) -> dict[str, torch.Tensor]:
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _build_loaded(build, original: dict, key_fn, what: str) -> tuple[nn.Module, set[str]]:
    """Build on the meta device (no random init of 866M weights), then assign the converted tensors.

    Returns the module and the original keys it used."""
    with torch.device("meta"):
        module = build()
    sd = convert_state_dict(original, module, key_fn, what)
    module.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{what}: not loaded: {leftover[:5]}")
    return module.eval(), {key_fn(k) for k in sd} - {None}


def _warn_unused(original: dict, used: set, what: str, ignore: str | None = None) -> None:
    unused = sorted(k for k in set(original) - used if not (ignore and k.startswith(ignore)))
    if unused:
        logger.warning("%s: %d checkpoint tensors unused, e.g. %s", what, len(unused), unused[:5])


# ---------------------------------------------------------------------------------------------- configs
def audioldm_vae_config_to_diffusers(cfg: dict) -> dict:
    """AudioLDM ``vae_config.json`` (``ddconfig`` + ``embed_dim`` + ``scale_factor``) -> ``AutoencoderKL`` config."""
    dd = cfg["ddconfig"]
    if dd.get("attn_resolutions"):
        raise NotImplementedError("AudioLDM VAEs with attention inside the down/up blocks are not supported")
    if cfg.get("embed_dim", dd["z_channels"]) != dd["z_channels"]:
        raise ValueError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    n = len(dd["ch_mult"])
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "norm_num_groups": dd.get("norm_num_groups", 32),  # LDM's Normalize is GroupNorm(32); key is ours
        "sample_size": dd.get("resolution", 256),
        "scaling_factor": cfg.get("scale_factor", 1.0),  # AudioLDM's class default when absent
    }


def diffusers_vae_config_to_audioldm(cfg: dict) -> dict:
    ch = cfg["block_out_channels"][0]
    return {
        "image_key": "fbank",
        "subband": 1,
        "embed_dim": cfg["latent_channels"],
        "time_shuffle": 1,
        "scale_factor": cfg["scaling_factor"],
        "ddconfig": {
            "double_z": True,
            "z_channels": cfg["latent_channels"],
            "resolution": cfg.get("sample_size", 256),
            "downsample_time": False,
            "in_channels": cfg["in_channels"],
            "out_ch": cfg["out_channels"],
            "ch": ch,
            "ch_mult": [c // ch for c in cfg["block_out_channels"]],
            "num_res_blocks": cfg["layers_per_block"],
            "attn_resolutions": [],
            "dropout": 0.0,
            **({"norm_num_groups": cfg["norm_num_groups"]} if cfg["norm_num_groups"] != 32 else {}),
        },
    }


# ---------------------------------------------------------------------------------------------- I/O
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    return sd.get("state_dict", sd) if isinstance(sd.get("state_dict"), dict) else sd


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _read_json(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def load_tango_checkpoint(
    pipeline_cls: type,
    path_or_dir: str | os.PathLike,
    *,
    text_encoder: str | os.PathLike | nn.Module | None = None,
    tokenizer: Any = None,
    vae_path: str | os.PathLike | None = None,
    preset: str = "tango",
    unet_config: dict | str | os.PathLike | None = None,
    scaling_factor: float | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Build a :class:`TangoPipeline` from a Tango / Tango 2 checkpoint.

    ``path_or_dir``: the checkpoint folder, or the main weights file (then ``vae_path`` names the VAE file).
    ``text_encoder``: a local FLAN-T5 folder or a ``T5EncoderModel``; needed unless the main weights carry
    ``text_encoder.*``. ``tokenizer``: a tokenizer or local path (default: the ``text_encoder`` folder, or the
    preset's); Tango's checkpoints ship none, so without one the conversion refuses, naming what to pass.
    The UNet architecture comes from ``unet_config`` (a dict or a JSON file), else from the file the checkpoint's
    ``main_config.json`` names (``unet_model_config_path``, looked up beside the checkpoint, then as given), else
    from ``preset``; the VAE's from ``vae_config.json`` when present. Nothing is downloaded.
    """
    from mmpref.models.tango.tokenizer import resolve_tokenizer

    path = Path(path_or_dir)
    folder = path if path.is_dir() else path.parent
    main_file = _find(path, MAIN_FILES) if path.is_dir() else path
    vae_file = Path(vae_path) if vae_path is not None else _find(folder, VAE_FILES)
    if main_file is None or not main_file.is_file():
        raise FileNotFoundError(f"no Tango main weights ({' / '.join(MAIN_FILES)}) at {path}")
    if vae_file is None or not vae_file.is_file():
        raise FileNotFoundError(f"no AudioLDM VAE weights ({' / '.join(VAE_FILES)}) next to {path}")
    cfg = presets.preset_config(preset)
    main_cfg = _read_json(folder / "main_config.json") or {}
    if main_cfg.get("unet_model_name") and not main_cfg.get("unet_model_config_path"):
        raise NotImplementedError(f"{folder / 'main_config.json'}: a Tango built on a pre-trained image UNet "
                                  "(unet_model_name, with group_in/group_out adapters) is not supported")
    unet_config = unet_config if unet_config is not None else _unet_config_file(folder, main_cfg)
    if unet_config is not None:
        cfg["unet"] = unet_config if isinstance(unet_config, dict) else json.loads(Path(unet_config).read_text())
        cfg["unet"] = {k: v for k, v in cfg["unet"].items() if not k.startswith("_")}  # diffusers' bookkeeping
    vae_json = _read_json(folder / "vae_config.json")
    if vae_json is not None:
        cfg["vae"] = audioldm_vae_config_to_diffusers(vae_json)
    if scaling_factor is not None:
        cfg["vae"]["scaling_factor"] = scaling_factor

    if tokenizer is None and not isinstance(text_encoder, str | os.PathLike) and cfg["tokenizer"] is None:
        name = main_cfg.get("text_encoder_name", "google/flan-t5-large")  # checked before any weight is read
        raise ValueError(f"{folder}: the checkpoint ships no tokenizer; pass tokenizer=<a local copy of {name}> "
                         f"(or text_encoder=<that folder>, whose tokenizer is then used)")
    main = _strip(_read_state_dict(main_file), ("module.",))
    vae_sd = fold_weight_norm(_strip(_read_state_dict(vae_file)))
    n_up = len(cfg["vae"]["up_block_types"])
    unet, used_main = _build_loaded(lambda: presets.build_unet(cfg["unet"]), main, unet_original_key, "unet")
    vae, used_vae = _build_loaded(lambda: presets.build_vae(cfg["vae"]), vae_sd,
                                  lambda k: vae_original_key(k, n_up), "vae")
    vocoder, used_voc = _build_loaded(lambda: presets.build_vocoder(cfg["vocoder"]), vae_sd,
                                      vocoder_original_key, "vocoder")
    text_encoder, tok_default = _text_encoder(text_encoder, _sub(main, "text_encoder."), cfg)
    _warn_unused(main, used_main, "main weights", ignore="text_encoder.")
    _warn_unused(vae_sd, used_vae | used_voc, "VAE weights")
    tok = resolve_tokenizer(tokenizer if tokenizer is not None else tok_default)
    pipe = pipeline_cls(text_encoder=text_encoder, tokenizer=tok, unet=unet, vae=vae, vocoder=vocoder,
                        scheduler=presets.build_scheduler(cfg["scheduler"]))
    return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe


def _unet_config_file(folder: Path, main_cfg: dict) -> Path | None:
    """The UNet config ``main_config.json`` names, if it can be found: beside the checkpoint (its name, or its path
    relative to the folder), or the path as given (relative to the working directory, as Tango resolves it)."""
    named = main_cfg.get("unet_model_config_path")
    if not named:
        return None
    for candidate in (folder / Path(named).name, folder / named, Path(named)):
        if candidate.is_file():
            return candidate
    logger.warning("main_config.json names the UNet config %s, which is not beside the checkpoint; using the "
                   "built-in Tango architecture (pass unet_config=<that file> to use it)", named)
    return None


def _text_encoder(spec, te_sd: dict, cfg: dict) -> tuple[nn.Module, Any]:
    from transformers import T5EncoderModel

    if isinstance(spec, nn.Module):
        return spec.eval(), cfg["tokenizer"]
    if spec is not None:
        return T5EncoderModel.from_pretrained(os.fspath(spec)).eval(), os.fspath(spec)
    if not te_sd:
        raise ValueError("the checkpoint has no text_encoder.* weights: pass text_encoder=<local flan-t5-large folder>")
    t5_cfg = dict(cfg["text_encoder"], vocab_size=te_sd["shared.weight"].shape[0])
    model = presets.build_text_encoder(t5_cfg)
    missing, unexpected = model.load_state_dict(te_sd, strict=False)
    missing = [k for k in missing if k != "encoder.embed_tokens.weight"]  # tied to shared.weight
    if missing or unexpected:
        raise KeyError(f"text_encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg["tokenizer"]


def save_tango_checkpoint(pipe, folder: str | os.PathLike, include_text_encoder: bool = True) -> Path:
    """Write ``pipe`` in Tango's original layout (the inverse of :func:`load_tango_checkpoint`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    main = {unet_original_key(k): v for k, v in pipe.unet.state_dict().items()}
    if include_text_encoder:
        main.update({text_encoder_original_key(k): v for k, v in pipe.text_encoder.state_dict().items()})
    n_up = len(pipe.vae.config.up_block_types)
    vae = {vae_original_key(k, n_up): _ldm_shape(k, v) for k, v in pipe.vae.state_dict().items()}
    for k, v in pipe.vocoder.state_dict().items():
        if (ok := vocoder_original_key(k)) is not None:
            vae[ok] = v
    torch.save({k: v.contiguous() for k, v in main.items()}, folder / MAIN_FILES[0])
    torch.save({k: v.contiguous() for k, v in vae.items()}, folder / VAE_FILES[0])
    (folder / "vae_config.json").write_text(json.dumps(diffusers_vae_config_to_audioldm(dict(pipe.vae.config))))
    main_cfg = {"text_encoder_name": "google/flan-t5-large", "scheduler_name": "stabilityai/stable-diffusion-2-1",
                "unet_model_config_path": "configs/diffusion_model_config.json"}
    (folder / "main_config.json").write_text(json.dumps(main_cfg))
    return folder


def _ldm_shape(key: str, v: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention projections are 1x1 convs; diffusers' are linears."""
    if ".attentions." in key and v.dim() == 2:
        return v[:, :, None, None]
    return v
