"""Procedural shape scenes: the tiny default's pretraining corpus, drawn on the fly, never downloaded.

A scene is one filled circle, rectangle or triangle in one of eight colours on a light background,
64 x 64 like easy-VQA's images (colours and size range measured on easy-VQA's training images).
The questions about it use their own wording, not easy-VQA's: pretraining teaches the base to see
colours and shapes and to answer plain questions about them; the fine-tuning drop then teaches it
easy-VQA's phrasings (negations included), which is the adapter's job.

Sample `i` of stream `seed` is a pure function of both, so a run is reproducible, a resumed run
sees the same batches, and data-loader workers need no coordination.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOR_VALUES = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
SHAPES = ("circle", "rectangle", "triangle")
SUPERSAMPLE = 4  # drawn at 4x and reduced, so edges are anti-aliased like the photos a camera would take


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    image: Image.Image


def draw_scene(rng: random.Random, side: int = 64, min_size: int = 8, max_size: int = 36) -> Scene:
    """One shape of random colour, size and position, fully inside a `side` x `side` image."""
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLOR_VALUES))
    background = tuple(rng.randint(215, 255) for _ in range(3))  # pale tints, as in easy-VQA
    scale = SUPERSAMPLE
    canvas = Image.new("RGB", (side * scale, side * scale), background)
    draw = ImageDraw.Draw(canvas)
    width = rng.uniform(min_size, max_size)
    # circles and triangles keep their proportions; rectangles take any aspect within the size range
    height = rng.uniform(min_size, max_size) if shape == "rectangle" else (width * 0.87 if shape == "triangle" else width)
    left, top = rng.uniform(0, side - width), rng.uniform(0, side - height)
    box = [v * scale for v in (left, top, left + width, top + height)]
    fill = COLOR_VALUES[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return Scene(shape, color, canvas.resize((side, side), Image.Resampling.BOX))


# Yes/no wordings as (asserting, negated) pairs. The value named and the negation sit at different
# places from one wording to the next, so the base learns to find the named value wherever it is
# (byte-level tokens: it must recognise the word, not read a fixed position) and to compare it with
# the picture. With one wording per kind ("is a circle drawn?") the base learned the position, and
# the adapter then had to relearn the comparison for easy-VQA's wordings: the plateau some seeds
# never left (benchmarks/TINY_DEFAULT.md).
SHAPE_YES_NO = (
    ("is a {} drawn?", "is no {} drawn?"),
    ("can you see a {} here?", "can you see no {} here?"),
    ("does this picture show a {}?", "does this picture not show a {}?"),
    ("is the object a {}?", "is the object not a {}?"),
    ("would you call the object a {}?", "would you not call the object a {}?"),
    ("looking closely, do you find a {} somewhere?", "looking closely, do you find no {} anywhere?"),
)
COLOR_YES_NO = (
    ("is the object {}?", "is the object not {}?"),
    ("is something {} drawn?", "is nothing {} drawn?"),
    ("does this picture show a {} object?", "does this picture not show a {} object?"),
    ("is the colour of the object {}?", "is the colour of the object not {}?"),
    ("can you see a {} thing here?", "can you see no {} thing here?"),
)


def scene_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """A question about the scene and its one-word (or two-word, for a description) answer."""
    kind = rng.random()
    if kind < 0.1:
        return rng.choice(("describe the picture.", "what is drawn here?")), f"{scene.color} {scene.shape}"
    if kind < 0.3:
        return rng.choice(("which colour is the object?", "name the colour of the object.", f"colour of the {scene.shape}?")), scene.color
    if kind < 0.5:
        return rng.choice(("which shape is drawn?", "name the shape.", f"which shape is the {scene.color} object?", "tell me the shape you see.")), scene.shape
    # yes/no, half of them true, half negated: the negation flips the answer
    about_color = rng.random() < 0.5
    truth = scene.color if about_color else scene.shape
    pool = sorted(COLOR_VALUES) if about_color else list(SHAPES)
    named = truth if rng.random() < 0.5 else rng.choice([value for value in pool if value != truth])
    negated = rng.random() < 0.5
    wording = rng.choice(COLOR_YES_NO if about_color else SHAPE_YES_NO)[negated]
    return wording.format(named), "yes" if (named == truth) != negated else "no"


def scene_sample(seed: int, index: int) -> dict:
    """Sample `index` of stream `seed`: {"question", "answer", "image", "shape", "color"}."""
    rng = random.Random(int.from_bytes(hashlib.sha256(f"shapes:{seed}:{index}".encode()).digest()[:8], "big"))
    scene = draw_scene(rng)
    question, answer = scene_question(rng, scene)
    return {"question": question, "answer": answer, "image": scene.image, "shape": scene.shape, "color": scene.color}
