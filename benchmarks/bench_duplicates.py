"""Which near-duplicate fingerprint finds copies of a dermoscopy photo without matching distinct lesions?

Planted duplicates: ``--originals`` images of the lite copy (seeded sample), each copied once per kind
(re-encoded at JPEG quality 50/75/95; rescaled 0.5-1.5x; cropped by 5% or 10% of each side, the margin
split at random; flipped; rotated by 90/180/270 degrees; brightness, contrast and saturation each
changed by 5-10%; and all of that at once, milder). Negatives: every pair of images of the lite copy
with different lesion ids (28.6 million pairs; same and different class counted apart), less the pairs
listed in ``CONFIRMED_DUPLICATES``, which were looked at and are the same photograph under two lesion
ids (the missed duplicates this work is about; each with its reason).

Methods: dermcam's fingerprint (``dermcam.data.fingerprint``: colour DCT thumbnails, orientations and
crops), the same without its crops, imagehash's pHash at 64 and 256 bits (8 orientations), pHash-256
together with imagehash's colour hash, and efficientnet_lite0 ImageNet embeddings (cosine, 8
orientations; on a ``--cnn-originals`` subset, being ~50x slower). Each method's operating point is the
threshold with the best worst-kind recall at <= 1 false pair per 10,000. Goals (issue 22): recall >= 0.95
on every kind, <= 1 false pair per 10,000, fingerprinting >= 200 images/s on the 2-core CPU.

Run alone on a quiet machine (timings): python benchmarks/bench_duplicates.py   (about 5 minutes on 2
cores; writes results/duplicates.json). ``--sheet /tmp/pairs.png`` also draws the closest negative
pairs of dermcam's fingerprint for a visual check. ``--smoke``: a few synthetic images, every step, no
results written (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from _common import LITE, peak_rss_mib, report
from dermcam.data import fingerprint as fp
from dermcam.data.geometry import DEFAULT_CACHE_SIZE, cover_box

T = Image.Transpose
DIHEDRAL = (T.FLIP_LEFT_RIGHT, T.FLIP_TOP_BOTTOM, T.ROTATE_90, T.ROTATE_180, T.ROTATE_270, T.TRANSPOSE, T.TRANSVERSE)
KINDS = ("jpeg50", "jpeg75", "jpeg95", "scale0.5", "scale0.75", "scale1.25", "scale1.5", "crop5", "crop10",
         "hflip", "vflip", "rot90", "rot180", "rot270", "jitter", "combined")
GOAL_RECALL, GOAL_FP_PER_10K, GOAL_IMAGES_S = 0.95, 1.0, 200.0
# Pairs of the lite copy with different lesion ids that show one lesion (looked at, enlarged, among the 40
# closest pairs of the contact sheet, --sheet; the other 34 are distinct lesions): excluded from the
# negatives, and listed in the results with these reasons.
CONFIRMED_DUPLICATES: dict[tuple[str, str], str] = {
    ("ISIC_0027027", "ISIC_0029036"): "one photograph: same lesion outline and '3Gen' scale mark, other exposure",
    ("ISIC_0028014", "ISIC_0028585"): "same lesion photographed twice: same outline, milia, hair and ruler",
    ("ISIC_0034248", "ISIC_0034228"): "same lesion photographed twice: same satellite spot and red dot, shifted",
    ("ISIC_0026560", "ISIC_0031838"): "same lesion photographed twice: same two lobes, spots and scale ticks",
    ("ISIC_0025415", "ISIC_0025143"): "same lesion photographed twice: the same hairs across it, shifted",
    ("ISIC_0033421", "ISIC_0033481"): "same lesion photographed twice: same shape and satellite spots, shifted",
}


# ---------------------------------------------------------------- planted copies

def _scale(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((max(16, round(image.width * factor)), max(16, round(image.height * factor))),
                        Image.Resampling.BICUBIC)


def _crop(image: Image.Image, fraction: float, rng: np.random.Generator) -> Image.Image:
    """Each side shortened by ``fraction``, the removed margin split at random between its two ends."""
    cut_w, cut_h = round(image.width * fraction), round(image.height * fraction)
    left, top = int(rng.integers(0, cut_w + 1)), int(rng.integers(0, cut_h + 1))
    return image.crop((left, top, left + image.width - cut_w, top + image.height - cut_h))


def _jitter(image: Image.Image, rng: np.random.Generator, low: float, high: float) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(1.0 + float(rng.choice([-1.0, 1.0]) * rng.uniform(low, high)))
    return image


def planted_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """The JPEG bytes of one transformed copy of ``image``."""
    quality = 90
    if kind.startswith("jpeg"):
        quality = int(kind[4:])
    elif kind.startswith("scale"):
        image = _scale(image, float(kind[5:]))
    elif kind.startswith("crop"):
        image = _crop(image, int(kind[4:]) / 100, rng)
    elif kind in ("hflip", "vflip", "rot90", "rot180", "rot270"):
        image = image.transpose({"hflip": T.FLIP_LEFT_RIGHT, "vflip": T.FLIP_TOP_BOTTOM, "rot90": T.ROTATE_90,
                                 "rot180": T.ROTATE_180, "rot270": T.ROTATE_270}[kind])
    elif kind == "jitter":
        image = _jitter(image, rng, 0.05, 0.10)
    elif kind == "combined":
        image = image.transpose(DIHEDRAL[int(rng.integers(len(DIHEDRAL)))])
        image = _crop(_scale(image, float(rng.uniform(0.75, 1.25))), 0.05, rng)
        image, quality = _jitter(image, rng, 0.0, 0.05), 75
    else:
        raise ValueError(kind)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode(source: Path | bytes) -> Image.Image:
    """Upright 8-bit RGB, as prepare decodes before its cover crop."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


