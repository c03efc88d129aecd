"""Procedural "small shapes" VQA data for the default model.

Each scene is a 336x336 image with 4-10 shapes of three sizes (the small ones cover about 1.5 patches of the
24x24 grid) on a textured background. Questions ask for counts, fine relative positions, sizes, shapes and
existence; answers are one word or number. Everything is a pure function of ``(seed, split, index)``, so the
held-out split is regenerated on demand instead of being stored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlmzip.config import check_int
from vlmzip.prompts import build_prompt

IMAGE_SIZE = 336
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "medium", "large")
# Diameter range (px) per size class; gaps between classes keep the size answer unambiguous.
SIZE_RANGES = {"small": (20, 25), "medium": (36, 44), "large": (58, 68)}
MIN_OBJECTS, MAX_OBJECTS = 4, 10
QUESTION_TYPES = ("count", "position", "size", "shape", "exist")
# Extreme/relative position questions are only asked when the centres differ by at least this much.
POSITION_MARGIN = 16
POSITION_ANSWERS = ("left", "right", "above", "below")
_SPLIT_IDS = {"train": 0, "test": 1, "val": 2, "sample": 3}
DEFAULT_TEST_IMAGES = 250


@dataclass(frozen=True)
class SceneObject:
    shape: str
    size: str
    diameter: float
    x: float
    y: float
    color: tuple[int, int, int]
    angle: float


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    objects: tuple[SceneObject, ...]
    seed: tuple[int, ...]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    type: str


# --------------------------------------------------------------------------- rendering


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted textured background (float32 HxWx3 in [0, 1])."""
    base_v = rng.uniform(0.3, 0.8)
    c1 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.35), base_v)
    c2 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.35), np.clip(base_v + rng.uniform(-0.2, 0.2), 0.2, 0.9))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(5)
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    elif kind == 1:  # stripes
        a = rng.uniform(0, np.pi)
        period = rng.uniform(0.03, 0.12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period)
        t = t * rng.uniform(0.3, 0.7)
    elif kind == 2:  # checkerboard
        cell = rng.integers(12, 48)
        t = (((xx * size) // cell + (yy * size) // cell) % 2) * rng.uniform(0.2, 0.5)
    elif kind == 3:  # smooth blobs
        coarse = rng.uniform(size=(6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        t = t.astype(np.float32) / 255.0
    else:  # speckles
        t = (rng.uniform(size=(size, size)) < 0.08).astype(np.float32) * rng.uniform(0.3, 0.6)
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    img = img + rng.normal(0, rng.uniform(0.0, 0.04), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _polygon(obj: SceneObject, scale: float) -> list[tuple[float, float]] | None:
    r = obj.diameter / 2 * scale
    cx, cy = obj.x * scale, obj.y * scale
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(px * r * 0.82, py * r * 0.82) for px, py in pts]
    elif obj.shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        pts = [(px, py + r * 0.15) for px, py in pts]
    elif obj.shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = math.radians(-90 + 36 * k)
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif obj.shape == "cross":
        w = r * 0.36
        pts = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(obj.shape)
    ca, sa = math.cos(obj.angle), math.sin(obj.angle)
    return [(cx + px * ca - py * sa, cy + px * sa + py * ca) for px, py in pts]


def render_scene(objects: Sequence[SceneObject], background: np.ndarray) -> Image.Image:
    """Draw the objects at 2x and downsample, so that small shapes keep clean, anti-aliased edges."""
    scale = 2
    size = background.shape[0]
    canvas = Image.fromarray((background * 255).astype(np.uint8)).resize((size * scale, size * scale))
    draw = ImageDraw.Draw(canvas)
    mean_luma = float(background.mean())
    outline = (20, 20, 20) if mean_luma > 0.5 else (235, 235, 235)
    for obj in objects:
        poly = _polygon(obj, scale)
        width = 2 * scale
        if poly is None:
            r = obj.diameter / 2 * scale
            box = (obj.x * scale - r, obj.y * scale - r, obj.x * scale + r, obj.y * scale + r)
            draw.ellipse(box, fill=obj.color, outline=outline, width=width)
        else:
            draw.polygon(poly, fill=obj.color, outline=outline, width=width)
    return canvas.resize((size, size), Image.LANCZOS)


def scene_objects(seed: int, split: str, index: int) -> tuple[SceneObject, ...]:
    """The objects of scene ``index`` of ``split``, without rendering (cheap)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, 0])
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < n and attempts < 2000:
        attempts += 1
        size = SIZES[int(rng.integers(3))]
        lo, hi = SIZE_RANGES[size]
        d = float(rng.uniform(lo, hi))
        r = d / 2
        x, y = (float(v) for v in rng.uniform(r + 4, IMAGE_SIZE - r - 4, size=2))
        # Keep a gap between shapes so that every object is countable.
        if any(math.hypot(x - o.x, y - o.y) < r + o.diameter / 2 + 6 for o in objects):
            continue
        hue, sat, val = rng.uniform(), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0)
        color = tuple(int(c * 255) for c in _hsv_to_rgb(hue, sat, val))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        angle = float(rng.uniform(-0.35, 0.35))
        objects.append(SceneObject(shape, size, d, x, y, color, angle))
    return tuple(objects)


def generate_scene(seed: int, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split`` (train, test, val or sample): a pure function of its arguments."""
    objects = scene_objects(seed, split, index)
    background = _background(np.random.default_rng([seed, _SPLIT_IDS[split], index, 1]), IMAGE_SIZE)
    image = render_scene(objects, background)
    return Scene(image=image, objects=objects, seed=(seed, _SPLIT_IDS[split], index))


# --------------------------------------------------------------------------- questions


def _plural(shape: str) -> str:
    return shape + ("es" if shape == "cross" else "s")


def _references(objects: Sequence[SceneObject]) -> list[tuple[str, SceneObject, bool]]:
    """Unambiguous names for objects: ``(phrase, object, uses_size)``."""
    refs = []
    for o in objects:
        if sum(p.shape == o.shape for p in objects) == 1:
            refs.append((f"the {o.shape}", o, False))
        elif sum(p.shape == o.shape and p.size == o.size for p in objects) == 1:
            refs.append((f"the {o.size} {o.shape}", o, True))
    return refs


# Sort keys that put the extreme object first ("the leftmost object" ...).
_EXTREMES = {
    "leftmost": lambda o: o.x,
    "rightmost": lambda o: -o.x,
    "topmost": lambda o: o.y,
    "bottommost": lambda o: -o.y,
}


def question_pool(objects: Sequence[SceneObject]) -> dict[str, list[Question]]:
    """Every question the scene supports, grouped by type."""
    pool: dict[str, list[Question]] = {t: [] for t in QUESTION_TYPES}
    # count
    pool["count"].append(Question("how many objects are there?", str(len(objects)), "count"))
    for s in SHAPES:
        k = sum(o.shape == s for o in objects)
        pool["count"].append(Question(f"how many {_plural(s)} are there?", str(k), "count"))
    for z in SIZES:
        k = sum(o.size == z for o in objects)
        pool["count"].append(Question(f"how many {z} objects are there?", str(k), "count"))
    # exist
    for s in SHAPES:
        k = any(o.shape == s for o in objects)
        pool["exist"].append(Question(f"is there a {s}?", "yes" if k else "no", "exist"))
        for z in SIZES:
            k = any(o.shape == s and o.size == z for o in objects)
            pool["exist"].append(Question(f"is there a {z} {s}?", "yes" if k else "no", "exist"))
    # shape
    for word, key in _EXTREMES.items():
        ordered = sorted(objects, key=key)
        if abs(key(ordered[0]) - key(ordered[1])) >= POSITION_MARGIN:
            pool["shape"].append(Question(f"what shape is the {word} object?", ordered[0].shape, "shape"))
    for z in SIZES:
        of_size = [o for o in objects if o.size == z]
        if len(of_size) == 1:
            pool["shape"].append(Question(f"what shape is the {z} object?", of_size[0].shape, "shape"))
    refs = _references(objects)
    # size
    for phrase, o, uses_size in refs:
        if not uses_size:
            pool["size"].append(Question(f"what size is {phrase}?", o.size, "size"))
    # position
    for pa, a, _ in refs:
        for pb, b, _ in refs:
            if a is b:
                continue
            # The answer names the relation; both words are in every question, so neither gives it away.
            if abs(a.x - b.x) >= POSITION_MARGIN:
                answer = "left" if a.x < b.x else "right"
                pool["position"].append(Question(f"is {pa} left or right of {pb}?", answer, "position"))
            if abs(a.y - b.y) >= POSITION_MARGIN:
                answer = "above" if a.y < b.y else "below"
                pool["position"].append(Question(f"is {pa} above or below {pb}?", answer, "position"))
    return pool


def _balanced_choice(rng: np.random.Generator, questions: list[Question]) -> Question:
    """Pick uniformly over answers first, then over questions with that answer (no yes/no or '0' bias)."""
    answers = sorted({q.answer for q in questions})
    answer = answers[int(rng.integers(len(answers)))]
    matching = [q for q in questions if q.answer == answer]
    return matching[int(rng.integers(len(matching)))]


def sample_questions(
    objects: Sequence[SceneObject],
    rng: np.random.Generator,
    per_type: int | Mapping[str, int] = 1,
) -> list[Question]:
    """Up to ``per_type`` distinct questions of each type, answer-balanced.

    ``per_type`` is one number for every type or a number per type (types left out get none).
    """
    counts = per_type if isinstance(per_type, Mapping) else dict.fromkeys(QUESTION_TYPES, per_type)
    unknown = set(counts) - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"per_type names unknown question types {sorted(unknown)}; known: {list(QUESTION_TYPES)}")
    counts = {qtype: check_int(f"per_type[{qtype!r}]", n, 0) for qtype, n in counts.items()}
    pool = question_pool(objects)
    chosen: list[Question] = []
    for qtype in QUESTION_TYPES:
        candidates = list(pool[qtype])
        for _ in range(counts.get(qtype, 0)):
            if not candidates:
                break
            q = _balanced_choice(rng, candidates)
            candidates.remove(q)
            chosen.append(q)
    return chosen


def patch_objects(objects: Sequence[SceneObject], patch: int = 14) -> np.ndarray:
    """Per-patch index into ``objects`` in raster order (-1 background), for training only.

    A patch belongs to the nearest object whose disc covers the patch centre; small objects always claim
    the patch holding their centre.
    """
    grid = IMAGE_SIZE // patch
    centres = (np.arange(grid) + 0.5) * patch
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    owner = np.full((grid, grid), -1, dtype=np.int64)
    best = np.full((grid, grid), np.inf)
    for k, o in enumerate(objects):
        dist = np.hypot(cx - o.x, cy - o.y)
        hit = (dist <= max(o.diameter / 2, patch * 0.75)) & (dist < best)
        owner[hit] = k
        best[hit] = dist[hit]
    return owner.reshape(-1)


def object_classes(objects: Sequence[SceneObject]) -> np.ndarray:
    """Class of background (0) then of each object (``1 + 3 * shape + size``): index it with
    ``patch_objects(...) + 1``."""
    return np.array([0] + [1 + 3 * SHAPES.index(o.shape) + SIZES.index(o.size) for o in objects], dtype=np.int64)


def patch_labels(objects: Sequence[SceneObject], patch: int = 14) -> np.ndarray:
    """Per-patch class in raster order (0 background, else ``1 + 3 * shape + size``), for training only;
    patches belong to objects as in ``patch_objects``."""
    return object_classes(objects)[patch_objects(objects, patch) + 1]


NUM_PATCH_CLASSES = 1 + 3 * len(SHAPES)
GRID = IMAGE_SIZE // 14


def centre_cell(obj: SceneObject, patch: int = 14) -> tuple[int, int]:
    """(row, column) of the patch holding the object's centre (training only)."""
    return int(obj.y // patch), int(obj.x // patch)


def centre_patches(objects: Sequence[SceneObject], patch: int = 14) -> np.ndarray:
    """Raster index of the patch holding each object's centre (training only)."""
    grid = IMAGE_SIZE // patch
    cells = [centre_cell(o, patch) for o in objects]
    return np.array([row * grid + col for row, col in cells], dtype=np.int64)


_NOUNS = {"object": None, "objects": None, **{s: s for s in SHAPES}, **{_plural(s): s for s in SHAPES}}


def question_words(question: str) -> list[str]:
    """The question as the word-level tokenizer splits it (lower case, '?' apart)."""
    return question.lower().replace("?", " ?").split()


def referents(question: str, objects: Sequence[SceneObject]) -> list[tuple[int, list[SceneObject]]]:
    """Every noun of a question with the objects it denotes: ``(word index, objects)`` (training only).

    A noun takes the size word or extreme word right before it ("small star", "leftmost object"); a bare
    "object(s)" denotes every object. Used for dense targets on the question's own tokens.
    """
    words = question_words(question)
    found = []
    for i, word in enumerate(words):
        if word not in _NOUNS:
            continue
        shape = _NOUNS[word]
        before = words[i - 1] if i else ""
        matching = [o for o in objects if shape is None or o.shape == shape]
        if before in SIZES:
            matching = [o for o in matching if o.size == before]
        elif before in _EXTREMES:
            ordered = sorted(matching, key=_EXTREMES[before])
            matching = ordered[:1]
        found.append((i, matching))
    return found


# --------------------------------------------------------------------------- vocabulary and prompt

PROMPT_TEMPLATE = "<image>\nQuestion: {question} Answer:"


def format_prompt(question: str) -> str:
    """The prompt the default model was trained on (one image, one question)."""
    return build_prompt(None, question, template=PROMPT_TEMPLATE)


def answer_vocabulary() -> list[str]:
    return [str(i) for i in range(MAX_OBJECTS + 1)] + ["yes", "no", *SHAPES, *SIZES, *POSITION_ANSWERS]


def text_vocabulary() -> list[str]:
    """Every word the tokenizer needs (lower-cased, punctuation split), in a stable order."""
    words = ["question", ":", "answer", "?"]
    templates = [
        "how many objects are there",
        "is there a",
        "what shape is the object",
        "what size is the",
        "is the left or right of above below",
        "leftmost rightmost topmost bottommost",
        " ".join(_plural(s) for s in SHAPES),
        " ".join(SIZES),
        " ".join(answer_vocabulary()),
    ]
    for t in templates:
        for w in t.split():
            if w not in words:
                words.append(w)
    return words


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Record:
    image: Image.Image
    question: str
    answers: list[str]
    type: str
    scene_index: int


def iter_split(split: str, num_images: int, seed: int = 0, per_type: int = 1) -> Iterator[Record]:
    """Records of ``split``: ``per_type`` questions of each type for each of ``num_images`` scenes."""
    for index in range(num_images):
        scene = generate_scene(seed, split, index)
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, 2])
        for q in sample_questions(scene.objects, rng, per_type=per_type):
            yield Record(scene.image, q.question, [q.answer], q.type, index)


def group_by_scene(records: Sequence[Record]) -> dict[int, list[Record]]:
    """The records of each scene, scenes in ascending order (so that each scene's image is processed once)."""
    if not records:
        raise ValueError("records must not be empty")
    by_scene: dict[int, list[Record]] = {}
    for rec in records:
        if not isinstance(rec, Record):
            raise TypeError(f"records must hold Record items, got {type(rec).__name__}")
        by_scene.setdefault(rec.scene_index, []).append(rec)
    return dict(sorted(by_scene.items()))


def accuracy_summary(hits: dict[str, list[int]]) -> dict:
    """Exact match per question type and overall, from 0/1 hits grouped by type, plus the question count."""
    if not any(hits.values()):
        raise ValueError("hits must hold at least one question")
    summary: dict = {t: float(np.mean(v)) for t, v in sorted(hits.items())}
    summary["overall"] = float(np.mean([x for v in hits.values() for x in v]))
    summary["questions"] = sum(len(v) for v in hits.values())
    return summary


def test_split(seed: int = 0, num_images: int = DEFAULT_TEST_IMAGES) -> list[Record]:
    """Held-out test split: one question of each type per scene (1,250 questions by default).

    Test scenes use their own seed stream, disjoint from the training scenes.
    """
    return list(iter_split("test", num_images, seed=seed))


def export_jsonl(records: Sequence[Record], path: str | Path, image_dir: str | Path | None = None) -> Path:
    """Write records as JSONL ({"image", "question", "answers", "type"}), saving each scene once as PNG.

    Image paths are written relative to the JSONL file when ``image_dir`` lies beside or below it.
    Both appear whole or not at all: the file, and the default image folder (``<stem>_images``) as a
    whole, replace earlier ones only once everything is written.
    """
    from contextlib import nullcontext

    from vlmzip.outputs import replacing_directory, replacing_file

    path = Path(path)
    default_dir = path.parent / (path.stem + "_images")
    image_dir = Path(image_dir) if image_dir is not None else default_dir
    if image_dir == default_dir:
        images = replacing_directory(image_dir)
    else:
        image_dir.mkdir(parents=True, exist_ok=True)
        images = nullcontext(image_dir)
    saved: dict[int, Path] = {}
    # The images are moved into place before the file that names them (contexts close in reverse order).
    with replacing_file(path) as staged_file, images as staged_dir, staged_file.open("w") as fh:
        for rec in records:
            if rec.scene_index not in saved:
                img_path = image_dir / f"{rec.scene_index:05d}.png"
                rec.image.save(staged_dir / img_path.name)
                saved[rec.scene_index] = img_path
            img_path = saved[rec.scene_index]
            try:
                shown = str(img_path.resolve().relative_to(path.parent.resolve()))
            except ValueError:
                shown = str(img_path.resolve())
            fh.write(
                json.dumps({"image": shown, "question": rec.question, "answers": rec.answers, "type": rec.type}) + "\n"
            )
    return path


def load_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL split written by :func:`export_jsonl`; relative image paths resolve against its folder."""
    path = Path(path)
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            image = Path(row["image"])
            row["image"] = image if image.is_absolute() else path.parent / image
            rows.append(row)
    return rows


def export_split(
    path: str | Path,
    split: str = "test",
    num_images: int = DEFAULT_TEST_IMAGES,
    seed: int = 0,
    per_type: int = 1,
    overwrite: bool = False,
) -> Path:
    """Regenerate a split and write it as JSONL (images as PNG in ``<stem>_images/`` beside the file).

    An existing file or image folder is replaced only with ``overwrite``.
    """
    check_int("num_images", num_images, 1)
    check_int("per_type", per_type, 1)
    check_int("seed", seed, 0)
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; name a .jsonl file")
    images = path.parent / (path.stem + "_images")
    existing = [str(p) for p in (path, images) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output exists: {', '.join(existing)}; pass --overwrite to replace it")
    return export_jsonl(list(iter_split(split, num_images, seed=seed, per_type=per_type)), path)


def main(argv: Sequence[str] | None = None) -> int:
    """Write a split of the default model's data as JSONL + PNG files."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlmzip.default_model.data", description=main.__doc__)
    parser.add_argument("output", type=Path, help="JSONL file to write")
    parser.add_argument("--split", default="test", choices=sorted(_SPLIT_IDS))
    parser.add_argument("--images", type=int, default=DEFAULT_TEST_IMAGES, help="number of scenes")
    parser.add_argument("--per-type", type=int, default=1, help="questions of each type per scene")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file and its image folder")
    args = parser.parse_args(argv)
    for option, value, least in (
        ("--images", args.images, 1),
        ("--per-type", args.per_type, 1),
        ("--seed", args.seed, 0),
    ):
        if value < least:
            parser.error(f"{option} must be an integer >= {least}, got {value}")
    from vlmzip.outputs import embedded_model_inputs, refuse_overlap

    for output in (args.output, args.output.parent / (args.output.stem + "_images")):
        refuse_overlap(output, embedded_model_inputs(), "OUTPUT")
    path = export_split(args.output, args.split, args.images, args.seed, args.per_type, overwrite=args.overwrite)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
