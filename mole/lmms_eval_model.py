"""A MoLE or plain-LoRA adapter as an lmms-eval model, so any lmms-eval task can score it.

    pip install -e '.[eval]'
    lmms-eval --model mole --model_args base=models/tiny-llava,adapter=runs/tiny/adapter \
        --tasks chartqa --batch_size 8 --output_path eval/lmms

lmms-eval finds the model through the ``lmms_eval.models`` entry-point group (``pyproject.toml``),
whose payload is :func:`manifest`. The model is loaded by :func:`mole.load_model` and answers with
:func:`mole.inference.generate_answers`: greedy, batched, prompts rendered with the base's chat
template and images prepared as the adapter's training prepared them, as ``launch/eval.py`` does. A
task's context becomes one user turn (after the image placeholder when the document has an image);
its ``until`` strings cut the answer. It serves ``generate_until`` requests with at most one image each,
in one process; log-likelihood and multi-round requests fail naming their task.

``--model_args``: ``adapter`` (required), ``base`` (default: the adapter's recorded base),
``device``, ``dtype`` (fp32, bf16, fp16), ``max_new_tokens`` (used when the task sets none),
``image_aspect``, ``image_backend``, ``allow_remote_base``, ``domain`` (an adapter trained with
``mole.routing: domain``: the domain whose expert answers; required there, refused otherwise);
``--batch_size`` is the generation batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from mole.adapter import read_adapter_spec
from mole.adapter_check import resolve_base
from mole.backbones import backbone_for
from mole.cli import chosen_domain
from mole.data.conversation import IMAGE_PLACEHOLDER
from mole.inference import Prompt, PromptEncoder, generate_answers, load_model, load_processor, question_turns

def manifest():
    """The ``lmms_eval.models`` entry point's payload: ``--model mole``. Called while lmms-eval builds its
    model registry, so importing this module does not start that (it would import this module again)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mole", simple_class_path="mole.lmms_eval_model.MoleLMM")


def _flag(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


class MoleLMM(lmms):
    """``--model mole``: an adapter directory on its base LLaVA, answering greedily in batches."""

    is_simple = True

    def __init__(self, adapter: str, base: str | None = None, device: str | None = None, dtype: str = "fp32",
                 batch_size: int | str = 8, max_new_tokens: int | str = 32, image_aspect: str | None = None,
                 image_backend: str | None = None, allow_remote_base: bool | str = False, domain: str | None = None,
                 **unused) -> None:
        super().__init__()
        unknown = sorted(set(unused) - {"max_batch_size"})  # lmms-eval hands every model max_batch_size
        if unknown:
            raise ValueError(f"--model mole: unknown model_args {', '.join(unknown)}; see mole.lmms_eval_model")
        if not str(batch_size).isdigit() or not str(max_new_tokens).isdigit() or int(batch_size) < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"--model mole: --batch_size and max_new_tokens must be whole numbers >= 1 (no 'auto'), "
                             f"got {batch_size!r} and {max_new_tokens!r}")
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        spec = read_adapter_spec(adapter)
        self.domain = chosen_domain(spec, domain)
        allow_remote = _flag(allow_remote_base)
        base = resolve_base(base or spec.base_model, "base" if base else "the adapter's base_model", allow_remote)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(base, adapter, device=device, dtype=dtype, allow_remote=allow_remote)
        self.processor = load_processor(base, allow_remote, adapter_dir=adapter)
        image = spec.image.overridden(image_aspect, image_backend)
        self.encoder = PromptEncoder(self.processor, image.aspect, image.backend,
                                     backbone=backbone_for(self.model.config))

    # ------------------------------------------------------------------ what lmms-eval asks

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; requests with the same generation settings share batches."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settings = [self._settings(request) for request in requests]
        for index, (max_new_tokens, until) in enumerate(settings):
            groups.setdefault((max_new_tokens, tuple(until)), []).append(index)
        for (max_new_tokens, until), indices in groups.items():
            prompts = [self._prompt(requests[i]) for i in indices]
            generated = generate_answers(self.model, self.processor, prompts, max_new_tokens, self.batch_size,
                                         encoder=self.encoder, domain=self.domain)
            for index, answer in zip(indices, generated):
                answers[index] = cut_at(answer, until)
                self.cache_hook.add_partial("generate_until", requests[index].args, answers[index])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(self._unserved("loglikelihood", requests))

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(self._unserved("generate_until_multi_round", requests))

    # ------------------------------------------------------------------ helpers

    def _settings(self, request: Instance) -> tuple[int, list[str]]:
        """(max_new_tokens, until strings) of a request; sampling is refused, since answers are greedy."""
        kwargs = dict(request.args[1] or {})
        if _flag(kwargs.get("do_sample", False)) or float(kwargs.get("temperature", 0) or 0) > 0:
            raise ValueError(f"task {request.task_name!r} asks for sampling (do_sample/temperature); "
                             "--model mole generates greedily: set do_sample: false, temperature: 0")
        until = kwargs.get("until", [])
        until = [until] if isinstance(until, str) else list(until)
        return int(kwargs.get("max_new_tokens", self.max_new_tokens)), until

    def _prompt(self, request: Instance) -> Prompt:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = self._visuals(doc_to_visual, task, split, doc_id)
        if len(visuals) > 1 or any(not isinstance(v, Image.Image) for v in visuals):
            raise ValueError(f"task {task!r}: document {doc_id} has {len(visuals)} visuals "
                             f"({', '.join(type(v).__name__ for v in visuals)}); --model mole answers on at most one image")
        image = visuals[0] if visuals else None
        question = context.replace(IMAGE_PLACEHOLDER, "").strip()
        return Prompt(question_turns(question, image is not None), image)

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        return [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]

    @staticmethod
    def _unserved(kind: str, requests: list[Instance]) -> str:
        tasks = sorted({request.task_name for request in requests})
        return (f"--model mole serves generate_until requests only; task {', '.join(map(repr, tasks))} asks for "
                f"{kind} (its output_type)")


def cut_at(answer: str, until: tuple[str, ...] | list[str]) -> str:
    """``answer`` up to the first of the ``until`` strings (empty strings ignored), stripped."""
    cut = min((answer.find(stop) for stop in until if stop and stop in answer), default=len(answer))
    return answer[:cut].strip()