# ---------------------------------------------------------------- methods

@dataclass
class Scores:
    """One method's distances: planted (kind -> per-original distance vectors) and the negative pairs
    closer than its largest candidate threshold (i, j into the data set's rows, distance vectors)."""

    name: str
    thresholds: list[tuple[float, ...]]
    positives: dict[str, np.ndarray] = field(default_factory=dict)
    neg_i: np.ndarray | None = None
    neg_j: np.ndarray | None = None
    neg_d: np.ndarray | None = None
    images_s: float = 0.0
    note: str = ""
    subset: dict[str, int] | None = None
    same_lesion_matched: int = 0  # pairs of one lesion id within the default threshold (not scored)
    all_pairs: np.ndarray | None = None  # every pair within the largest threshold, same lesion included
    all_d: np.ndarray | None = None


def hamming_min(a: np.ndarray, b: np.ndarray, block: int = 256) -> np.ndarray:
    """(na, nb) uint16: min over a's variants (na, V, W uint64 words) of the Hamming distance to b (nb, W)."""
    out = np.empty((len(a), len(b)), dtype=np.uint16)
    for start in range(0, len(a), block):
        xor = a[start:start + block, :, None, :] ^ b[None, None]
        out[start:start + block] = np.bitwise_count(xor).sum(axis=-1, dtype=np.uint16).min(axis=1)
    return out


def words(bits: np.ndarray) -> np.ndarray:
    """Boolean hash bits (..., n) -> packed uint64 words (..., ceil(n / 64))."""
    packed = np.packbits(bits, axis=-1)
    pad = (-packed.shape[-1]) % 8
    packed = np.concatenate([packed, np.zeros((*packed.shape[:-1], pad), np.uint8)], axis=-1)
    return np.ascontiguousarray(packed).view(np.uint64)


def phash_bits(image: Image.Image, size: int, variants: bool) -> np.ndarray:
    """imagehash's pHash of the image and, with ``variants``, of its 7 flips/rotations: (V, size^2) bools.
    The image is squashed to pHash's own input square first, so the variants cost 8 small DCTs."""
    import imagehash

    square = image.convert("L").resize((4 * size, 4 * size), Image.Resampling.LANCZOS)
    views = [square] + ([square.transpose(t) for t in DIHEDRAL] if variants else [])
    return np.stack([imagehash.phash(v, hash_size=size).hash.ravel() for v in views])


def colorhash_bits(image: Image.Image) -> np.ndarray:
    import imagehash

    return imagehash.colorhash(image, binbits=3).hash.ravel()


