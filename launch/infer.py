"""Answer questions about images with a trained adapter.

    python launch/infer.py --adapter runs/tiny/adapter --image cat.jpg --prompt "What color is the cat?"
    python launch/infer.py --adapter runs/tiny/adapter --jsonl questions.jsonl --out answers.jsonl

Batch mode reads one ``{"image": path, "prompt": text}`` object per line (``image`` may be omitted
or null for a text-only question; relative paths resolve against the JSONL file's directory) and
writes the same objects with an ``"answer"`` added, in order. Other keys (an id, say) are carried
through unchanged, except that a line without ``image`` whose other key holds an image file name
(``"img": "cat.jpg"``) is refused: its question would otherwise be answered without its image.
An adapter trained with ``mole.routing: domain`` needs ``--domain NAME``: that domain's expert answers.
"""

import argparse
import json
import os
import sys

from mole.cli import add_adapter_args, add_preparation_args


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_adapter_args(parser)
    parser.add_argument("--image", help="image file for a single question")
    parser.add_argument("--prompt", help="the question")
    parser.add_argument("--jsonl", help="batch mode: a JSONL file of {image, prompt}")
    parser.add_argument("--out", help="batch mode: where to write the answers (JSONL; default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    add_preparation_args(parser, device_help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    for option in ("max_new_tokens", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if (args.jsonl is None) == (args.prompt is None):
        parser.error("give either --prompt (with an optional --image) or --jsonl")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a directory; give the JSONL file to write")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out!r}: its folder does not exist")
    return args


def misspelt_image_key(request: dict) -> str | None:
    """The key of a request without ``image`` that holds an image file name (``"img": "cat.jpg"``):
    judged by the value, so that metadata keys (``page``, ``image_id``) pass whatever their names."""
    from mole.data.images import IMAGE_EXTENSIONS, IMAGE_FORMATS

    if "image" in request:
        return None
    suffixes = tuple(f".{name}" for name in {*IMAGE_EXTENSIONS, *(fmt.lower() for fmt in IMAGE_FORMATS)})
    return next((str(key) for key, value in request.items()
                 if key != "prompt" and isinstance(value, str) and value.lower().endswith(suffixes)), None)


def read_requests(path: str) -> list[tuple[str, dict]]:
    """Each line's request with where it came from (``path:line``), for errors that name it."""
    requests = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from None
            if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string 'prompt'")
            lookalike = misspelt_image_key(request)
            if lookalike is not None:
                raise ValueError(f"{path}:{number}: key {lookalike!r} holds an image file; the image goes under 'image'")
            requests.append((f"{path}:{number}", request))
    return requests


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: this machine has no CUDA device", file=sys.stderr)
        return 2
    from mole.adapter import AdapterError, read_adapter_spec
    from mole.adapter_check import resolve_base
    from mole.cli import chosen_domain
    from mole.data.conversation import refuse_special_tokens
    from mole.data.errors import BadSample
    from mole.data.images import IMAGE_FORMATS
    from mole.inference import Prompt, generate_answers, load_model, load_processor, question_turns

    try:
        if args.jsonl:
            sourced = read_requests(args.jsonl)
            root = os.path.dirname(os.path.abspath(args.jsonl))
        else:
            sourced, root = [("--image", {"image": args.image, "prompt": args.prompt})], os.getcwd()
        requests, prompts = [request for _, request in sourced], []
        for where, request in sourced:
            try:  # the formats training decodes, no others (Pillow's EPS plugin runs Ghostscript)
                image = (Image.open(os.path.join(root, request["image"]), formats=IMAGE_FORMATS).convert("RGB")
                         if request.get("image") else None)
            except (OSError, TypeError, Image.DecompressionBombError) as err:
                raise ValueError(f"{where}: image {request['image']!r}: {err}") from None
            prompts.append(Prompt(question_turns(request["prompt"], image is not None), image))
        spec = None if args.base else read_adapter_spec(args.adapter)
        named_by = "--base" if args.base else f"base_model in {os.path.join(args.adapter, 'mole_config.json')}"
        base = resolve_base(args.base or spec.base_model, named_by, args.allow_remote_base)
        # with --base, the prompts are checked against its tokenizer before the adapter is read
        processor = load_processor(base, adapter_dir=None if spec is None else args.adapter)
        for (where, _), prompt in zip(sourced, prompts):
            try:
                refuse_special_tokens(prompt.turns, processor.tokenizer)
            except BadSample as err:  # training skips such samples: the model never saw one
                label = where if args.jsonl else "--prompt"
                raise ValueError(f"{label}: the prompt {err.detail.removeprefix('turn 0 ')}") from None
        if spec is None:
            spec = read_adapter_spec(args.adapter)
            processor = load_processor(base, adapter_dir=args.adapter)  # images as the adapter's training prepared them
        domain = chosen_domain(spec, args.domain)
        image = spec.image.overridden(args.image_aspect, args.image_backend)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(base, args.adapter, device=device, dtype=args.dtype)
    except (AdapterError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    answers = generate_answers(model, processor, prompts, args.max_new_tokens, args.batch_size,
                               image.aspect, image_backend=image.backend, domain=domain)
    if not args.jsonl:
        print(answers[0])
        return 0
    lines = [json.dumps({**request, "answer": answer}) for request, answer in zip(requests, answers)]
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
