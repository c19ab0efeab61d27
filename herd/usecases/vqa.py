"""`herd vqa IMAGE... -q QUESTION`: ask about one to five images.

The images go into one user turn ahead of the question, each tiled exactly as the chat format
tiles it (herd/image.py: the best canvas of up to max_num_tiles tiles, plus a global tile when
there is more than one; herd/chat.py: <|image_start|> … <|image_end|> with one <|patch|> per
vision token). Llama 4 was trained with up to 5 images per turn (model card), so 5 is the limit.

    herd vqa digit.png -q "Which digit is this?" --model runs/tiny
    herd vqa a.png b.png c.png -q "Which of these shows a 7?" --model runs/sft --json
"""

from __future__ import annotations

import json
from pathlib import Path

from herd.usecases.common import Assistant, add_model_args, assistant_from_args

MAX_IMAGES = 5


def check_images(paths: list[str]) -> list:
    """Each path → a decoded RGB image; ValueError naming the first bad one."""
    from herd.image import load_image

    if not 1 <= len(paths) <= MAX_IMAGES:
        raise ValueError(f"give 1 to {MAX_IMAGES} images, got {len(paths)}")
    images = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            images.append(load_image(p))
        except ValueError as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
    return images


def vqa(assistant: Assistant, images: list, question: str) -> str:
    if assistant.model.config.vision is None:
        raise ValueError("this model is text-only (its config has no vision_config); vqa needs a vision model")
    if not question.strip():
        raise ValueError("the question is empty")
    return assistant.ask(question, images)


def _cmd(args) -> int:
    images = check_images(args.images)
    a = assistant_from_args(args)
    answer = vqa(a, images, args.question)
    print(json.dumps({"answer": answer, "images": args.images}) if args.json else answer)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("vqa", help="answer a question about 1-5 images",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("images", nargs="+", metavar="IMAGE", help=f"1 to {MAX_IMAGES} image files")
    p.add_argument("-q", "--question", required=True)
    add_model_args(p)
    p.set_defaults(func=_cmd)