def negative_mask(lesions: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return lesions[i] != lesions[j]


def hash_scores(name: str, originals: np.ndarray, copies: dict[str, np.ndarray], planted: np.ndarray,
                lesions: np.ndarray, thresholds: list[int], images_s: float) -> Scores:
    """Scores of a dihedral hash: originals (n, 8, W) words, copies kind -> (m, 1, W)."""
    distances = hamming_min(originals, originals[:, 0])
    distances = np.minimum(distances, distances.T)
    i, j = np.nonzero(np.triu(distances <= max(thresholds), 1))
    keep = negative_mask(lesions, i, j)
    positives = {k: np.bitwise_count(originals[planted] ^ c).sum(-1).min(-1)[:, None].astype(np.float32)
                 for k, c in copies.items()}
    return Scores(name, [(float(t),) for t in thresholds], positives, i[keep], j[keep],
                  distances[i[keep], j[keep]][:, None].astype(np.float32), images_s)


def dct_whole_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dermcam's fingerprint without its crops: 1 - the best orientation's similarity of the whole views,
    2 where the colours do not match. (len(a), len(b))."""
    variants = fp.dihedral_variants(a[:, 0].astype(np.float32))
    whole = b[:, 0].astype(np.float32)
    colour_a, colour_b = (x[:, fp.COLOUR_ROW, :3].astype(np.float32) for x in (a, b))
    out = np.empty((len(a), len(b)), dtype=np.float32)
    for start in range(0, len(a), 512):
        block = variants[start:start + 512]
        sims = (block.reshape(-1, fp.DIM) @ whole.T).reshape(len(block), 8, -1).max(axis=1)
        rows = np.repeat(np.arange(start, start + len(block)), len(b))
        match = fp.colours_match(colour_a[rows], np.tile(colour_b, (len(block), 1)))
        out[start:start + 512] = np.where(match.reshape(len(block), -1), 1.0 - sims, 2.0)
    return out


def without_colour(fps: np.ndarray) -> np.ndarray:
    """Fingerprints whose colour rows are zeroed: zero rows always match, so the colour check is off."""
    out = fps.copy()
    out[:, fp.COLOUR_ROW] = 0
    return out


def cnn_scores(images: list[Image.Image], copies: dict[str, list[Image.Image]], lesions: np.ndarray,
               n_planted: int, n_negatives: int, size: int, smoke: bool) -> Scores:
    """efficientnet_lite0 (ImageNet weights, offline) pooled features at ``size`` x ``size``, cosine.
    ``images[:n_planted]`` are fingerprinted in 8 orientations (the max is taken), copies and the
    ``n_negatives`` other images once; negatives: the first against the second, distinct lesions."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the offline weight package; no 3-second hub probe
    from dermcam.models.backbones import create_model, data_config

    backbone = "test_efficientnet" if smoke else "tf_efficientnet_lite0"
    model, _ = create_model(backbone, 3, "none" if smoke else "auto")
    model.reset_classifier(0)
    model.eval()
    config = data_config(model)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)

    def embed(batch: list[Image.Image], variants: bool) -> np.ndarray:
        x = torch.from_numpy(np.stack([np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
                                       for im in batch])).permute(0, 3, 1, 2).float().div(255.0)
        x = (x - mean) / std
        views = [x, x.flip(3), x.flip(2), x.flip(2, 3), x.transpose(2, 3), x.transpose(2, 3).flip(3),
                 x.transpose(2, 3).flip(2), x.transpose(2, 3).flip(2, 3)] if variants else [x]
        with torch.inference_mode():
            out = torch.stack([torch.nn.functional.normalize(model(v), dim=1) for v in views], dim=1)
        return out.numpy()

    def embed_all(items: list[Image.Image], variants: bool) -> np.ndarray:
        return np.concatenate([embed(items[s:s + 64], variants) for s in range(0, len(items), 64)])

    embed(images[:2], True)  # warm-up: first-call allocations
    start = time.perf_counter()
    planted = embed_all(images[:n_planted], True)  # (p, 8, d)
    seconds = time.perf_counter() - start
    others = embed_all(images[n_planted:n_planted + n_negatives], False)[:, 0]
    positives = {k: 1.0 - np.einsum("pvd,pd->pv", planted[:len(v)], embed_all(v, False)[:, 0]).max(1)[:, None]
                 for k, v in copies.items()}
    sims = np.einsum("pvd,nd->pnv", planted, others).max(-1)
    i, j = np.nonzero(sims >= 0.80)
    j = j + n_planted
    keep = negative_mask(lesions, i, j)
    d = 1.0 - sims[i[keep], j[keep] - n_planted]
    grid = np.meshgrid(np.arange(n_planted), np.arange(n_planted, n_planted + n_negatives), indexing="ij")
    n_pairs = int(negative_mask(lesions, *grid).sum())
    thresholds = [(round(float(t), 3),) for t in np.arange(0.02, 0.201, 0.005)]
    return Scores(f"{backbone.removeprefix('tf_')} {size}px, cosine, 8 orientations", thresholds, positives,
                  i[keep], j[keep], d[:, None].astype(np.float32), n_planted / seconds,
                  note=f"8 forward passes per image at {size}x{size}; {8 * n_planted / seconds:.0f} passes/s",
                  subset={"originals": n_planted, "negative_images": n_negatives, "negative_pairs": n_pairs})


