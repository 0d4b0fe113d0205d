"""Image rules on small real files: bombs, modes, EXIF orientation, animations, near duplicates and test leakage."""

import io
import struct
import zlib

import pytest
from PIL import Image

from conftest import png_bytes
from test_ingest_clean import reasons_by_line, run_stages
from vlmtune import formats
from vlmtune.config import CleanConfig, TokenizeConfig
from vlmtune.tokenization import assemble_splits, tokenize_drop


def png_header_only(width, height) -> bytes:
    """A PNG whose header claims `width` x `height` and carries no pixels: what a decompression bomb looks like before decoding."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def encoded(image, fmt="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def shape(color, size=64, background=(255, 255, 255)) -> Image.Image:
    """A square and a bar on a background: enough structure for a perceptual hash to tell shapes apart."""
    image = Image.new("RGB", (size, size), background)
    scale = size / 64
    image.paste(color, [int(v * scale) for v in (8, 8, 36, 36)])
    image.paste(color, [int(v * scale) for v in (40, 20, 56, 60)])
    return image


def kept_image(row) -> Image.Image:
    return Image.open(io.BytesIO(row["image_bytes"]))


def test_decompression_bombs_are_quarantined_from_the_header_alone(make_drop, tmp_path):
    drop = make_drop(
        images={"images/over_ours.png": png_header_only(10_000, 10_000), "images/over_pillows.png": png_header_only(20_000, 20_000)},
        records=[
            {"image": "images/over_ours.png", "question": "q1?", "answer": "x"},  # 100 M pixels: above the 89.5 M default
            {"image": "images/over_pillows.png", "question": "q2?", "answer": "x"},  # 400 M: Pillow itself refuses to open it
        ],
    )
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert reasons_by_line(quarantined) == {1: formats.DECOMPRESSION_BOMB, 2: formats.DECOMPRESSION_BOMB}
    assert CleanConfig().max_image_pixels == 89_478_485


def test_every_mode_becomes_rgb_and_exif_orientation_is_applied(make_drop, tmp_path):
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    drop = make_drop(
        images={
            "images/cmyk.jpg": encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
            "images/rotated.jpg": encoded(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif.tobytes()),
            "images/palette.png": encoded(palette),
            "images/la.png": encoded(Image.new("LA", (16, 16), (0, 0))),
            "images/sixteen_bit.png": encoded(Image.new("I;16", (16, 16), 65535)),
        },
        records=[{"image": f"images/{name}", "question": f"q{i}?", "answer": "x"} for i, name in
                 enumerate(["cmyk.jpg", "rotated.jpg", "palette.png", "la.png", "sixteen_bit.png"], start=1)],
    )
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert quarantined == []
    images = {row["line"]: kept_image(row) for row in kept}
    assert {image.mode for image in images.values()} == {"RGB"}
    assert images[1].getpixel((8, 8)) == pytest.approx((255, 0, 0), abs=8)  # CMYK (0, 255, 255, 0) is red
    assert images[2].size == (20, 40) and (kept[1]["image_width"], kept[1]["image_height"]) == (20, 40)
    assert images[3].getpixel((0, 0)) == (0, 0, 255)
    assert images[4].getpixel((0, 0)) == (255, 255, 255)  # fully transparent black over white
    assert images[5].getpixel((0, 0)) == (255, 255, 255)  # 16-bit white stays white, not clipped
    assert summary["n_images_converted"] == 5


def test_an_animation_keeps_its_first_frame_and_says_so(make_drop, tmp_path):
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    animation = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    drop = make_drop(images={"images/anim.gif": animation, "images/still.png": png_bytes()},
                     records=[{"image": "images/anim.gif", "question": "q?", "answer": "x"},
                              {"image": "images/still.png", "question": "q?", "answer": "x"}])
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert [row["first_frame_of_animation"] for row in kept] == [True, False]
    assert kept_image(kept[0]).getpixel((8, 8)) == pytest.approx((255, 0, 0), abs=8)
    assert summary["n_first_frames_of_animations"] == 1


def test_near_duplicates_and_test_leakage_within_a_drop(make_drop, tmp_path):
    red = shape((200, 30, 30))
    drop = make_drop(
        images={
            "images/red.png": encoded(red),
            "images/red_recompressed.jpg": encoded(red, "JPEG", quality=90),  # other bytes, same picture
            "images/grey.png": encoded(shape((128, 128, 128))),  # same layout in another colour: a different picture
            "images/red_large.png": encoded(red.resize((96, 96))),
            "images/other.png": encoded(Image.new("RGB", (64, 64), (0, 0, 200))),
        },
        records=[
            {"image": "images/red.png", "question": "What colour?", "answer": "red", "split": "train"},  # 1 leaks: 4 is test
            {"image": "images/red_recompressed.jpg", "question": "what colour?", "answer": "red"},  # 2 near duplicate of 1
            {"image": "images/grey.png", "question": "What colour?", "answer": "grey", "split": "train"},  # 3 kept
            {"image": "images/red_large.png", "question": "What shape?", "answer": "square", "split": "test"},  # 4 kept
            {"image": "images/other.png", "question": "What colour?", "answer": "blue", "split": "train"},  # 5 kept
        ],
    )
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert reasons_by_line(quarantined) == {1: formats.TEST_LEAKAGE, 2: formats.NEAR_DUPLICATE}
    assert [row["line"] for row in kept] == [3, 4, 5]
    assert all(len(row["image_phash"]) == 16 and len(row["image_colors"]) == 192 for row in kept)
    # The thresholds are what decide: with no tolerance at all, the resized copy is a different image.
    strict = run_stages(drop, tmp_path / "strict", CleanConfig(near_duplicate_distance=0, near_duplicate_color_tolerance=0))[2]
    assert formats.TEST_LEAKAGE not in {row["reason"] for row in strict}


def test_text_over_the_budget_is_quarantined(make_drop, tmp_path):
    drop = make_drop(images={"images/a.png": png_bytes()},
                     records=[{"image": "images/a.png", "question": "why" * 40 + "?", "answer": "x"},
                              {"image": "images/a.png", "question": "why?", "answer": "x"}])
    summary, kept, quarantined = run_stages(drop, tmp_path, CleanConfig(max_text_chars=50))
    assert reasons_by_line(quarantined) == {1: formats.TOO_LONG}


def test_test_leakage_and_duplicates_across_drops(make_drop, tiny_processor, tmp_path):
    red = shape((200, 30, 30))
    train = make_drop("train-drop", images={"images/red.png": encoded(red), "images/blue.png": encoded(shape((0, 0, 200)))},
                      records=[{"image": "images/red.png", "question": "What colour?", "answer": "red", "split": "train"},
                               {"image": "images/blue.png", "question": "What colour?", "answer": "blue", "split": "train"}])
    later = make_drop("z-later-drop", images={"images/red_copy.jpg": encoded(red, "JPEG", quality=90), "images/blue.png": encoded(shape((0, 0, 200)))},
                      records=[{"image": "images/red_copy.jpg", "question": "What shape?", "answer": "square", "split": "test"},
                               {"image": "images/blue.png", "question": "what colour?", "answer": "blue", "split": "train"}])
    shards = []
    for drop in (train, later):
        run_stages(drop, tmp_path / drop.name)
        shard = tmp_path / drop.name / "shard"
        shard.mkdir()
        tokenize_drop(tmp_path / drop.name / "clean", tiny_processor, shard, TokenizeConfig())
        shards.append(shard)
    out = tmp_path / "assembled"
    out.mkdir()
    summary = assemble_splits(shards, out)
    assert summary["splits"] == {"train": 1, "validation": 0, "test": 1}
    assert summary["quarantine_reasons"] == {formats.DUPLICATE: 1, formats.TEST_LEAKAGE: 1}
    from conftest import read_rows

    by_reason = {row["reason"]: row for row in read_rows(out / formats.QUARANTINE_FILE)}
    assert by_reason[formats.TEST_LEAKAGE]["drop"] == "train-drop" and "near-identical" in by_reason[formats.TEST_LEAKAGE]["detail"]
    assert by_reason[formats.DUPLICATE]["drop"] == "z-later-drop"
