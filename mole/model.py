"""Load the frozen LLaVA backbone (partitioned at load time under ZeRO-3) and wrap it for training.

The same ``from_pretrained`` call loads the bundled tiny model and a real ``llava-1.5-7b-hf``
directory; only the path in the config changes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mole.balance import aux_loss
from mole.config import Config
from mole.lm_loss import answer_tokens, lm_loss_sum
from mole.spec import AdapterSpec
from mole.surgery import MoleSurgery, apply_mole

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_backbone(path: str, dtype: torch.dtype, ds_config: dict | None = None) -> LlavaForConditionalGeneration:
    """``from_pretrained``, with ZeRO-3 partitioning *during* the load when ``ds_config`` is stage 3.

    transformers partitions at load time while an ``HfDeepSpeedConfig`` object is alive, so a 7B
    model never sits whole in one rank's memory. The object must outlive ``from_pretrained``.
    """
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    keep_alive = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (weakly referenced by transformers)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
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
    processor = AutoProcessor.from_pretrained(cfg.model.name_or_path)
    return model, surgery, processor


class TrainingModel(nn.Module):
    """One training forward of a MoLE LLaVA: LM loss (:mod:`mole.lm_loss`) + weighted balance loss, on a
    padded or a packed batch (:mod:`mole.data.packing`).

    It runs the steps LLaVA's own forward runs (embed tokens, vision tower + projector, scatter the
    image features into the image-token positions, LLM) but *always* runs the vision tower: a batch
    with no image gets a blank dummy image whose features are multiplied by zero, as LLaVA's training
    code does. Under ZeRO-3 every rank must gather the same parameters in the same order each step;
    transformers would skip the vision tower on a text-only batch and desynchronise the ranks.
    """

    def __init__(self, llava: LlavaForConditionalGeneration, surgery: MoleSurgery, aux_kind: str, aux_weight: float):
        super().__init__()
        self.llava = llava
        self.context = surgery.context
        self.aux_kind, self.aux_weight = aux_kind, aux_weight
        vision = llava.config.vision_config
        self.dummy_image_shape = (1, vision.num_channels, vision.image_size, vision.image_size)

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, position_ids=None, sample_ids=None,
                num_samples=0, loss_normaliser=None):
        """``loss_normaliser``: what the LM loss's sum over this micro-batch's answer tokens is divided by
        (:mod:`mole.lm_loss`); ``None`` takes this batch's own mean (held-out loss). A packed batch
        (:mod:`mole.data.packing`) gives ``position_ids`` restarting per sample and no attention mask,
        and ``sample_ids``/``num_samples`` so that routing counts per sample."""
        if position_ids is not None and attention_mask is not None:
            # transformers finds packed samples from restarting position ids only without a mask (and
            # without a cache): with one, the samples of a row would silently attend to each other
            raise ValueError("a packed batch (position_ids) must come without an attention mask")
        self.context.pack(sample_ids, num_samples)
        embeds = self.embed(input_ids, pixel_values)
        out = self.llava(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        lm_sum = lm_loss_sum(out.logits, labels)
        normaliser = loss_normaliser if loss_normaliser is not None else answer_tokens(labels).clamp(min=1)
        lm = lm_sum / normaliser
        aux = aux_loss(self.context.stats(), self.aux_kind).to(lm.device)
        return {"loss": lm + self.aux_weight * aux, "lm_loss": lm.detach(), "aux_loss": aux.detach()}

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq, hidden) input embeddings with the image features in the image-token positions;
        the vision tower runs even without an image (on the blank one, weighted zero). Held-out
        generation starts from these too, so every rank gathers the same parameters there as well."""
        llava = self.llava
        embeds = llava.get_input_embeddings()(input_ids)
        if torch.is_grad_enabled():
            # ZeRO-3 reduces a leaf module's gradients (each MoLE MLP is one) from a full backward hook,
            # which fires before the module's own backward when none of its inputs requires a gradient:
            # with nothing trainable below the first MLP (no attention LoRA, frozen projector) it would
            # reduce zeros. Its input carries a gradient anyway whenever the projector trains.
            embeds.requires_grad_(True)
        text_only = pixel_values is None
        if text_only:
            pixel_values = torch.zeros(self.dummy_image_shape, dtype=embeds.dtype, device=embeds.device)
        features = llava.model.get_image_features(pixel_values=pixel_values.to(embeds.dtype), return_dict=True)
        features = torch.cat(features.pooler_output, dim=0).to(embeds.dtype)  # (image tokens, hidden)
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
        return embeds
