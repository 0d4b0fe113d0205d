"""Stage 2: validate and normalise raw records; every record is either kept or quarantined with a reason.

Rules, in order: the image must decode, be no bomb and not too small (it is converted to RGB with
EXIF orientation applied); question and answer are NFC-normalised, must be non-empty and free of
control characters, and the answer is normalised as the VQA evaluation does; an exact duplicate
(same image bytes and same question) is dropped; each image gets one split, the record's own or a
stable hash of the image bytes, and a record that contradicts its image's split is rejected.
"""

from __future__ import annotations

import hashlib
import io
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from vlmtune import formats
from vlmtune.answers import answer_type, normalize_answer, normalize_text, question_type
from vlmtune.config import CleanConfig
from vlmtune.ingest import resolve_inside
from vlmtune.quarantine import QuarantineLog


def clean_drop(raw_dir: Path, drop_dir: Path, out_dir: Path, config: CleanConfig) -> dict[str, Any]:
    """Write `clean_samples.parquet` and `quarantine.parquet` (raw rejections included); return counts.

    `n_in` counts every record of the drop, so `n_in == n_kept + n_quarantined` holds across both stages.
    """
    raw = pq.read_table(Path(raw_dir) / formats.RAW_SAMPLES_FILE).to_pylist()
    raw_quarantine = pq.read_table(Path(raw_dir) / formats.QUARANTINE_FILE)
    quarantine = QuarantineLog(stage="clean_samples")
    images = _ImageCache(Path(drop_dir).resolve(), config)
    kept, seen_pairs, image_split = [], set(), {}

    for row in raw:
        def reject(reason: str, detail: str = "") -> None:
            quarantine.add(drop=row["drop"], file=formats.ANNOTATIONS_FILE, line=row["line"], reason=reason, detail=detail, record=row["record"])

        image, problem = images.load(row["image"], row["image_sha256"])
        if image is None:
            reject(*problem)
            continue
        question, answer_raw = normalize_text(row["question"]), normalize_text(row["answer"])
        if not question:
            reject(formats.EMPTY_QUESTION)
            continue
        if not answer_raw:
            reject(formats.EMPTY_ANSWER)
            continue
        if _has_control_characters(question) or _has_control_characters(answer_raw):
            reject(formats.CONTROL_CHARACTERS)
            continue
        answer = normalize_answer(answer_raw)
        if not answer:  # e.g. an answer that was only punctuation or an article
            reject(formats.EMPTY_ANSWER, f"{answer_raw!r} normalises to nothing")
            continue
        pair = (row["image_sha256"], question.lower())
        if pair in seen_pairs:
            reject(formats.DUPLICATE, "same image bytes and question as an earlier record")
            continue
        split = image_split.setdefault(row["image_sha256"], row["split"] or assign_split(row["image_sha256"], config.split_fractions))
        if row["split"] is not None and row["split"] != split:
            reject(formats.SPLIT_CONFLICT, f"record says {row['split']!r}; its image is already in {split!r}")
            continue
        seen_pairs.add(pair)
        kept.append(
            {
                "sample_id": row["sample_id"],
                "drop": row["drop"],
                "line": row["line"],
                "image": row["image"],
                "image_sha256": row["image_sha256"],
                "image_bytes": image.data,
                "image_width": image.width,
                "image_height": image.height,
                "question": question,
                "answer": answer,
                "answer_raw": answer_raw,
                "split": split,
                "split_source": "record" if row["split"] else "hash",
                "answer_type": row["answer_type"] or answer_type(answer),
                "question_type": row["question_type"] or question_type(question),
            }
        )

    pq.write_table(pa.Table.from_pylist(kept, schema=formats.CLEAN_SCHEMA), Path(out_dir) / formats.CLEAN_SAMPLES_FILE)
    all_quarantined = pa.concat_tables([raw_quarantine, pa.Table.from_pylist(quarantine.rows, schema=formats.QUARANTINE_SCHEMA)])
    pq.write_table(all_quarantined, Path(out_dir) / formats.QUARANTINE_FILE)
    reasons: dict[str, int] = {}
    for reason in all_quarantined.column("reason").to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    split_counts = {name: sum(1 for row in kept if row["split"] == name) for name in formats.SPLITS}
    return {
        "n_in": len(raw) + raw_quarantine.num_rows,
        "n_kept": len(kept),
        "n_quarantined": all_quarantined.num_rows,
        "quarantine_reasons": dict(sorted(reasons.items())),
        "splits": split_counts,
        "n_images": len({row["image_sha256"] for row in kept}),
        "n_images_converted": images.n_converted,
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


@dataclass(frozen=True)
class CleanImage:
    data: bytes  # encoded bytes of an RGB image (the original bytes when no conversion was needed)
    width: int
    height: int


class _ImageCache:
    """Decodes each distinct image once; many questions share an image."""

    def __init__(self, drop_dir: Path, config: CleanConfig):
        self.drop_dir, self.config = drop_dir, config
        self.by_sha: dict[str, tuple[CleanImage | None, tuple[str, str]]] = {}
        self.n_converted = 0

    def load(self, relative: str, sha256: str) -> tuple[CleanImage | None, tuple[str, str]]:
        if sha256 not in self.by_sha:
            self.by_sha[sha256] = self._decode(relative, sha256)
        return self.by_sha[sha256]

    def _decode(self, relative: str, sha256: str) -> tuple[CleanImage | None, tuple[str, str]]:
        path = resolve_inside(self.drop_dir, relative)
        if path is None or not path.is_file():
            return None, (formats.IMAGE_MISSING, f"{relative} vanished after ingestion")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            return None, (formats.IMAGE_UNREADABLE, f"{relative} changed after ingestion; re-ingest the drop")
        try:
            rgb, converted = decode_rgb(data, self.config)
        except ImageRejected as rejection:
            return None, (rejection.reason, rejection.detail)
        if converted:
            self.n_converted += 1
            buffer = io.BytesIO()
            rgb.save(buffer, format="PNG")
            data = buffer.getvalue()
        return CleanImage(data, rgb.width, rgb.height), ("", "")


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_rgb(data: bytes, config: CleanConfig) -> tuple[Image.Image, bool]:
    """Decode fully and return an RGB image, and whether it differs from the stored encoding."""
    if not data:
        raise ImageRejected(formats.IMAGE_UNREADABLE, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > config.max_image_pixels:
                raise ImageRejected(formats.DECOMPRESSION_BOMB, f"{width}x{height} exceeds {config.max_image_pixels} pixels")
            image.load()
    except ImageRejected:
        raise
    except Exception as error:  # Pillow raises many types for corrupt data
        raise ImageRejected(formats.IMAGE_UNREADABLE, f"{type(error).__name__}: {error}") from None
    if min(width, height) < config.min_image_side:
        raise ImageRejected(formats.IMAGE_TOO_SMALL, f"{width}x{height} is below {config.min_image_side} px")
    oriented = ImageOps.exif_transpose(image)
    converted = oriented is not image or image.mode != "RGB" or getattr(image, "n_frames", 1) > 1
    return _to_rgb(oriented), converted


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")  # alpha over white, not over black
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")


def _has_control_characters(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)