# ---------------------------------------------------------------- evaluation

def operating_points(scores: Scores, n_negative_pairs: int, excluded: np.ndarray) -> list[dict[str, Any]]:
    """Recall per kind and false pairs at every candidate threshold of ``scores``."""
    rows = []
    for threshold in scores.thresholds:
        limit = np.asarray(threshold, dtype=np.float32)
        recall = {k: float((d <= limit).all(axis=1).mean()) for k, d in scores.positives.items()}
        false = (scores.neg_d <= limit).all(axis=1) & ~excluded
        rows.append({"threshold": threshold if len(threshold) > 1 else threshold[0], "recall": recall,
                     "min_recall": min(recall.values()), "false_pairs": int(false.sum()),
                     "false_per_10k": float(false.sum() / n_negative_pairs * 1e4), "_false": false})
    return rows


def choose(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The best worst-kind recall within the false-pair goal (fewest false pairs among equals); the
    fewest false pairs when no threshold meets the goal."""
    within = [p for p in points if p["false_per_10k"] <= GOAL_FP_PER_10K]
    if within:
        return max(within, key=lambda p: (p["min_recall"], -p["false_per_10k"]))
    return min(points, key=lambda p: p["false_per_10k"])


def class_split(false: np.ndarray, scores: Scores, labels: np.ndarray) -> dict[str, int]:
    same = labels[scores.neg_i[false]] == labels[scores.neg_j[false]]
    return {"same_class": int(same.sum()), "different_class": int((~same).sum())}


def contact_sheet(path: Path, images: list[Image.Image], pairs: list[tuple[int, int, float, str]],
                  ids: np.ndarray, labels: np.ndarray) -> None:
    """Pairs side by side, one pair a row, captioned with ids, classes and distance."""
    cell_w, cell_h, caption = 200, 150, 14
    sheet = Image.new("RGB", (2 * cell_w + 8, max(1, len(pairs)) * (cell_h + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (i, j, distance, note) in enumerate(pairs):
        y = row * (cell_h + caption)
        for col, k in enumerate((i, j)):
            sheet.paste(images[k].resize((cell_w, cell_h)), (col * (cell_w + 8), y + caption))
        draw.text((2, y + 1), f"{ids[i]} {labels[i]} | {ids[j]} {labels[j]} | d={distance:.3f} {note}", fill="black")
    sheet.save(path)


def near_duplicate_groups(main: Scores, lesions: np.ndarray, mutual: bool) -> dict[str, int]:
    """What joining the pairs within the default threshold to the lesion groups does (every pair, or
    only mutual nearest ones): false pairs joined, groups merged, the largest group in images."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    near = main.all_d <= fp.DEFAULT_THRESHOLD
    pairs, _ = (fp.mutual_nearest if mutual else lambda p, d: (p, d))(main.all_pairs[near], main.all_d[near])
    codes = pd.factorize(lesions)[0]
    a, b = codes[pairs[:, 0]], codes[pairs[:, 1]]
    k = int(codes.max()) + 1
    count, label = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(k, k)), directed=False)
    sizes = np.bincount(label[codes])
    return {"false_pairs_joined": int((a != b).sum()), "lesion_groups": k, "groups_after": int(count),
            "largest_lesion_group": int(np.bincount(codes).max()), "largest_group_after": int(sizes.max()),
            "images_in_merged_groups": int(sizes[np.bincount(label, minlength=count) > 1].sum())}


