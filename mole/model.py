"""Load the frozen backbone (partitioned at load time under ZeRO-3) and wrap it for training.

The family is read from the model directory's ``config.json`` (:func:`mole.backbones.backbone_for`);
the same ``from_pretrained`` call loads the bundled tiny models and a real ``llava-1.5-7b-hf`` or
``llava-v1.6-vicuna-7b-hf`` directory; only the path in the config changes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import AutoConfig

from mole.backbones import Backbone, backbone_for
from mole.balance import aux_loss
from mole.config import Config, ConfigError
from mole.lm_loss import answer_tokens, lm_loss_sum
from mole.spec import AdapterSpec
from mole.surgery import MoleSurgery, apply_mole

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_implementation(choice: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """What ``from_pretrained`` gets for ``model.attn_implementation`` when the model runs in ``dtype``:
    ``auto`` is flash_attention_2 where transformers finds flash-attn and a CUDA device and the model is
    16-bit (flash-attn computes in fp16/bf16 only; an fp32 model would fail at its first forward), else
    sdpa; an explicit flash_attention_2 that cannot run is a one-line ``ConfigError`` (transformers' own
    error comes after the model's config is read, or at the first forward, and says nothing of the key)."""
    from transformers.utils import is_flash_attn_2_available

    half = dtype in (torch.float16, torch.bfloat16)
    if choice == "auto":
        return "flash_attention_2" if half and is_flash_attn_2_available() else "sdpa"
    if choice == "flash_attention_2" and not is_flash_attn_2_available():
        raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package (>= 2.3.3) and a "
                          "CUDA GPU; use auto, sdpa or eager", "model.attn_implementation")
    if choice == "flash_attention_2" and not half:
        raise ConfigError(f"model.attn_implementation: flash_attention_2 computes in fp16 or bf16 only, and the model "
                          f"runs in {dtype} (train.precision); use auto, sdpa or eager", "model.attn_implementation")
    return choice


