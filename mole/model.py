"""Load the frozen backbone (partitioned at load time under ZeRO-3) and wrap it for training.

The family is read from the model directory's ``config.json`` (:func:`mole.backbones.backbone_for`);
the same ``from_pretrained`` call loads the bundled tiny models and a real ``llava-1.5-7b-hf`` or
``llava-v1.6-vicuna-7b-hf`` directory; only the path in the config changes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig

from mole.backbones import Backbone, backbone_for
from mole.balance import aux_loss
from mole.config import Config
from mole.spec import AdapterSpec
from mole.surgery import MoleSurgery, apply_mole

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_backbone(path: str, dtype: torch.dtype, ds_config: dict | None = None) -> nn.Module:
    """The family's stock class ``from_pretrained``, with ZeRO-3 partitioning *during* the load when
    ``ds_config`` is stage 3. A family mole does not describe is a one-line ``UnsupportedBackbone``.

    transformers partitions at load time while an ``HfDeepSpeedConfig`` object is alive, so a 7B
    model never sits whole in one rank's memory. The object must outlive ``from_pretrained``.
    """
    backbone = backbone_for(AutoConfig.from_pretrained(path))
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    keep_alive = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (weakly referenced by transformers)
    model = backbone.model_class.from_pretrained(path, dtype=dtype)
    del keep_alive
    return model


def build_mole_model(cfg: Config, dtype: torch.dtype, ds_config: dict | None = None):
    """Backbone + MoLE surgery from the config; returns (model, surgery, processor).

    The new modules are initialised from ``train.seed`` right before surgery, so they are the same
    on every rank and under every ZeRO stage (loading consumes random numbers differently).
    """
    model = load_backbone(cfg.model.name_or_path, dtype, ds_config)
    model.config.use_cache = False
    torch.manual_seed(cfg.train.seed)
    surgery = apply_mole(model, AdapterSpec.from_config(cfg, model.config))
    for module in model.modules():  # new modules are created in fp32; match the backbone
        for param in module.parameters(recurse=False):
            if param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
    processor = backbone_for(model.config).load_processor(cfg.model.name_or_path, local_files_only=False)
    return model, surgery, processor


class TrainingModel(nn.Module):
    """One training forward of a MoLE backbone: LM loss + weighted balance loss.

    It runs the steps the stock forward runs (embed tokens, vision tower + projector as the family
    does it, scatter the image features into the image-token positions, LLM) but *always* runs the
    vision tower: a batch with no image gets the family's minimal dummy image whose features are
    multiplied by zero, as LLaVA's training code does. Under ZeRO-3 every rank must gather the same
    parameters in the same order each step; transformers would skip the vision tower on a text-only
    batch and desynchronise the ranks.
    """

    def __init__(self, llava: nn.Module, surgery: MoleSurgery, aux_kind: str, aux_weight: float):
        super().__init__()
        self.llava = llava
        self.backbone: Backbone = backbone_for(llava.config)
        self.context = surgery.context
        self.aux_kind, self.aux_weight = aux_kind, aux_weight

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_sizes=None):
        llava, backbone = self.llava, self.backbone
        embeds = llava.get_input_embeddings()(input_ids)
        if torch.is_grad_enabled():
            # ZeRO-3 reduces a leaf module's gradients (each MoLE MLP is one) from a full backward hook,
            # which fires before the module's own backward when none of its inputs requires a gradient:
            # with nothing trainable below the first MLP (no attention LoRA, frozen projector) it would
            # reduce zeros. Its input carries a gradient anyway whenever the projector trains.
            embeds.requires_grad_(True)
        text_only = pixel_values is None
        if text_only:
            images = backbone.dummy_image(llava.config, embeds.dtype, embeds.device)
        else:
            images = {"pixel_values": pixel_values, "image_sizes": image_sizes}
        extra = {name: images[name] for name in backbone.extra_image_inputs}
        features = backbone.image_features(llava, images["pixel_values"].to(embeds.dtype), **extra)
        features = features.to(embeds.dtype)  # (image tokens, hidden)
        if text_only:
            embeds = embeds + features.sum() * 0.0
        else:
            image_positions = (input_ids == llava.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            if image_positions.sum() != features.numel():
                raise ValueError(
                    f"{int(image_positions.sum()) // embeds.shape[-1]} image tokens in the batch but "
                    f"{features.shape[0]} image features: the data and the model's processor disagree"
                )
            embeds = embeds.masked_scatter(image_positions, features)
        out = llava(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
        aux = aux_loss(self.context.stats(), self.aux_kind).to(out.loss.device)
        return {"loss": out.loss + self.aux_weight * aux, "lm_loss": out.loss.detach(), "aux_loss": aux.detach()}
