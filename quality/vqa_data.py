"""Generated visual questions: pictures of coloured shapes (or one letter) drawn with Pillow, a
question about each, and its one-word answer.

Invariant: `example(seed)` is a pure function of the seed (same picture, question and answer on
every machine), and every question has exactly one correct answer in its picture: a question
names a shape or colour only when exactly one object has it.
"""

from __future__ import annotations

import dataclasses
import io
import random

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 48
GRID = 3                      # objects sit in a 3 x 3 grid of 16-pixel cells
CELL = IMAGE_SIZE // GRID
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
COLUMNS = ("left", "middle", "right")
LETTERS = "ABEHKMRTXZ"        # distinct at 48 px
KINDS = ("color", "shape", "count", "where", "letter")
BACKGROUNDS = ((250, 250, 250), (235, 235, 220), (30, 30, 30), (200, 200, 210))
TRAIN_SEED_BASE = 1_000_000   # training examples use seeds from here on; held-out ones are below it


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cell: tuple[int, int]   # (column, row)


@dataclasses.dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    kind: str

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def example(seed: int, kind: str | None = None) -> Example:
    """The example for `seed` (its kind drawn from the seed unless given)."""
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    if kind == "letter":
        return _letter(rng)
    while True:  # redraw until the scene has an object the question can name uniquely
        shapes = _scene(rng)
        made = _question(kind, shapes, rng)
        if made is not None:
            return Example(_draw(shapes, rng), made[0], made[1], kind)


def _scene(rng: random.Random) -> list[Shape]:
    cells = rng.sample([(c, r) for c in range(GRID) for r in range(GRID)], rng.randint(1, 3))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), cell) for cell in cells]


def _unique(shapes: list[Shape], attribute: str) -> list[Shape]:
    values = [getattr(s, attribute) for s in shapes]
    return [s for s in shapes if values.count(getattr(s, attribute)) == 1]


def _question(kind: str, shapes: list[Shape], rng: random.Random) -> tuple[str, str] | None:
    if kind == "count":
        return "How many shapes are there?", str(len(shapes))
    by_kind, by_color = _unique(shapes, "kind"), _unique(shapes, "color")
    if kind == "color" and by_kind:
        target = rng.choice(by_kind)
        return f"What color is the {target.kind}?", target.color
    if kind == "shape" and by_color:
        target = rng.choice(by_color)
        return f"What shape is {target.color}?", target.kind
    if kind == "where" and by_kind:
        target = rng.choice(by_kind)
        return f"Where is the {target.kind}?", COLUMNS[target.cell[0]]
    return None


def _draw(shapes: list[Shape], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        size = rng.randint(9, 13)
        x0 = shape.cell[0] * CELL + rng.randint(0, CELL - size)
        y0 = shape.cell[1] * CELL + rng.randint(0, CELL - size)
        box, fill = (x0, y0, x0 + size, y0 + size), COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def _letter(rng: random.Random) -> Example:
    letter = rng.choice(LETTERS)
    background = rng.choice(BACKGROUNDS)
    ink = (20, 20, 20) if sum(background) > 300 else (240, 240, 240)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    font = ImageFont.load_default(size=rng.randint(26, 34))
    left, top, right, bottom = font.getbbox(letter)
    x = rng.randint(0, max(0, IMAGE_SIZE - (right - left))) - left
    y = rng.randint(0, max(0, IMAGE_SIZE - (bottom - top))) - top
    ImageDraw.Draw(image).text((x, y), letter, fill=ink, font=font)
    return Example(image, "What letter is shown?", letter, "letter")