def load_backbone(path: str, dtype: torch.dtype, ds_config: dict | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """The family's stock class ``from_pretrained`` with ``attn_implementation`` (a resolved name, see
    :func:`attention_implementation`), with ZeRO-3 partitioning *during* the load when ``ds_config``
    is stage 3. A family mole does not describe is a one-line ``UnsupportedBackbone``.

    transformers partitions at load time while an ``HfDeepSpeedConfig`` object is alive, so a 7B
    model never sits whole in one rank's memory. The object must outlive ``from_pretrained``.
    """
    backbone = backbone_for(AutoConfig.from_pretrained(path))
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    keep_alive = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (weakly referenced by transformers)
    model = backbone.model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    del keep_alive
    return model


def run_spec(cfg: Config, base_config):
    """``(spec, processor)``: the adapter ``cfg`` trains on the base of ``base_config``, and the processor
    its data go through. The spec records what that processor prepares images with (its backend, the
    family's pixel or tile limits: the run's where it sets them, else the model directory's), so the
    adapter carries them to inference whatever directory it later runs on."""
    spec = AdapterSpec.from_config(cfg, base_config)
    backbone = backbone_for(base_config)
    processor = backbone.load_processor(cfg.model.name_or_path, local_files_only=False, image=spec.image)
    return dataclasses.replace(spec, image=backbone.prepared_image(spec.image, processor)), processor


def build_mole_model(cfg: Config, dtype: torch.dtype, ds_config: dict | None = None):
    """Backbone + MoLE surgery from the config; returns (model, surgery, processor).

    The model's config gets the image limits the model itself reads (AnyRes's grid pinpoints) from
    the processor's (:func:`run_spec`). The new modules are initialised from ``train.seed`` right
    before surgery, so they are the same on every rank and under every ZeRO stage (loading consumes
    random numbers differently).
    """
    model = load_backbone(cfg.model.name_or_path, dtype, ds_config, attention_implementation(cfg.model.attn_implementation, dtype))
    model.config.use_cache = False
    spec, processor = run_spec(cfg, model.config)
    backbone_for(model.config).configure(model.config, spec.image)
    torch.manual_seed(cfg.train.seed)
    surgery = apply_mole(model, spec)
    for module in model.modules():  # new modules are created in fp32; match the backbone
        for param in module.parameters(recurse=False):
            if param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model, surgery, processor


class TrainingModel(nn.Module):
    """One training forward of a MoLE backbone: LM loss (:mod:`mole.lm_loss`) + weighted balance loss, on a
    padded or a packed batch (:mod:`mole.data.packing`).

    The family's :meth:`~mole.backbones.base.Backbone.forward` runs the stock model on the batch as the
    family's own processing would feed it, but *always* runs the vision path: a batch with no image
    gets the family's minimal dummy image whose features join the graph multiplied by zero, as LLaVA's
    training code does. Under ZeRO-3 every rank must gather the same parameters in the same order each
    step; transformers would skip the vision tower on a text-only batch and desynchronise the ranks.
    ``image_sizes`` is each image's size input as the family's model takes it (LLaVA-NeXT's
    ``image_sizes``, Qwen-VL's ``image_grid_thw``), or ``None``.
    """

    def __init__(self, llava: nn.Module, surgery: MoleSurgery, aux_kind: str, aux_weight: float):
        super().__init__()
        self.llava = llava
        self.backbone: Backbone = backbone_for(llava.config)
        self.context = surgery.context
        self.aux_kind, self.aux_weight = aux_kind, aux_weight
        spec = getattr(llava, "mole_spec", None)
        self.by_domain = spec is not None and spec.routing == "domain"
        """Routing ``domain``: the batch's ``domain`` picks the experts, and there is no router to balance
        (the aux loss is zero)."""

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_sizes=None, position_ids=None,
                sample_ids=None, num_samples=0, loss_normaliser=None, domain=None):
        """``loss_normaliser``: what the LM loss's sum over this micro-batch's answer tokens is divided by
        (:mod:`mole.lm_loss`); ``None`` takes this batch's own mean (held-out loss). A packed batch
        (:mod:`mole.data.packing`) gives ``position_ids`` (batch, seq) restarting per sample and no
        attention mask, and ``sample_ids``/``num_samples`` so that routing counts per sample. ``domain``
        (samples,) is each sample's domain index, which routing ``domain`` sends its tokens by."""
        if position_ids is not None and attention_mask is not None:
            # transformers finds packed samples from restarting position ids only without a mask (and
            # without a cache): with one, the samples of a row would silently attend to each other
            raise ValueError("a packed batch (position_ids) must come without an attention mask")
        self.context.pack(sample_ids, num_samples)
        if self.by_domain:
            self.context.route(domain)
        logits = self.backbone.forward(self.llava, input_ids, attention_mask, self.images(pixel_values, image_sizes),
                                       position_ids).logits
        lm_sum = lm_loss_sum(logits, labels)
        normaliser = loss_normaliser if loss_normaliser is not None else answer_tokens(labels).clamp(min=1)
        lm = lm_sum / normaliser
        aux = torch.zeros(()) if self.by_domain else aux_loss(self.context.stats(), self.aux_kind)
        aux = aux.to(lm.device)
        return {"loss": lm + self.aux_weight * aux, "lm_loss": lm.detach(), "aux_loss": aux.detach()}

    def prefill_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> dict:
        """What ``generate`` starts from so that the vision path runs even without an image
        (:meth:`~mole.backbones.base.Backbone.prefill_inputs`: the embeddings, or for an M-RoPE family the
        token ids with the encoded images). Held-out generation starts from these, so every rank gathers
        the same parameters there as well."""
        return self.backbone.prefill_inputs(self.llava, input_ids, self.images(pixel_values, image_sizes))

    @staticmethod
    def images(pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None):
        return None if pixel_values is None else {"pixel_values": pixel_values, "image_sizes": image_sizes}