def mutual_recall(main: Scores, fps: np.ndarray, planted: np.ndarray, copy_fps: np.ndarray) -> float:
    """Recall of one planted kind when a pair must also be mutual nearest (rank fp.MUTUAL_RANK): each
    copy joins the originals alone, and must be within the threshold, among its original's nearest
    partners, and have its original among its own nearest."""
    t = fp.DEFAULT_THRESHOLD
    near = main.all_d <= t
    owner = np.concatenate([main.all_pairs[near, 0], main.all_pairs[near, 1]])
    order = np.argsort(owner, kind="stable")
    owners, starts = np.unique(owner[order], return_index=True)
    by_owner = dict(zip(owners.tolist(), np.split(np.tile(main.all_d[near], 2)[order], starts[1:])))
    dpos = fp.paired_distances(fps[planted], copy_fps)
    pairs, dist = fp.near_duplicate_pairs(copy_fps, fps, threshold=t)
    ok = 0
    for q, o in enumerate(planted):
        if dpos[q] > t:
            continue
        closer_to_original = int((by_owner.get(int(o), np.empty(0)) < dpos[q]).sum())
        mine = pairs[:, 0] == q
        closer_to_copy = int(((dist[mine] < dpos[q]) & (pairs[mine, 1] != o)).sum())
        ok += closer_to_original < fp.MUTUAL_RANK and closer_to_copy < fp.MUTUAL_RANK
    return ok / len(planted)


def print_recall(rows: list[dict[str, Any]], details: dict[str, Any]) -> None:
    """Recall per planted kind at each method's chosen threshold, methods as columns."""
    names = [r["method"] for r in rows]
    print("recall at the chosen threshold  " + "  ".join(f"[{k}] {name}" for k, name in enumerate(names)))
    for kind in KINDS:
        print(f"  {kind:<10}" + "".join(f"  [{k}] {details[name]['chosen']['recall'].get(kind, float('nan')):.3f}"
                                        for k, name in enumerate(names)))


def machine_extra() -> dict[str, Any]:
    """lscpu's model name and flags that matter here, and uptime's load line."""
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    lscpu = run(["lscpu"])
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"lscpu_model_name": fields.get("Model name", "").strip(), "avx512_bf16": "avx512_bf16" in flags,
            "avx512f": "avx512f" in flags, "uptime": run(["uptime"])}


# ---------------------------------------------------------------- main

