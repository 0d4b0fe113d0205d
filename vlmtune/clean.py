"""Stage 2: validate and normalise raw records; every record is either kept or quarantined with a reason.

Rules, in order: the image must decode, be no bomb and not too small (it is converted to RGB with
EXIF orientation applied; an animation keeps its first frame); question and answer are
NFC-normalised, must be non-empty, free of control characters and within the text budget, and
answers are normalised as the VQA evaluation does; an exact duplicate (same image bytes and
question) and a near duplicate (same question on a near-identical image) are dropped; each image
gets one split, the record's own or a stable hash of the image (near-identical images share it),
and a record that contradicts its image's split is rejected. Last, a train or validation image
near-identical to a test image is quarantined as `test_leakage`.

Distinct images are decoded in parallel with `datasets.map(num_proc=...)`, each read from disk by
the worker that decodes it; the records themselves are plain string work in one process.
"""

from __future__ import annotations

import hashlib
import io
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from vlmtune import formats
from vlmtune.answers import answer_type, normalize_answer, normalize_text, question_type
from vlmtune.config import CleanConfig
from vlmtune.ingest import operational_errors, resolve_inside
from vlmtune.near_duplicates import image_fingerprint, near_matches
from vlmtune.quarantine import QuarantineLog

WRITE_BATCH_ROWS = 4096
_MIN_IMAGES_PER_PROCESS = 256  # below this, starting worker processes costs more than it saves
_DECODED_FEATURES = datasets.Features(
    {
        "data": datasets.Value("binary"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "reason": datasets.Value("string"),
        "detail": datasets.Value("string"),
        "phash": datasets.Value("string"),
        "colors": datasets.Value("binary"),
        "converted": datasets.Value("bool"),
        "first_frame": datasets.Value("bool"),
    }
)


def clean_drop(raw_dir: Path, drop_dir: Path, out_dir: Path, config: CleanConfig) -> dict[str, Any]:
    """Write `clean_samples.parquet` and `quarantine.parquet` (raw rejections included); return counts.

    `n_in` counts every sample of the drop, so `n_in == n_kept + n_quarantined` holds across both stages.
    """
    raw_dir, drop_dir, out_dir = Path(raw_dir), Path(drop_dir).resolve(), Path(out_dir)
    with operational_errors(f"cleaning {raw_dir}"):
        raw = pq.read_table(raw_dir / formats.RAW_SAMPLES_FILE).to_pylist()
        raw_quarantine = pq.read_table(raw_dir / formats.QUARANTINE_FILE)
        images = decode_images(_distinct_images(raw, raw_dir, drop_dir), config)
        quarantine = QuarantineLog(stage="clean_samples")
        kept = _apply_rules(raw, images, config, quarantine)
        _write_clean(kept, images, out_dir / formats.CLEAN_SAMPLES_FILE)
        all_quarantined = pa.concat_tables([raw_quarantine, pa.Table.from_pylist(quarantine.rows, schema=formats.QUARANTINE_SCHEMA)])
        pq.write_table(all_quarantined, out_dir / formats.QUARANTINE_FILE)
    reasons = Counter(all_quarantined.column("reason").to_pylist())
    kept_images = {row["image_sha256"] for row in kept}
    return {
        "n_in": len(raw) + raw_quarantine.num_rows,
        "n_kept": len(kept),
        "n_quarantined": all_quarantined.num_rows,
        "quarantine_reasons": dict(sorted(reasons.items())),
        "splits": {name: sum(1 for row in kept if row["split"] == name) for name in formats.SPLITS},
        "n_images": len(kept_images),
        "n_images_converted": sum(images.converted[images.index[sha]] for sha in kept_images),
        "n_first_frames_of_animations": sum(images.first_frame[images.index[sha]] for sha in kept_images),
    }


def assign_split(image_sha256: str, fractions: tuple[float, float, float]) -> str:
    """A split drawn from the image hash: stable across runs and drops, the same for every record of an image."""
    bucket = int(hashlib.sha256(("split:" + image_sha256).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    total = sum(fractions)
    cumulative = 0.0
    for name, fraction in zip(formats.SPLITS, fractions):
        cumulative += fraction / total
        if bucket < cumulative:
            return name
    return formats.SPLITS[-1]


@dataclass
class DecodedImages:
    """One entry per distinct image (by sha256), in order of first appearance; columns of `_DECODED_FEATURES`."""

    index: dict[str, int]
    table: pa.Table  # memory-mapped by `datasets`; image bytes are taken from it when the output is written
    reason: list[str]
    detail: list[str]
    phash: list[str]
    colors: list[bytes]
    converted: list[bool]
    first_frame: list[bool]
    representative: list[int]  # the first near-identical image of the drop (itself when none)


def decode_images(distinct: dict[str, str | None], config: CleanConfig) -> DecodedImages:
    """Decode every distinct image once (many questions share one), in `config.num_proc` processes."""
    shas = list(distinct)
    source = datasets.Dataset.from_dict({"image_sha256": shas, "path": list(distinct.values())})
    num_proc = config.num_proc if config.num_proc > 1 and len(shas) >= _MIN_IMAGES_PER_PROCESS * config.num_proc else None
    if shas:
        decoded = source.map(
            _decode_batch, batched=True, batch_size=64, num_proc=num_proc, fn_kwargs={"config": config},
            remove_columns=source.column_names, features=_DECODED_FEATURES, desc="decoding images",
        )
        table = decoded.data.table
    else:
        table = _DECODED_FEATURES.arrow_schema.empty_table()
    columns = {name: table.column(name).to_pylist() for name in ("reason", "detail", "phash", "colors", "converted", "first_frame")}
    valid = [i for i, reason in enumerate(columns["reason"]) if not reason]
    earlier = near_matches(
        [columns["phash"][i] for i in valid], [columns["colors"][i] for i in valid],
        [columns["phash"][i] for i in valid], [columns["colors"][i] for i in valid],
        config.near_duplicate_distance, config.near_duplicate_color_tolerance, earlier_only=True,
    )
    representative = list(range(len(shas)))
    for position, match in enumerate(earlier):
        if match >= 0:  # matches point earlier, so the earlier image's representative is already final
            representative[valid[position]] = representative[valid[match]]
    return DecodedImages({sha: i for i, sha in enumerate(shas)}, table, representative=representative, **columns)


def _distinct_images(raw: list[dict[str, Any]], raw_dir: Path, drop_dir: Path) -> dict[str, str | None]:
    """sha256 -> the file to decode; drop paths are re-checked against the drop, embedded ones live beside the raw table."""
    distinct: dict[str, str | None] = {}
    for row in raw:
        if row["image_sha256"] not in distinct:
            path = raw_dir / row["image"] if row["image_embedded"] else resolve_inside(drop_dir, row["image"])
            distinct[row["image_sha256"]] = str(path) if path is not None else None
    return distinct


def _apply_rules(raw: list[dict[str, Any]], images: DecodedImages, config: CleanConfig, quarantine: QuarantineLog) -> list[dict[str, Any]]:
    candidates, seen_pairs, seen_near_pairs, image_split = [], set(), set(), {}
    shas = list(images.index)

    def reject(row: dict[str, Any], reason: str, detail: str = "") -> None:
        quarantine.add(drop=row["drop"], file=row["file"] or formats.ANNOTATIONS_FILE, line=row["line"], reason=reason, detail=detail, record=row["record"])

    for row in raw:
        image = images.index[row["image_sha256"]]
        if images.reason[image]:
            reject(row, images.reason[image], images.detail[image])
            continue
        question, answer_raw = normalize_text(row["question"]), normalize_text(row["answer"])
        problem = _text_problem(question, answer_raw, row["history"], config)
        if problem:
            reject(row, *problem)
            continue
        answer = normalize_answer(answer_raw)
        if not answer:  # e.g. an answer that was only punctuation or an article
            reject(row, formats.EMPTY_ANSWER, f"{answer_raw!r} normalises to nothing")
            continue
        representative = shas[images.representative[image]]
        pair = (row["image_sha256"], question.lower(), row["history"])
        near_pair = (representative, question.lower(), row["history"])
        if pair in seen_pairs:
            reject(row, formats.DUPLICATE, "same image bytes and question as an earlier record")
            continue
        if near_pair in seen_near_pairs:
            reject(row, formats.NEAR_DUPLICATE, f"same question on an image near-identical to {representative[:12]}")
            continue
        default_split = image_split.get(representative) or assign_split(representative, config.split_fractions)
        split = image_split.setdefault(row["image_sha256"], row["split"] or default_split)
        if row["split"] is not None and row["split"] != split:
            reject(row, formats.SPLIT_CONFLICT, f"record says {row['split']!r}; its image is already in {split!r}")
            continue
        seen_pairs.add(pair)
        seen_near_pairs.add(near_pair)
        answers = [normalize_answer(normalize_text(text)) for text in row["answers"]] if row["answers"] else None
        candidates.append(
            {
                "sample_id": row["sample_id"],
                "drop": row["drop"],
                "line": row["line"],
                "image": row["image"],
                "image_sha256": row["image_sha256"],
                "image_width": None,  # filled from the decoded table when written
                "image_height": None,
                "question": question,
                "answer": answer,
                "answer_raw": answer_raw,
                "split": split,
                "split_source": "record" if row["split"] else "hash",
                "answer_type": row["answer_type"] or answer_type(answer),
                "question_type": row["question_type"] or question_type(question),
                "file": row["file"],
                "answers": answers,
                "history": row["history"],
                "image_phash": images.phash[image],
                "image_colors": images.colors[image],
                "first_frame_of_animation": images.first_frame[image],
                "_record": row["record"],
            }
        )
    leaked = _near_test_images(image_split, images, config)
    kept = []
    for row in candidates:
        record = row.pop("_record")
        if row["image_sha256"] in leaked:
            reject({**row, "record": record}, formats.TEST_LEAKAGE, f"image near-identical to test image {leaked[row['image_sha256']][:12]}, was {row['split']}")
        else:
            kept.append(row)
    return kept


def _near_test_images(image_split: dict[str, str], images: DecodedImages, config: CleanConfig) -> dict[str, str]:
    """Train / validation images near-identical to a test image of this drop -> that test image."""
    test = [sha for sha, split in image_split.items() if split == "test"]
    others = [sha for sha, split in image_split.items() if split != "test"]
    at = images.index
    matches = near_matches(
        [images.phash[at[sha]] for sha in others], [images.colors[at[sha]] for sha in others],
        [images.phash[at[sha]] for sha in test], [images.colors[at[sha]] for sha in test],
        config.near_duplicate_distance, config.near_duplicate_color_tolerance,
    )
    return {sha: test[match] for sha, match in zip(others, matches) if match >= 0}


def _text_problem(question: str, answer: str, history: str | None, config: CleanConfig) -> tuple[str, str] | None:
    if not question:
        return formats.EMPTY_QUESTION, ""
    if not answer:
        return formats.EMPTY_ANSWER, ""
    if _has_control_characters(question) or _has_control_characters(answer):
        return formats.CONTROL_CHARACTERS, ""
    length = len(question) + len(answer) + len(history or "")
    if length > config.max_text_chars:
        return formats.TOO_LONG, f"{length} characters of text; budget {config.max_text_chars}"
    return None


def _write_clean(kept: list[dict[str, Any]], images: DecodedImages, path: Path) -> None:
    """Written in batches, each taking its image bytes from the decoded table, so all bytes are never in Python at once."""
    with pq.ParquetWriter(path, formats.CLEAN_SCHEMA) as writer:
        for start in range(0, max(len(kept), 1), WRITE_BATCH_ROWS):
            batch = kept[start : start + WRITE_BATCH_ROWS]
            rows = [images.index[row["image_sha256"]] for row in batch]
            decoded = images.table.take(pa.array(rows, type=pa.int64()))
            columns = pa.Table.from_pylist(batch, schema=formats.CLEAN_SCHEMA.remove(formats.CLEAN_SCHEMA.get_field_index("image_bytes")))
            columns = columns.set_column(columns.schema.get_field_index("image_width"), "image_width", decoded.column("width"))
            columns = columns.set_column(columns.schema.get_field_index("image_height"), "image_height", decoded.column("height"))
            columns = columns.append_column("image_bytes", decoded.column("data"))
            writer.write_table(columns.select(formats.CLEAN_SCHEMA.names).cast(formats.CLEAN_SCHEMA))


def _decode_batch(batch: dict[str, list], config: CleanConfig) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in _DECODED_FEATURES}
    for sha256, path in zip(batch["image_sha256"], batch["path"]):
        result = _decode_one(path, sha256, config)
        for name in out:
            out[name].append(result.get(name))
    return out


def _decode_one(path: str | None, sha256: str, config: CleanConfig) -> dict[str, Any]:
    def rejected(reason: str, detail: str) -> dict[str, Any]:
        return {"reason": reason, "detail": detail, "converted": False, "first_frame": False}

    if path is None or not Path(path).is_file():
        return rejected(formats.IMAGE_MISSING, f"{path} vanished after ingestion")
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        return rejected(formats.IMAGE_UNREADABLE, f"{path} changed after ingestion; re-ingest the drop")
    try:
        rgb, converted, first_frame = decode_rgb(data, config)
    except ImageRejected as rejection:
        return rejected(rejection.reason, rejection.detail)
    if converted:
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        data = buffer.getvalue()
    phash, colors = image_fingerprint(rgb)
    return {"data": data, "width": rgb.width, "height": rgb.height, "reason": "", "detail": "", "phash": phash,
            "colors": colors, "converted": converted, "first_frame": first_frame}


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_rgb(data: bytes, config: CleanConfig) -> tuple[Image.Image, bool, bool]:
    """Decode fully: the RGB image, whether it differs from the stored encoding, and whether it was animated."""
    if not data:
        raise ImageRejected(formats.IMAGE_UNREADABLE, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > config.max_image_pixels:
                raise ImageRejected(formats.DECOMPRESSION_BOMB, f"{width}x{height} exceeds {config.max_image_pixels} pixels")
            image.load()  # the first frame of an animation
    except ImageRejected:
        raise
    except Image.DecompressionBombError as error:  # Pillow refuses twice its own limit before we see the size
        raise ImageRejected(formats.DECOMPRESSION_BOMB, str(error)) from None
    except Exception as error:  # Pillow raises many types for corrupt data
        raise ImageRejected(formats.IMAGE_UNREADABLE, f"{type(error).__name__}: {error}") from None
    if min(width, height) < config.min_image_side:
        raise ImageRejected(formats.IMAGE_TOO_SMALL, f"{width}x{height} is below {config.min_image_side} px")
    first_frame = getattr(image, "n_frames", 1) > 1
    oriented = ImageOps.exif_transpose(image)
    converted = oriented is not image or image.mode != "RGB" or first_frame
    return _to_rgb(oriented), converted, first_frame


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")  # alpha over white, not over black
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit and float images: scale to 8 bits rather than clip (a plain convert("L") saturates at 255)
        image = image.convert("I").point(lambda value: value / 256).convert("L") if image.mode != "F" else image.convert("L")
    return image.convert("RGB")


def _has_control_characters(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)
