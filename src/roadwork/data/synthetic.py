"""Procedural dashcam-like roadwork scenes.

Each image is a perspective road (lane markings, sky and horizon, roadside trees/buildings, vehicles).
Positives carry work-zone objects (cones, drums, barriers, diamond signs, arrow boards, workers) at a
varied count, size, distance and occlusion; negatives carry hard distractors (orange vehicles, yellow
non-work diamond signs, brown/orange tourist signs, autumn trees) — positives carry them too, so orange
alone is no shortcut. Slice columns: ``weather`` (clear/rain/fog/snow), ``time`` (day/dusk/night),
``camera`` (sharp/blur/jpeg), ``domain`` (A/B: two visual styles for shift experiments),
``zone_distance`` (near/mid/far for positives, none for negatives) and ``distractor``.

Every image draws from ``numpy.random.default_rng([seed, index])``, so the output is a pure function of
``(seed, index, size)`` whatever the number of worker processes. No torch is imported here.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from roadwork._parallel import resolve_workers
from roadwork.config import SyntheticConfig

__all__ = ["CLASSES", "SceneSpec", "generate_dataset", "iter_scenes", "render_scene", "sample_spec"]

CLASSES = ("no_roadwork", "roadwork")
"""The two labels of the generated scenes (index 1: a work zone)."""
WEATHER = ("clear", "rain", "fog", "snow")
TIMES = ("day", "dusk", "night")
CAMERAS = ("sharp", "blur", "jpeg")
ZONE_OBJECTS = ("cone", "drum", "barrier", "diamond", "arrow_board", "worker")
DISTRACTORS = ("orange_vehicle", "yellow_sign", "tourist_sign", "autumn_tree")
_SS = 2  # supersampling factor: draw at 2x, then downsample, so small far objects blend like real pixels

Color = tuple[int, int, int]


@dataclass(frozen=True)
class SceneSpec:
    """Everything that decides an image, sampled before drawing."""

    index: int
    label: int  # the recorded label (after label noise)
    true_label: int
    label_flipped: bool
    weather: str
    time: str
    camera: str
    domain: str
    zone_distance: str  # near / mid / far / none
    distractor: str  # one of DISTRACTORS or none


def _choice(rng: np.random.Generator, items: tuple[str, ...], p: tuple[float, ...]) -> str:
    return items[int(rng.choice(len(items), p=p))]


def sample_spec(
    index: int,
    rng: np.random.Generator,
    *,
    positive_fraction: float = 0.5,
    domain_b_fraction: float = 0.5,
    label_noise: float = 0.0,
) -> SceneSpec:
    """Draw the attributes of scene ``index`` (label, weather, time, camera, domain, distances, distractor)."""
    true_label = int(rng.random() < positive_fraction)
    flipped = bool(rng.random() < label_noise)
    distractor_p = 0.55 if true_label == 0 else 0.25
    return SceneSpec(
        index=index,
        label=true_label ^ int(flipped),
        true_label=true_label,
        label_flipped=flipped,
        weather=_choice(rng, WEATHER, (0.4, 0.2, 0.2, 0.2)),
        time=_choice(rng, TIMES, (0.5, 0.25, 0.25)),
        camera=_choice(rng, CAMERAS, (0.6, 0.2, 0.2)),
        domain="B" if rng.random() < domain_b_fraction else "A",
        zone_distance=_choice(rng, ("near", "mid", "far"), (0.4, 0.35, 0.25)) if true_label else "none",
        distractor=_choice(rng, DISTRACTORS, (0.3, 0.3, 0.2, 0.2)) if rng.random() < distractor_p else "none",
    )


# ---------------------------------------------------------------------------------------------
# Palettes of the two visual domains


@dataclass(frozen=True)
class _Style:
    sky_top: Color
    sky_horizon: Color
    ground: Color
    asphalt: Color
    marking: Color
    zone_orange: Color
    zone_stripe: Color
    tree: Color
    building: Color
    texture: float  # std of ground texture noise


_STYLES = {
    "A": _Style(
        (70, 130, 210),
        (180, 205, 230),
        (80, 125, 55),
        (100, 100, 104),
        (235, 235, 235),
        (250, 115, 20),
        (245, 245, 245),
        (40, 100, 40),
        (150, 140, 130),
        10.0,
    ),
    "B": _Style(
        (150, 170, 185),
        (215, 215, 205),
        (185, 165, 115),
        (62, 64, 74),
        (230, 200, 40),
        (225, 65, 25),
        (250, 250, 250),
        (95, 110, 55),
        (225, 220, 205),
        4.0,
    ),
}


def _jitter(rng: np.random.Generator, c: Color, amount: float = 12.0) -> Color:
    r, g, b = (int(np.clip(v + rng.normal(0, amount), 0, 255)) for v in c)
    return (r, g, b)


# ---------------------------------------------------------------------------------------------
# Drawing


class _Scene:
    """Perspective geometry of one road: depth t in (0, 1] maps to a row and a scale."""

    def __init__(self, rng: np.random.Generator, w: int) -> None:
        self.w = w
        self.h = w * rng.uniform(0.36, 0.5)  # horizon row
        self.vx = w * rng.uniform(0.38, 0.62)  # vanishing point
        self.cx = w * rng.uniform(0.4, 0.6)  # road centre at the bottom row
        self.half = w * rng.uniform(0.45, 0.8)  # road half-width at the bottom row

    def row(self, t: float) -> float:
        return self.h + t * (self.w - self.h)

    def x(self, t: float, lateral: float) -> float:
        """Column at depth t; lateral -1 / +1 are the road edges, beyond is roadside."""
        centre = self.vx + (self.cx - self.vx) * t
        return centre + lateral * self.half * t


def _draw_background(img: np.ndarray, sc: _Scene, st: _Style, rng: np.random.Generator) -> None:
    w = sc.w
    hr = int(sc.h)
    ramp = np.linspace(0.0, 1.0, max(hr, 1))[:, None]
    sky = (1 - ramp) * np.array(st.sky_top) + ramp * np.array(st.sky_horizon)
    img[:hr] = sky[:, None, :]
    ground = np.array(_jitter(rng, st.ground, 10), dtype=np.float32)
    img[hr:] = ground
    img[hr:] += rng.normal(0, st.texture, size=(w - hr, w, 1)).astype(np.float32)


def _tree(d: ImageDraw.ImageDraw, x: float, y: float, s: float, color: Color) -> None:
    d.rectangle([x - 0.02 * s, y - 0.25 * s, x + 0.02 * s, y], fill=(70, 50, 30))
    d.ellipse([x - 0.12 * s, y - 0.5 * s, x + 0.12 * s, y - 0.2 * s], fill=color)


def _vehicle(d: ImageDraw.ImageDraw, x: float, y: float, s: float, color: Color, truck: bool) -> None:
    wv, hv = (0.34 * s, 0.3 * s) if truck else (0.28 * s, 0.18 * s)
    d.rectangle([x - wv / 2, y - hv, x + wv / 2, y - 0.03 * s], fill=color)
    if not truck:
        d.rectangle([x - wv * 0.35, y - hv * 1.45, x + wv * 0.35, y - hv * 0.95], fill=color)
        d.rectangle([x - wv * 0.3, y - hv * 1.38, x + wv * 0.3, y - hv * 1.0], fill=(40, 50, 60))
    else:
        d.rectangle([x - wv * 0.4, y - hv * 0.9, x + wv * 0.4, y - hv * 0.6], fill=(40, 50, 60))
    for wx in (x - wv * 0.35, x + wv * 0.35):
        d.ellipse([wx - 0.035 * s, y - 0.07 * s, wx + 0.035 * s, y], fill=(20, 20, 20))
    d.rectangle([x - wv * 0.45, y - hv * 0.45, x - wv * 0.35, y - hv * 0.35], fill=(200, 30, 30))
    d.rectangle([x + wv * 0.35, y - hv * 0.45, x + wv * 0.45, y - hv * 0.35], fill=(200, 30, 30))


def _diamond(d: ImageDraw.ImageDraw, x: float, y: float, s: float, face: Color, glyph: bool) -> None:
    r = 0.07 * s
    cy = y - 0.28 * s
    d.rectangle([x - 0.008 * s, cy, x + 0.008 * s, y], fill=(90, 90, 90))
    d.polygon([(x, cy - r), (x + r, cy), (x, cy + r), (x - r, cy)], fill=face, outline=(20, 20, 20))
    if glyph:  # a worker-with-shovel pictogram, reduced to a head and a slanted body
        d.ellipse([x - 0.012 * s, cy - 0.04 * s, x + 0.012 * s, cy - 0.016 * s], fill=(20, 20, 20))
        d.line(
            [(x, cy - 0.016 * s), (x - 0.02 * s, cy + 0.035 * s)],
            fill=(20, 20, 20),
            width=max(1, int(0.01 * s)),
        )
    else:  # a non-work warning: a curve arrow
        d.arc(
            [x - 0.035 * s, cy - 0.035 * s, x + 0.035 * s, cy + 0.035 * s],
            180,
            360,
            fill=(20, 20, 20),
            width=max(1, int(0.012 * s)),
        )


def _zone_object(
    d: ImageDraw.ImageDraw, kind: str, x: float, y: float, s: float, st: _Style, rng: np.random.Generator
) -> None:
    orange = _jitter(rng, st.zone_orange, 10)
    white = st.zone_stripe
    if kind == "cone":
        hgt, base = 0.13 * s, 0.045 * s
        d.polygon([(x, y - hgt), (x + base, y), (x - base, y)], fill=orange)
        d.polygon(
            [
                (x - base * 0.55, y - hgt * 0.45),
                (x + base * 0.55, y - hgt * 0.45),
                (x + base * 0.42, y - hgt * 0.6),
                (x - base * 0.42, y - hgt * 0.6),
            ],
            fill=white,
        )
        d.rectangle([x - base * 1.2, y - 0.012 * s, x + base * 1.2, y], fill=(30, 30, 30))
    elif kind == "drum":
        wd, hgt = 0.05 * s, 0.12 * s
        d.rectangle([x - wd, y - hgt, x + wd, y], fill=orange)
        for f in (0.3, 0.62):
            d.rectangle([x - wd, y - hgt * (f + 0.12), x + wd, y - hgt * f], fill=white)
    elif kind == "barrier":
        wd, hgt = 0.14 * s, 0.1 * s
        for lx in (x - wd * 0.8, x + wd * 0.8):
            d.rectangle([lx - 0.006 * s, y - hgt, lx + 0.006 * s, y], fill=(70, 70, 70))
        top, bottom = y - hgt, y - hgt * 0.55
        d.rectangle([x - wd, top, x + wd, bottom], fill=white)
        n = 5
        for i in range(n):
            x0 = x - wd + 2 * wd * i / n
            d.polygon(
                [(x0, bottom), (x0 + wd / n, top), (x0 + 1.6 * wd / n, top), (x0 + 0.6 * wd / n, bottom)],
                fill=orange,
            )
    elif kind == "diamond":
        _diamond(d, x, y, s, orange, glyph=True)
    elif kind == "arrow_board":
        wd, hgt = 0.13 * s, 0.08 * s
        top = y - 0.2 * s
        d.rectangle([x - 0.01 * s, top, x + 0.01 * s, y], fill=(60, 60, 60))
        d.rectangle([x - wd, top - hgt, x + wd, top], fill=(15, 15, 15))
        amber = (255, 190, 40)
        r = max(0.012 * s, 0.6)
        for i in range(5):  # arrow shaft and head made of lamps
            cx = x - wd * 0.7 + i * wd * 0.3
            d.ellipse([cx - r, top - hgt / 2 - r, cx + r, top - hgt / 2 + r], fill=amber)
        for dy in (-1, 1):
            cx, cy = x + wd * 0.35, top - hgt / 2 + dy * hgt * 0.28
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=amber)
    elif kind == "worker":
        vest = _jitter(rng, (250, 150, 20) if rng.random() < 0.6 else (200, 240, 40), 10)
        d.rectangle([x - 0.018 * s, y - 0.07 * s, x - 0.004 * s, y], fill=(40, 40, 70))
        d.rectangle([x + 0.004 * s, y - 0.07 * s, x + 0.018 * s, y], fill=(40, 40, 70))
        d.rectangle([x - 0.026 * s, y - 0.15 * s, x + 0.026 * s, y - 0.07 * s], fill=vest)
        d.rectangle([x - 0.026 * s, y - 0.115 * s, x + 0.026 * s, y - 0.105 * s], fill=(235, 235, 235))
        d.ellipse([x - 0.017 * s, y - 0.19 * s, x + 0.017 * s, y - 0.155 * s], fill=(200, 160, 120))
        d.rectangle([x - 0.02 * s, y - 0.195 * s, x + 0.02 * s, y - 0.178 * s], fill=(250, 250, 250))


_DEPTHS = {"near": (0.5, 0.95), "mid": (0.3, 0.5), "far": (0.15, 0.3)}


def _draw_road(d: ImageDraw.ImageDraw, sc: _Scene, st: _Style, rng: np.random.Generator, w: int) -> None:
    """Road surface, edges and dashed lane markings."""
    road = [(sc.x(0, -1), sc.h), (sc.x(0, 1), sc.h), (sc.x(1, 1), w), (sc.x(1, -1), w)]
    d.polygon(road, fill=_jitter(rng, st.asphalt, 8))
    lw = max(1, int(0.006 * w))
    d.line([(sc.x(0, -0.97), sc.h), (sc.x(1, -0.97), w)], fill=st.marking, width=lw)
    d.line([(sc.x(0, 0.97), sc.h), (sc.x(1, 0.97), w)], fill=st.marking, width=lw)
    lanes = (0.0,) if rng.random() < 0.5 else (-0.33, 0.33)
    phase = rng.uniform(0, 1)
    for lat in lanes:
        for k in range(14):
            t0 = ((k + phase) / 14) ** 2
            t1 = ((k + phase + 0.5) / 14) ** 2
            d.line(
                [(sc.x(t0, lat), sc.row(t0)), (sc.x(t1, lat), sc.row(t1))],
                fill=st.marking,
                width=max(1, int(lw * (0.5 + 2 * t1))),
            )


def _scene_items(spec: SceneSpec, rng: np.random.Generator) -> list[tuple[float, str, float]]:
    """Everything standing on the ground, as (t, kind, lateral), in drawing order: far to near, except that the
    nearest work-zone object comes last."""
    items: list[tuple[float, str, float]] = []
    for _ in range(int(rng.integers(2, 9))):  # roadside trees and buildings
        side = rng.choice([-1.0, 1.0])
        items.append(
            (
                rng.uniform(0.05, 0.9),
                "tree" if rng.random() < 0.6 else "building",
                side * rng.uniform(1.25, 2.4),
            )
        )
    for _ in range(int(rng.integers(0, 4))):  # traffic
        items.append((rng.uniform(0.12, 0.95), "vehicle", rng.uniform(-0.7, 0.7)))
    if spec.distractor != "none":
        t = rng.uniform(0.2, 0.85)
        lat = (
            rng.uniform(-0.6, 0.6)
            if spec.distractor == "orange_vehicle"
            else rng.choice([-1, 1]) * rng.uniform(1.1, 1.5)
        )
        items.append((t, spec.distractor, lat))
    if spec.true_label:
        lo, hi = _DEPTHS[spec.zone_distance]
        n = {"near": int(rng.integers(3, 9)), "mid": int(rng.integers(2, 7)), "far": int(rng.integers(1, 4))}[
            spec.zone_distance
        ]
        kinds = rng.choice(ZONE_OBJECTS, size=n, p=(0.35, 0.15, 0.15, 0.15, 0.08, 0.12))
        side = rng.choice([-1.0, 1.0])
        taper = rng.random() < 0.5  # cones closing a lane, or objects along the shoulder
        t_near = rng.uniform(lo, hi)
        for i, kind in enumerate(kinds):
            t = t_near * (0.8**i) if i else t_near
            t = max(t, 0.06)
            lat = side * (0.85 - 0.55 * i / max(n - 1, 1)) if taper else side * rng.uniform(0.75, 1.05)
            items.append((t, str(kind), lat))
    # Far to near, except that the nearest work-zone object is drawn last: others may be occluded, but a
    # positive always shows at least one object (how visible it is is left to distance, weather and camera).
    lead = [it for it in items if it[1] in ZONE_OBJECTS][:1]
    items = sorted((it for it in items if it not in lead), key=lambda it: it[0]) + lead
    return items


def _draw_item(
    d: ImageDraw.ImageDraw, kind: str, x: float, y: float, s: float, st: _Style, rng: np.random.Generator
) -> None:
    """One object standing on the ground at (x, y), scale ``s``: scenery, traffic, a distractor or a zone object."""
    if kind == "tree":
        _tree(d, x, y, s * 1.4, _jitter(rng, st.tree, 15))
    elif kind == "building":
        bw, bh = s * rng.uniform(0.3, 0.6), s * rng.uniform(0.4, 0.9)
        d.rectangle([x - bw / 2, y - bh, x + bw / 2, y], fill=_jitter(rng, st.building, 20))
    elif kind == "vehicle":
        pal = [
            (200, 200, 205),
            (30, 30, 35),
            (160, 20, 25),
            (30, 60, 140),
            (120, 120, 125),
            (230, 230, 230),
        ]
        _vehicle(d, x, y, s, _jitter(rng, pal[int(rng.integers(len(pal)))], 10), truck=rng.random() < 0.25)
    elif kind == "orange_vehicle":
        _vehicle(d, x, y, s, _jitter(rng, (245, 125, 25), 15), truck=rng.random() < 0.6)
    elif kind == "yellow_sign":
        _diamond(d, x, y, s, _jitter(rng, (245, 205, 30), 10), glyph=False)
    elif kind == "tourist_sign":
        top = y - 0.3 * s
        d.rectangle([x - 0.008 * s, top, x + 0.008 * s, y], fill=(90, 90, 90))
        d.rectangle([x - 0.1 * s, top - 0.07 * s, x + 0.1 * s, top], fill=_jitter(rng, (165, 80, 30), 15))
        d.line(
            [(x - 0.07 * s, top - 0.035 * s), (x + 0.07 * s, top - 0.035 * s)],
            fill=(240, 240, 240),
            width=max(1, int(0.012 * s)),
        )
    elif kind == "autumn_tree":
        _tree(d, x, y, s * 1.4, _jitter(rng, (235, 120, 25), 15))
    else:
        _zone_object(d, kind, x, y, s, st, rng)


def _draw_scene(spec: SceneSpec, rng: np.random.Generator, w: int) -> tuple[np.ndarray, float]:
    """Return the image downsampled by the supersampling factor, and the horizon row at that size."""
    st = _STYLES[spec.domain]
    sc = _Scene(rng, w)
    base = np.zeros((w, w, 3), np.float32)
    _draw_background(base, sc, st, rng)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    _draw_road(d, sc, st, rng, w)
    for t, kind, lat in _scene_items(spec, rng):
        x, y, s = sc.x(t, lat), sc.row(t), t * w
        if kind in ZONE_OBJECTS or kind in DISTRACTORS:
            x = float(np.clip(x, 0.04 * w, 0.96 * w))  # keep what decides the label inside the frame
            s *= 2.0
        _draw_item(d, kind, x, y, s, st, rng)
    return np.asarray(im.reduce(_SS), dtype=np.float32), sc.h / _SS


def _apply_conditions(
    img: np.ndarray, horizon: float, spec: SceneSpec, rng: np.random.Generator, size: int
) -> np.ndarray:
    rows = np.arange(size, dtype=np.float32)[:, None, None]
    depth = np.clip((rows - horizon) / max(size - horizon, 1.0), 0.02, 1.0)  # (H, 1, 1), 1 = nearest
    if spec.time == "dusk":
        img = img * np.array([0.85, 0.62, 0.48], np.float32) + np.array([30, 10, 0], np.float32)
    elif spec.time == "night":
        cx = size * rng.uniform(0.4, 0.6)
        cols = np.arange(size, dtype=np.float32)[None, :, None]
        beam = np.exp(-(((cols - cx) / (size * 0.55)) ** 2)) * np.clip(depth * 1.6 - 0.4, 0, 1)
        img = img * (0.3 + 0.7 * beam) + np.array([0, 0, 8], np.float32)
    if spec.weather == "fog":
        density = rng.uniform(0.08, 0.35)
        fog = 1 - np.exp(-density / depth)
        fog = np.where(rows < horizon, 0.9, fog)
        level = 200 if spec.time == "day" else (140 if spec.time == "dusk" else 45)
        img = img * (1 - fog) + level * fog
    elif spec.weather == "rain":
        img = img * 0.8 + img.mean(axis=2, keepdims=True) * 0.1
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(40, 120))):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            d.line([(x, y), (x - 1.5, y + size * 0.06)], fill=(185, 190, 200), width=1)
        img = np.asarray(im, dtype=np.float32)
    elif spec.weather == "snow":
        img = img * 0.75 + 60 * (rows > horizon)
        flakes = rng.random((size, size)) < 0.02
        img[flakes] = 245
    sigma = {"day": 2.0, "dusk": 3.5, "night": 6.0}[spec.time]
    img = img + rng.normal(0, sigma, size=img.shape).astype(np.float32)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if spec.camera == "blur":
        im = im.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.8, 1.8) * size / 128))
    elif spec.camera == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(8, 26)))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(im)


def render_scene(spec: SceneSpec, size: int, seed: int) -> Image.Image:
    """Draw one scene. Pure function of ``(spec, size, seed)``."""
    rng = np.random.default_rng([seed, spec.index, 1])
    img, horizon = _draw_scene(spec, rng, size * _SS)
    return Image.fromarray(_apply_conditions(img, horizon, spec, rng, size))


def iter_scenes(
    n: int,
    *,
    size: int = 128,
    seed: int = 0,
    start: int = 0,
    positive_fraction: float = 0.5,
    domain_b_fraction: float = 0.5,
    label_noise: float = 0.0,
) -> Iterator[tuple[SceneSpec, Image.Image]]:
    """Yield ``(spec, image)`` for indices ``start .. start+n-1``."""
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i, 0])
        spec = sample_spec(
            i,
            rng,
            positive_fraction=positive_fraction,
            domain_b_fraction=domain_b_fraction,
            label_noise=label_noise,
        )
        yield spec, render_scene(spec, size, seed)


def _write_chunk(args: tuple[Path, int, int, dict[str, float | int]]) -> list[dict[str, object]]:
    out_dir, start, n, kw = args
    rows = []
    for spec, img in iter_scenes(n, start=start, **kw):  # type: ignore[arg-type]
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
        name = f"{spec.index:06d}.jpg"
        (out_dir / name).write_bytes(data)
        row = asdict(spec)
        row["path"] = name
        row["sha256"] = hashlib.sha256(data).hexdigest()
        rows.append(row)
    return rows


def generate_dataset(
    out_dir: str | Path, cfg: SyntheticConfig, *, progress: bool = True
) -> list[dict[str, object]]:
    """Write ``cfg.n`` JPEG scenes into ``out_dir``; one row per image (paths relative to ``out_dir``)."""
    from roadwork._progress import progress_bar

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = cfg.n
    kw: dict[str, float | int] = cfg.model_dump(
        include={"size", "seed", "positive_fraction", "domain_b_fraction", "label_noise"}
    )
    workers = resolve_workers(cfg.workers)
    chunk = 64
    jobs = [(out, s, min(chunk, n - s), kw) for s in range(0, n, chunk)]
    rows: list[dict[str, object]] = []
    bar = progress_bar(total=n, desc="synthetic scenes", unit="img", disable=not progress)
    if workers == 1:
        for job in jobs:
            rows.extend(_write_chunk(job))
            bar.update(job[2])
    else:
        # spawn: the parent may hold torch thread pools, which do not survive fork
        with mp.get_context("spawn").Pool(workers) as pool:
            for part in pool.imap(_write_chunk, jobs):
                rows.extend(part)
                bar.update(len(part))
    bar.close()
    return rows