def load_lite(lite: Path, limit: int | None) -> tuple[pd.DataFrame, list[Path]]:
    table = pd.read_csv(lite / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    files = {p.stem: p for p in lite.glob("HAM10000_images_part_*/*.jpg")}
    table = table[table["image_id"].isin(files)].reset_index(drop=True)
    if limit:
        table = table.iloc[:limit].reset_index(drop=True)
    return table, [files[i] for i in table["image_id"]]


def timed_map(func: Callable[[Any], Any], items: list[Any]) -> tuple[list[Any], float]:
    start = time.perf_counter()
    out = [func(x) for x in items]
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    before = machine_extra()
    table, files = load_lite(args.lite, args.limit)
    ids, lesions, labels = (table[c].to_numpy() for c in ("image_id", "lesion_id", "dx"))
    n = len(table)
    images, decode_s = timed_map(decode, files)
    rng = np.random.default_rng(args.seed)
    planted = np.sort(rng.choice(n, size=min(args.originals, n), replace=False))
    copies: dict[str, list[Image.Image]] = {k: [] for k in KINDS}
    for index in planted:
        copy_rng = np.random.default_rng([args.seed, int(index)])
        for kind in KINDS:
            copies[kind].append(decode(planted_copy(images[index], kind, copy_rng)))
    iu_count = n * (n - 1) // 2
    same_lesion = int(sum(c * (c - 1) // 2 for c in pd.Series(lesions).value_counts()))
    n_negative = iu_count - same_lesion
    pair_labels = pd.Series(labels).value_counts()
    same_class_pairs = int(sum(c * (c - 1) // 2 for c in pair_labels)) - int(
        sum(c * (c - 1) // 2 for c in table.groupby(["dx", "lesion_id"]).size()))
    print(f"{n} images ({decode_s / n * 1e3:.2f} ms/decode), {len(planted)} planted x {len(KINDS)} kinds, "
          f"{n_negative:,} negative pairs ({same_class_pairs:,} same class)", flush=True)

    all_scores: list[Scores] = []
    for warm in (fp.fingerprint, lambda im: phash_bits(im, 8, True), colorhash_bits):  # imports, first calls
        warm(images[0])
    # dermcam's fingerprint, from the decoded image (what prepare will store)
    fps, seconds = timed_map(fp.fingerprint, images)
    fps = np.stack(fps)
    copy_fps = {k: np.stack([fp.fingerprint(im) for im in v]) for k, v in copies.items()}
    cap = 0.12
    dct_thresholds = [(round(float(t), 3),) for t in np.arange(0.02, cap + 1e-9, 0.005)]
    if (fp.DEFAULT_THRESHOLD,) not in dct_thresholds:
        dct_thresholds.append((fp.DEFAULT_THRESHOLD,))

    def dermcam_scores(name: str, a: np.ndarray, copy: dict[str, np.ndarray], note: str) -> Scores:
        start = time.perf_counter()
        pairs, dist = fp.near_duplicate_pairs(a, threshold=cap)
        keep = negative_mask(lesions, pairs[:, 0], pairs[:, 1])
        return Scores(name, dct_thresholds, {k: fp.paired_distances(a[planted], c)[:, None] for k, c in copy.items()},
                      pairs[keep, 0], pairs[keep, 1], dist[keep][:, None], n / seconds,
                      note=f"{note}; pair search of all {n} images: {time.perf_counter() - start:.1f} s",
                      same_lesion_matched=int((~keep & (dist <= fp.DEFAULT_THRESHOLD)).sum()),
                      all_pairs=pairs, all_d=dist)

    main = dermcam_scores("dermcam fingerprint (colour DCT, 8 orientations, crops, colour check)", fps, copy_fps,
                          "the method as shipped")
    all_scores.append(main)
    all_scores.append(dermcam_scores("dermcam fingerprint without the colour check", without_colour(fps),
                                     {k: without_colour(c) for k, c in copy_fps.items()}, "colour row zeroed"))
    whole = dct_whole_distances(fps, fps)
    wi, wj = np.nonzero(np.triu(whole <= cap, 1))
    keep = negative_mask(lesions, wi, wj)
    all_scores.append(Scores("dermcam fingerprint without crops (whole view, colour check)", dct_thresholds,
                             {k: np.diag(dct_whole_distances(fps[planted], c))[:, None] for k, c in copy_fps.items()},
                             wi[keep], wj[keep], whole[wi[keep], wj[keep]][:, None], n / seconds,
                             note="same fingerprints, rows 1-10 (crops) unused"))

    # imagehash pHash, 64 and 256 bits, 8 orientations on one side
    for size, thresholds in ((8, list(range(0, 21))), (16, list(range(0, 101, 2)))):
        bits, seconds = timed_map(lambda im, s=size: phash_bits(im, s, True), images)
        originals = words(np.stack(bits))
        copy_words = {k: words(np.stack([phash_bits(im, size, False) for im in v])) for k, v in copies.items()}
        all_scores.append(hash_scores(f"pHash {size * size} bits (imagehash), 8 orientations", originals, copy_words,
                                      planted, lesions, thresholds, n / seconds))
        if size == 16:
            colour, colour_s = timed_map(colorhash_bits, images)
            colour = words(np.stack(colour))
            copy_colour = {k: words(np.stack([colorhash_bits(im) for im in v])) for k, v in copies.items()}
            ph = all_scores[-1]
            c_dist = np.bitwise_count(colour[ph.neg_i] ^ colour[ph.neg_j]).sum(-1)
            pos = {k: np.concatenate([ph.positives[k], np.bitwise_count(colour[planted] ^ copy_colour[k])
                                      .sum(-1)[:, None].astype(np.float32)], axis=1) for k in KINDS}
            all_scores.append(Scores("pHash 256 bits and colorhash 42 bits (imagehash), both within", [
                (float(t1), float(t2)) for t1 in thresholds for t2 in range(0, 15)], pos, ph.neg_i, ph.neg_j,
                np.stack([ph.neg_d[:, 0], c_dist.astype(np.float32)], axis=1), n / (seconds + colour_s)))

    if args.cnn_originals:  # a random subset of the planted originals, and random other images
        chosen = np.sort(rng.choice(len(planted), size=min(args.cnn_originals, len(planted)), replace=False))
        order = np.concatenate([planted[chosen], rng.permutation(np.setdiff1d(np.arange(n), planted))])
        others = min(args.cnn_negatives, n - len(planted))
        cnn = cnn_scores([images[k] for k in order], {k: [v[c] for c in chosen] for k, v in copies.items()},
                         lesions[order], len(chosen), others, args.cnn_size, args.smoke)
        cnn.neg_i, cnn.neg_j = order[cnn.neg_i], order[cnn.neg_j]
        all_scores.append(cnn)

    # fingerprinting the cover-cropped cache row instead of the decoded image: what rotations do to it
    def cache_row(im: Image.Image) -> np.ndarray:
        # geometry.cover_resize, its box clamped into the image: cover_box can come out 1e-14 outside it
        # (a 103x78 photo), which Pillow refuses (reported; not this benchmark's to fix)
        left, top, right, bottom = cover_box(im.size, DEFAULT_CACHE_SIZE)
        box = (max(0.0, left), max(0.0, top), min(float(im.width), right), min(float(im.height), bottom))
        return fp.fingerprint(im.resize(DEFAULT_CACHE_SIZE, Image.Resampling.BICUBIC, box=box))

    row_fps = np.stack([cache_row(images[k]) for k in planted])
    cache_recall = {k: float((fp.paired_distances(row_fps, np.stack([cache_row(im) for im in v]))
                              <= fp.DEFAULT_THRESHOLD).mean()) for k, v in copies.items()}

    excluded_pairs = {(min(a, b), max(a, b)) for a, b in CONFIRMED_DUPLICATES}
    rows, details = [], {}
    for scores in all_scores:
        excluded = np.array([(min(ids[a], ids[b]), max(ids[a], ids[b])) in excluded_pairs
                             for a, b in zip(scores.neg_i, scores.neg_j)], dtype=bool).reshape(-1)
        pairs_total = scores.subset["negative_pairs"] if scores.subset else n_negative
        points = operating_points(scores, pairs_total, excluded)
        best = choose(points)
        worst = min(best["recall"], key=best["recall"].get)
        rows.append({"method": scores.name, "threshold": best["threshold"], "images/s": scores.images_s,
                     "min_recall": best["min_recall"], "worst_kind": worst, "false_pairs": best["false_pairs"],
                     "false_per_10k": best["false_per_10k"],
                     "goals_met": bool(best["min_recall"] >= GOAL_RECALL and best["false_per_10k"] <= GOAL_FP_PER_10K
                                       and scores.images_s >= GOAL_IMAGES_S)})
        details[scores.name] = {"chosen": {k: v for k, v in best.items() if not k.startswith("_")},
                                "false_by_class": class_split(best["_false"], scores, labels),
                                "negative_pairs": pairs_total, "note": scores.note, "subset": scores.subset,
                                "sweep": [{k: v for k, v in p.items() if not k.startswith("_")} for p in points
                                          if len(scores.thresholds[0]) == 1]}

    print_recall(rows, details)
    default = next(p for p in operating_points(main, n_negative, np.zeros(len(main.neg_i), bool))
                   if p["threshold"] == fp.DEFAULT_THRESHOLD)
    order = np.argsort(main.neg_d[:, 0])
    closest = [(int(main.neg_i[k]), int(main.neg_j[k]), float(main.neg_d[k, 0])) for k in order[:args.list]]
    listed = [{"a": ids[i], "b": ids[j], "classes": [labels[i], labels[j]], "distance": round(d, 4),
               "excluded": CONFIRMED_DUPLICATES.get((ids[i], ids[j])) or CONFIRMED_DUPLICATES.get((ids[j], ids[i]))}
              for i, j, d in closest]
    if args.sheet:
        contact_sheet(args.sheet, images, [(i, j, d, "(excluded)" if e["excluded"] else "")
                                            for (i, j, d), e in zip(closest[:args.sheet_pairs], listed)], ids, labels)
        print(f"contact sheet: {args.sheet}")
    groups = {"every_pair": near_duplicate_groups(main, lesions, False),
              "mutual_nearest": near_duplicate_groups(main, lesions, True)}
    kinds = KINDS if args.mutual_kinds == "all" else [k for k in args.mutual_kinds.split(",") if k]
    recall_mutual = {k: mutual_recall(main, fps, planted, copy_fps[k]) for k in kinds}
    extra = {
        "images": n, "planted_originals": int(len(planted)), "kinds": list(KINDS), "seed": args.seed,
        "negative_pairs": n_negative, "negative_pairs_same_class": same_class_pairs,
        "goals": {"recall": GOAL_RECALL, "false_per_10k": GOAL_FP_PER_10K, "images_s": GOAL_IMAGES_S},
        "decode_ms_per_image": decode_s / n * 1e3,
        "dermcam_default": {"threshold": fp.DEFAULT_THRESHOLD, "recall": default["recall"],
                            "min_recall": default["min_recall"],
                            "false_pairs_before_exclusions": default["false_pairs"],
                            "false_per_10k_before_exclusions": default["false_per_10k"],
                            "same_lesion_pairs_matched": main.same_lesion_matched,
                            "fingerprint_shape": list(fp.SHAPE), "fingerprint_dtype": np.dtype(fp.DTYPE).name,
                            "crop_prefilter": fp.CROP_PREFILTER, "groups": groups,
                            "mutual_rank": fp.MUTUAL_RANK, "recall_mutual_nearest": recall_mutual},
        "cache_row_recall_at_default": cache_recall,
        "confirmed_duplicates": [{"a": a, "b": b, "reason": r} for (a, b), r in CONFIRMED_DUPLICATES.items()],
        "closest_negative_pairs": listed, "methods": details,
        "machine_extra_before": before, "machine_extra_after": machine_extra(), "load_average": os.getloadavg(),
        "peak_rss_mib": peak_rss_mib(),
    }
    return {"rows": rows, "extra": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lite", type=Path, default=LITE)
    parser.add_argument("--originals", type=int, default=1000, help="images given one planted copy per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of the metadata")
    parser.add_argument("--cnn-originals", type=int, default=120, help="planted originals for the CNN (0: skip it)")
    parser.add_argument("--cnn-negatives", type=int, default=700, help="other images the CNN compares them with")
    parser.add_argument("--cnn-size", type=int, default=64, help="CNN input side (pixels)")
    parser.add_argument("--mutual-kinds", default="crop10,combined,jitter",
                        help="kinds whose recall is also measured under mutual_nearest ('all': every kind)")
    parser.add_argument("--sheet", type=Path, default=None, help="PNG of the closest negative pairs")
    parser.add_argument("--sheet-pairs", type=int, default=24)
    parser.add_argument("--list", type=int, default=40, help="closest negative pairs listed in the results")
    parser.add_argument("--smoke", action="store_true", help="synthetic images, every step, nothing written")
    args = parser.parse_args()
    if args.smoke:
        from dermcam.data.synthetic import write_synthetic_ham10000

        with tempfile.TemporaryDirectory() as tmp:
            args.lite = write_synthetic_ham10000(Path(tmp) / "synth", n_lesions_per_class=3, images_per_lesion=(1, 2))
            args.originals, args.cnn_originals, args.cnn_negatives, args.cnn_size = 4, 2, 3, 32
            result = run(args)
        print(json.dumps(result["rows"], default=str))
        return
    result = run(args)
    report("duplicates", result["rows"], result["extra"])


if __name__ == "__main__":
    main()
