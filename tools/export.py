#!/usr/bin/env python
"""Export a checkpoint's weights for use outside this repository (safetensors files, no pickle).

    python tools/export.py CHECKPOINT --format timm        --out DIR   # ViT encoder -> timm
    python tools/export.py CHECKPOINT --format hf          --out DIR   # (Deblurring) MAE -> transformers
    python tools/export.py CHECKPOINT --format safetensors --out DIR   # any model of this repository

CHECKPOINT: a pretraining or fine-tuning checkpoint of this repository, a published DeblurringMIM /
MAE / ConvMAE checkpoint, or a ``.safetensors`` export. The model name, input size and channels come
from the checkpoint's recorded settings; ``--model``, ``--input_size`` and ``--in_chans`` override
them (needed for checkpoints that record nothing, e.g. the official MAE ones).

What each format writes to DIR (every file atomically; existing files are never replaced unless
``--overwrite`` is given):

* ``timm``: ``model.safetensors``, a timm ``VisionTransformer`` state dict, and ``timm.json`` (the
  timm model name, the keyword arguments to create it with, the pooling and norm settings, the
  input normalisation) plus a ``README.md`` with the lines that load it. A pretraining checkpoint
  gives the encoder with MAE's final ``norm`` and class-token pooling, no head; a fine-tuned
  ``vit_*`` gives the classifier as trained (average pooling + ``fc_norm``, or class token + ``norm``).
  ViT only: ConvViT has no timm counterpart (use ``safetensors``).
* ``hf``: a Hugging Face ``ViTMAEForPreTraining`` folder (``config.json``, ``model.safetensors``)
  and the encoder alone as a ``ViTModel`` folder in ``DIR/encoder``; MAE / Deblurring MAE
  pretraining checkpoints with a square input size.
* ``safetensors``: ``model.safetensors`` with this repository's parameter names (the recorded
  settings in its metadata, so ``--finetune`` / ``--resume`` / ``model.pretrained`` accept it like
  the ``.pth``) and ``model.json`` (model name, constructor arguments, recorded settings).

After writing, the export is loaded back the way its README says and its outputs are compared with
this repository's model on a random input; a difference above float tolerance stops with an error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_convmae  # noqa: E402,F401  (registers the ConvMAE models)
from models_mae import MaskedAutoencoderViT, is_deblurring_model  # noqa: E402
from models_vit import FIRST_PATCH  # noqa: E402
from util.checkpoint import (FIRST_CONV_KEYS, SAFETENSORS_ARGS_KEY, CheckpointError,  # noqa: E402
                             extract_state_dict, load_checkpoint_file, load_weights)
from util.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from util.fileio import atomic_write_text, atomic_write_with  # noqa: E402
from util.registry import finetune_models, pretrain_models  # noqa: E402

FORMATS = ("timm", "hf", "safetensors")
PRETRAINING, FINE_TUNING = "pretraining", "fine-tuning"
# Largest |ours - exported| accepted by the check after writing (float32, different kernels).
VERIFY_ATOL = 1e-4


@dataclass
class ModelSpec:
    """What rebuilds the model: a registry name, its family and its constructor arguments."""
    name: str
    family: str
    kwargs: Dict = field(default_factory=dict)

    @property
    def img_size(self) -> Tuple[int, int]:
        return tuple(self.kwargs["img_size"])

    @property
    def in_chans(self) -> int:
        return self.kwargs["in_chans"]

    def build(self) -> torch.nn.Module:
        registry = pretrain_models() if self.family == PRETRAINING else finetune_models()
        return registry.create(self.name, **{**self.kwargs, "img_size": self.img_size})


# ------------------------------------------------------------------------------ reading
def recorded_settings(ckpt: dict) -> dict:
    """The plain (JSON-able) settings a checkpoint recorded: our dict or the published Namespace."""
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if not isinstance(saved, dict):
        return {}
    return {k: v for k, v in saved.items() if _is_plain(v)}


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _as_hw(size) -> Tuple[int, int]:
    size = [size] if isinstance(size, int) else list(size)
    if len(size) not in (1, 2):
        raise SystemExit(f"--input_size takes one number (square) or two (H W), got {size}")
    return (int(size[0]), int(size[-1]))


def resolve_spec(path: str, state: dict, recorded: dict, args) -> ModelSpec:
    name = args.model or recorded.get("model")
    if not name:
        raise SystemExit(f"{path} does not record its model: pass --model NAME (e.g. mae_vit_base_patch16 "
                         "for an official MAE checkpoint)")
    pretrain, finetune = pretrain_models(), finetune_models()
    if name not in pretrain and name not in finetune:
        raise SystemExit(f"unknown model '{name}' ({'--model' if args.model else f'recorded in {path}'}). "
                         f"Valid names: {', '.join(pretrain.names() + finetune.names())}")
    in_chans = args.in_chans or next((int(state[k].shape[1]) for k in FIRST_CONV_KEYS
                                      if k in state and state[k].ndim == 4), None) \
        or int(recorded.get("in_chans") or 3)
    kwargs = dict(img_size=list(_as_hw(args.input_size or recorded.get("input_size") or 224)),
                  in_chans=in_chans)
    if name in pretrain:
        kwargs.update(norm_pix_loss=bool(recorded.get("norm_pix_loss", False)),
                      loss_on=recorded.get("loss_on") or ("all" if is_deblurring_model(name) else "masked"))
        return ModelSpec(name, PRETRAINING, kwargs)
    # the weights say how the classifier was built: head size, and fc_norm <=> average pooling;
    # only ConvViT's first-patch pooling leaves no trace in them
    head = state.get("head.weight")
    pooling = FIRST_PATCH if recorded.get("global_pool") == FIRST_PATCH else "fc_norm.weight" in state
    kwargs.update(num_classes=int(head.shape[0]) if head is not None else 0, global_pool=pooling)
    return ModelSpec(name, FINE_TUNING, kwargs)


def load_model(path: str, args):
    """(model with the checkpoint's weights, its spec, the recorded settings)."""
    ckpt = load_checkpoint_file(path)
    state = extract_state_dict(ckpt, path)
    recorded = recorded_settings(ckpt)
    spec = resolve_spec(path, state, recorded, args)
    try:
        model = spec.build()
    except ValueError as err:
        raise SystemExit(f"{spec.name} at input size {spec.img_size}: {err}")
    print(load_weights(model, state, allowed_missing=(), allow_unexpected=False, source_name=path))
    return model.eval(), spec, recorded


# ------------------------------------------------------------------------------ writing
class ExportWriter:
    """Collects the files of one export and writes them atomically, refusing to replace existing
    files unless asked to (a previous export may be all a user has of a model)."""

    def __init__(self, out: str, overwrite: bool):
        self.out, self.overwrite = out, overwrite
        self.files: Dict[str, object] = {}

    def add_tensors(self, name: str, state: Dict[str, torch.Tensor], metadata: Dict[str, str]):
        # own contiguous storage per tensor: safetensors refuses views sharing memory (qkv splits)
        self.files[name] = ({k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                             for k, v in state.items()}, metadata)

    def add_json(self, name: str, obj) -> None:
        self.files[name] = json.dumps(obj, indent=2) + "\n"

    def add_text(self, name: str, text: str) -> None:
        self.files[name] = text

    def write(self) -> List[str]:
        paths = {name: os.path.join(self.out, name) for name in self.files}
        existing = [p for p in paths.values() if os.path.exists(p)]
        if existing and not self.overwrite:
            raise SystemExit(f"{self.out} already holds {', '.join(map(os.path.basename, existing))}: "
                             "pass another --out, or --overwrite to replace them")
        from safetensors.torch import save_file
        for name, content in self.files.items():
            if isinstance(content, tuple):
                tensors, metadata = content
                atomic_write_with(paths[name], lambda tmp: save_file(tensors, tmp, metadata=metadata))
            else:
                atomic_write_text(paths[name], content)
        return list(paths.values())


def _input_normalisation(recorded: dict, in_chans: int) -> Optional[dict]:
    mean, std = recorded.get("data_mean"), recorded.get("data_std")
    if mean is not None and std is not None and len(mean) == len(std) == in_chans:
        return dict(mean=list(mean), std=list(std))
    if in_chans == 3:
        return dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return None  # a grey model that did not record its normalisation


def _blur_note(recorded: dict, spec: ModelSpec) -> str:
    method = recorded.get("blur")
    if method:
        sigma = recorded.get("blur_sigma")
        return f"inputs blurred ({method}{f', sigma {sigma}' if sigma is not None else ''}) before normalisation"
    if spec.family == PRETRAINING and is_deblurring_model(spec.name):
        return "pretrained on blurred inputs (Deblurring MIM): feed blurred images, as in fine-tuning"
    return "no blur recorded"


def _describe_input(source: dict) -> str:
    norm = source["input_normalisation"]
    scaled = (f"pixels in [0, 1] normalised with mean {norm['mean']}, std {norm['std']}" if norm
              else "normalisation not recorded")
    return f"{scaled}; {source['blur']}"


def _source(path: str, spec: ModelSpec, recorded: dict) -> dict:
    return dict(checkpoint=os.path.abspath(path), model=spec.name, family=spec.family,
                constructor=spec.kwargs, input_normalisation=_input_normalisation(recorded, spec.in_chans),
                blur=_blur_note(recorded, spec))


# ------------------------------------------------------------------------------ safetensors
def export_safetensors(model, spec: ModelSpec, recorded: dict, path: str, writer: ExportWriter) -> None:
    settings = {**recorded, "model": spec.name, "input_size": list(spec.img_size), "in_chans": spec.in_chans}
    writer.add_tensors("model.safetensors", model.state_dict(),
                       {"format": "pt", SAFETENSORS_ARGS_KEY: json.dumps(settings)})
    writer.add_json("model.json", dict(model=spec.name, family=spec.family, constructor=spec.kwargs,
                                       parameter_names="this repository's (models_mae.py / models_convmae.py "
                                                       "/ models_vit.py)",
                                       source=_source(path, spec, recorded), args=settings))


def verify_safetensors(model, spec: ModelSpec, out: str) -> float:
    reloaded = spec.build()
    load_weights(reloaded, os.path.join(out, "model.safetensors"), allowed_missing=(), allow_unexpected=False)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


# ------------------------------------------------------------------------------ timm
def vit_size_of(spec: ModelSpec) -> str:
    """``base_patch16`` etc. of a ViT model name, pretraining or fine-tuning."""
    name = spec.name.removesuffix("_dec512d8b")
    for prefix in ("dmae_vit_", "mae_vit_", "vit_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    raise SystemExit(f"--format timm/hf export ViT models; {spec.name} is a ConvViT, which has no timm or "
                     "Hugging Face counterpart: use --format safetensors")


def timm_encoder(model, spec: ModelSpec):
    """The fine-tuning ViT (a timm VisionTransformer) holding the checkpoint's encoder."""
    if spec.family == FINE_TUNING:
        return model, spec.kwargs["global_pool"], spec.kwargs["num_classes"]
    encoder = finetune_models().create(f"vit_{vit_size_of(spec)}", img_size=spec.img_size,
                                       in_chans=spec.in_chans, num_classes=0, global_pool=False)
    # the decoder and mask token are not part of the encoder; everything else must load
    load_weights(encoder, model.state_dict(), allowed_missing=(), allow_unexpected=True,
                 source_name=spec.name)
    return encoder.eval(), False, 0


def timm_model_name(size: str) -> str:
    """The timm name of the same architecture when timm has one, else the base ViT (the explicit
    keyword arguments of timm.json define the architecture either way)."""
    import timm
    candidate = f"vit_{size}_224"
    return candidate if timm.list_models(candidate) else "vit_base_patch16_224"


def export_timm(model, spec: ModelSpec, recorded: dict, path: str, writer: ExportWriter):
    size = vit_size_of(spec)
    encoder, global_pool, num_classes = timm_encoder(model, spec)
    block = encoder.blocks[0]
    create_kwargs = dict(
        img_size=list(spec.img_size), patch_size=encoder.patch_embed.patch_size[0],
        embed_dim=encoder.embed_dim, depth=len(encoder.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / encoder.embed_dim, qkv_bias=True, in_chans=spec.in_chans,
        num_classes=num_classes, class_token=True, global_pool="avg" if global_pool else "token",
        fc_norm=bool(global_pool))
    overlay = dict(num_classes=num_classes, input_size=[spec.in_chans, *spec.img_size],
                   interpolation="bicubic")
    normalisation = _input_normalisation(recorded, spec.in_chans)
    if normalisation:
        overlay.update(normalisation)
    if spec.family == FINE_TUNING:
        from util.cls_datasets import eval_crop_pct
        overlay["crop_pct"] = eval_crop_pct(spec.img_size)
    pooling = ("average of the patch tokens, then fc_norm (MAE fine-tuning); the blocks' output is not "
               "normalised per token (norm is Identity)" if global_pool else
               "class token of the output normalised by norm (LayerNorm eps 1e-6)")
    info = dict(timm_model=timm_model_name(size), create_kwargs=create_kwargs,
                pretrained_cfg_overlay=overlay, pooling=pooling,
                norm="LayerNorm eps 1e-6 everywhere; final norm " +
                     ("replaced by fc_norm after pooling" if global_pool else "applied to every token"),
                head=f"Linear to {num_classes} classes" if num_classes else
                     "none (num_classes=0): forward() returns the pooled features",
                source=_source(path, spec, recorded))
    if spec.family == PRETRAINING:
        info["note"] = ("pretraining encoder: forward_features() gives MAE's normalised tokens (class token "
                        "first). To fine-tune as MAE does, create it with global_pool='avg', fc_norm=True "
                        "and pretrained_strict=False (fc_norm starts fresh, norm is unused).")
    writer.add_tensors("model.safetensors", encoder.state_dict(), {"format": "pt"})
    writer.add_json("timm.json", info)
    writer.add_text("README.md", _timm_readme(info))
    return encoder, info


def create_timm_model(out: str):
    """Create the exported model exactly as the README says (local file only, no hub access)."""
    import timm
    info = json.load(open(os.path.join(out, "timm.json")))
    overlay = {**info["pretrained_cfg_overlay"], "file": os.path.join(out, "model.safetensors")}
    return timm.create_model(info["timm_model"], pretrained=True, pretrained_cfg_overlay=overlay,
                             **info["create_kwargs"]).eval()


def _timm_readme(info: dict) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in info["create_kwargs"].items())
    overlay = ", ".join(f"{k}={v!r}" for k, v in info["pretrained_cfg_overlay"].items())
    return f"""# timm export of {info['source']['model']}

```python
import timm
model = timm.create_model(
    "{info['timm_model']}", pretrained=True,
    pretrained_cfg_overlay=dict(file="model.safetensors", {overlay}),
    {kwargs})
```

`file=` is read locally (no download); give its full path when running from another folder.
The keyword arguments define the architecture; the model name only picks timm's defaults.

* pooling: {info['pooling']}
* norm: {info['norm']}
* head: {info['head']}
* input: {_describe_input(info['source'])}
{f"* {info['note']}" if 'note' in info else ''}
`timm.json` holds the same settings for scripts.
"""


# ------------------------------------------------------------------------------ Hugging Face
def _hf_layer_state(state: dict, ours: str, theirs: str) -> dict:
    """One transformer block: timm names -> Hugging Face ViT names (qkv split into query/key/value)."""
    out = {}
    for kind in ("weight", "bias"):
        q, k, v = state[f"{ours}.attn.qkv.{kind}"].chunk(3, dim=0)  # timm packs q, k, v in this order
        out.update({f"{theirs}.attention.attention.query.{kind}": q,
                    f"{theirs}.attention.attention.key.{kind}": k,
                    f"{theirs}.attention.attention.value.{kind}": v,
                    f"{theirs}.attention.output.dense.{kind}": state[f"{ours}.attn.proj.{kind}"],
                    f"{theirs}.layernorm_before.{kind}": state[f"{ours}.norm1.{kind}"],
                    f"{theirs}.layernorm_after.{kind}": state[f"{ours}.norm2.{kind}"],
                    f"{theirs}.intermediate.dense.{kind}": state[f"{ours}.mlp.fc1.{kind}"],
                    f"{theirs}.output.dense.{kind}": state[f"{ours}.mlp.fc2.{kind}"]})
    return out


def hf_encoder_state(state: dict, depth: int, prefix: str = "") -> dict:
    """Encoder weights under Hugging Face ViT names (``prefix`` 'vit.' inside ViTMAEForPreTraining)."""
    out = {f"{prefix}embeddings.cls_token": state["cls_token"],
           f"{prefix}embeddings.position_embeddings": state["pos_embed"],
           f"{prefix}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           f"{prefix}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           f"{prefix}layernorm.weight": state["norm.weight"], f"{prefix}layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        out.update(_hf_layer_state(state, f"blocks.{i}", f"{prefix}encoder.layer.{i}"))
    return out


def hf_mae_state(state: dict, depth: int, decoder_depth: int) -> dict:
    """The whole MAE under ViTMAEForPreTraining names (as the Hugging Face hub's facebook/vit-mae-*)."""
    out = hf_encoder_state(state, depth, prefix="vit.")
    out.update({"decoder.decoder_embed.weight": state["decoder_embed.weight"],
                "decoder.decoder_embed.bias": state["decoder_embed.bias"],
                "decoder.mask_token": state["mask_token"],
                "decoder.decoder_pos_embed": state["decoder_pos_embed"],
                "decoder.decoder_norm.weight": state["decoder_norm.weight"],
                "decoder.decoder_norm.bias": state["decoder_norm.bias"],
                "decoder.decoder_pred.weight": state["decoder_pred.weight"],
                "decoder.decoder_pred.bias": state["decoder_pred.bias"]})
    for i in range(decoder_depth):
        out.update(_hf_layer_state(state, f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}"))
    return out


def hf_configs(model: MaskedAutoencoderViT, spec: ModelSpec, recorded: dict):
    from transformers import ViTConfig, ViTMAEConfig
    dim, dec_dim = model.cls_token.shape[-1], model.mask_token.shape[-1]
    common = dict(hidden_size=dim, num_hidden_layers=len(model.blocks),
                  num_attention_heads=model.blocks[0].attn.num_heads,
                  intermediate_size=model.blocks[0].mlp.fc1.out_features, hidden_act="gelu",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=model.norm.eps,
                  image_size=spec.img_size[0], patch_size=model.patch_size, num_channels=spec.in_chans,
                  qkv_bias=True)
    mae = ViTMAEConfig(**common, decoder_hidden_size=dec_dim, decoder_num_hidden_layers=len(model.decoder_blocks),
                       decoder_num_attention_heads=model.decoder_blocks[0].attn.num_heads,
                       decoder_intermediate_size=model.decoder_blocks[0].mlp.fc1.out_features,
                       mask_ratio=float(recorded.get("mask_ratio", 0.75)), norm_pix_loss=model.norm_pix_loss)
    mae.architectures = ["ViTMAEForPreTraining"]
    encoder = ViTConfig(**common)
    encoder.architectures = ["ViTModel"]
    return mae, encoder


def export_hf(model, spec: ModelSpec, recorded: dict, path: str, writer: ExportWriter) -> dict:
    if spec.family != PRETRAINING or not isinstance(model, MaskedAutoencoderViT):
        raise SystemExit(f"--format hf exports MAE / Deblurring MAE pretraining models (mae_vit_*, dmae_vit_*); "
                         f"{spec.name} is not one: use --format timm for a fine-tuned ViT, --format "
                         "safetensors for any model")
    if spec.img_size[0] != spec.img_size[1]:
        raise SystemExit(f"--format hf: Hugging Face ViTMAE takes square images only; {spec.name} was built for "
                         f"{spec.img_size[0]}x{spec.img_size[1]}. Pass --input_size N to export it at NxN "
                         "(the fixed position embeddings are recomputed for that grid)")
    mae_config, encoder_config = hf_configs(model, spec, recorded)
    state = model.state_dict()
    writer.add_text("config.json", mae_config.to_json_string())
    writer.add_tensors("model.safetensors", hf_mae_state(state, len(model.blocks), len(model.decoder_blocks)),
                       {"format": "pt"})
    writer.add_text("encoder/config.json", encoder_config.to_json_string())
    writer.add_tensors("encoder/model.safetensors", hf_encoder_state(state, len(model.blocks)), {"format": "pt"})
    info = dict(
        hf_model="ViTMAEForPreTraining (this folder); ViTModel (encoder/, load with add_pooling_layer=False)",
        loss=("Hugging Face computes the vanilla MAE loss: MSE against the input, masked patches only. "
              f"This model was trained with loss_on='{model.loss_on}'" +
              (" against the sharp image while the input is blurred: compute that loss from the logits "
               "(patchify the sharp image in the same order)" if model.loss_on == "all" or
               is_deblurring_model(spec.name) else "")),
        patch_order="(h, w) patches, pixels (p, q, c) inside a patch: the same in both, so logits compare "
                    "directly",
        mask_ratio=mae_config.mask_ratio, norm_pix_loss=mae_config.norm_pix_loss,
        masking=("random masking by argsort of uniform noise in both; pass the same noise=(N, L) to "
                 "ViTMAEForPreTraining.forward and to this repository's model.forward to get the same mask. "
                 "Hugging Face takes the mask ratio from config.mask_ratio only."),
        parameter_names=("timm -> Hugging Face: blocks.i.attn.qkv split in three -> encoder.layer.i.attention."
                         "attention.{query,key,value}; attn.proj -> attention.output.dense; norm1/norm2 -> "
                         "layernorm_before/after; mlp.fc1/fc2 -> intermediate.dense/output.dense; "
                         "decoder_blocks.i -> decoder.decoder_layers.i; norm -> vit.layernorm"),
        source=_source(path, spec, recorded))
    writer.add_json("export.json", info)
    writer.add_text("README.md", _hf_readme(info, spec))
    return info


def _hf_readme(info: dict, spec: ModelSpec) -> str:
    return f"""# Hugging Face export of {spec.name}

```python
from transformers import ViTMAEForPreTraining, ViTModel
mae = ViTMAEForPreTraining.from_pretrained("THIS_FOLDER")
encoder = ViTModel.from_pretrained("THIS_FOLDER/encoder", add_pooling_layer=False)
```

* loss: {info['loss']}
* patch order: {info['patch_order']}
* masking: {info['masking']}
* mask_ratio {info['mask_ratio']}, norm_pix_loss {info['norm_pix_loss']}
* input: {_describe_input(info['source'])}

`export.json` holds the same notes and the parameter-name mapping.
"""


def verify_hf(model, spec: ModelSpec, out: str) -> float:
    from transformers import ViTMAEForPreTraining, ViTModel
    torch.manual_seed(0)
    h, w = spec.img_size
    images = torch.randn(2, spec.in_chans, h, w)
    noise = torch.rand(2, model.num_patches)
    hf = ViTMAEForPreTraining.from_pretrained(out).eval()
    encoder = ViTModel.from_pretrained(os.path.join(out, "encoder"), add_pooling_layer=False).eval()
    with torch.no_grad():
        _, pred, mask = model(images, mask_ratio=hf.config.mask_ratio, noise=noise)
        theirs = hf(pixel_values=images, noise=noise)
        tokens = model.forward_encoder(images, torch.arange(model.num_patches).expand(2, -1))
        hf_tokens = encoder(pixel_values=images).last_hidden_state
    if not torch.equal(mask, theirs.mask):
        return math.inf
    return max((pred - theirs.logits).abs().max().item(), (tokens - hf_tokens).abs().max().item())


def verify_timm(encoder, spec: ModelSpec, out: str) -> float:
    torch.manual_seed(0)
    images = torch.randn(2, spec.in_chans, *spec.img_size)
    theirs = create_timm_model(out)
    with torch.no_grad():
        return max((encoder.forward_features(images) - theirs.forward_features(images)).abs().max().item(),
                   (encoder(images) - theirs(images)).abs().max().item())


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help=".pth checkpoint (ours or published) or .safetensors export")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.add_argument("--model", default=None, help="model name (default: recorded in the checkpoint)")
    p.add_argument("--input_size", type=int, nargs="+", default=None,
                   help="input size, one number or H W (default: recorded, else 224)")
    p.add_argument("--in_chans", type=int, default=None,
                   help="input channels (default: those of the checkpoint's first layer)")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier export in --out")
    return p.parse_args(argv)


def main(argv=None) -> List[str]:
    args = parse_args(argv)
    try:
        model, spec, recorded = load_model(args.checkpoint, args)
        writer = ExportWriter(args.out, args.overwrite)
        if args.format == "safetensors":
            export_safetensors(model, spec, recorded, args.checkpoint, writer)
            check = lambda: verify_safetensors(model, spec, args.out)  # noqa: E731
        elif args.format == "timm":
            encoder, _ = export_timm(model, spec, recorded, args.checkpoint, writer)
            check = lambda: verify_timm(encoder, spec, args.out)  # noqa: E731
        else:
            export_hf(model, spec, recorded, args.checkpoint, writer)
            check = lambda: verify_hf(model, spec, args.out)  # noqa: E731
        written = writer.write()
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    difference = check()
    if not difference <= VERIFY_ATOL:
        raise SystemExit(f"error: the {args.format} export in {args.out} does not reproduce {spec.name} "
                         f"(largest difference {difference:.3g}); please report this with the versions of "
                         "torch, timm and transformers")
    print(f"{args.format} export of {spec.name} written to {args.out}: "
          f"{', '.join(os.path.relpath(p, args.out) for p in written)}")
    print(f"checked: loaded back, outputs equal ours within {difference:.2g}")
    return written


if __name__ == "__main__":
    main()
