"""The tiny default's pretraining corpus (generated shape scenes) and its convolutional-stem vision tower."""

import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from vlmtune.base_model import SceneQuestions
from vlmtune.config import TinyModelConfig
from vlmtune.conv_stem_vision import MODEL_TYPE, ConvStem, ConvStemVisionConfig
from vlmtune.models import build_tiny_vlm
from vlmtune.shapes import COLOR_VALUES, SHAPES, draw_scene, scene_question, scene_sample
from vlmtune.tokenization import IGNORE_INDEX


def test_a_scene_sample_is_a_pure_function_of_seed_and_index():
    first, again, other = scene_sample(3, 17), scene_sample(3, 17), scene_sample(4, 17)
    assert first["question"] == again["question"] and np.array_equal(np.asarray(first["image"]), np.asarray(again["image"]))
    assert not np.array_equal(np.asarray(first["image"]), np.asarray(other["image"]))


def test_a_scene_shows_its_shape_in_its_colour():
    rng = random.Random(0)
    for _ in range(50):
        scene = draw_scene(rng)
        pixels = np.asarray(scene.image).reshape(-1, 3).astype(int)
        assert scene.image.size == (64, 64) and scene.shape in SHAPES
        # at least a 8x8-pixel shape's worth (minus anti-aliased edges) of pixels is exactly its colour
        assert (np.abs(pixels - COLOR_VALUES[scene.color]).sum(1) == 0).sum() >= 30


@pytest.mark.parametrize("seed", range(5))
def test_answers_follow_the_scene_and_negations_flip_them(seed):
    rng = random.Random(seed)
    for _ in range(200):
        scene = draw_scene(rng)
        question, answer = scene_question(rng, scene)
        named = next((word for word in (*COLOR_VALUES, *SHAPES) if f" {word}" in f" {question.rstrip('?.')}"), None)
        if answer in ("yes", "no"):
            truth = named in (scene.color, scene.shape)
            negated = re.search(r"\b(not|no|nothing)\b", question) is not None
            assert (answer == "yes") == (truth != negated), (question, answer, scene.color, scene.shape)
        elif " " in answer:
            assert answer == f"{scene.color} {scene.shape}"
        else:
            assert answer in (scene.color, scene.shape)


def test_yes_no_questions_name_their_value_and_negate_at_many_places():
    # the tokens are bytes: a base that always met the shape word at one offset learned the offset
    offsets = {"shape": set(), "colour": set()}
    negation_offsets = set()
    for index in range(3000):
        sample = scene_sample(0, index)
        if sample["answer"] not in ("yes", "no"):
            continue
        question = sample["question"]
        for kind, words in (("shape", SHAPES), ("colour", COLOR_VALUES)):
            for word in words:
                if re.search(rf"\b{word}\b", question):
                    offsets[kind].add(question.index(word))
        if match := re.search(r"\b(not|no|nothing)\b", question):
            negation_offsets.add(match.start())
    assert len(offsets["shape"]) >= 6 and len(offsets["colour"]) >= 5 and len(negation_offsets) >= 5


def test_pretraining_never_asks_an_easy_vqa_question():
    import easy_vqa

    easy_questions = set(easy_vqa.get_train_questions()[0]) | set(easy_vqa.get_test_questions()[0])
    ours = {scene_sample(0, index)["question"] for index in range(3000)}
    assert not ours & easy_questions


def test_scene_rows_train_on_the_answer_only(tiny_processor):
    rows = SceneQuestions(tiny_processor, seed=0, size=40)
    assert len(rows) == 40
    for index in range(40):
        row = rows[index]
        labelled = [token for token in row["labels"] if token != IGNORE_INDEX]
        answer_ids = tiny_processor.tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        assert labelled == answer_ids + [tiny_processor.tokenizer.eos_token_id]
        assert row["labels"][: row["prompt_length"]] == [IGNORE_INDEX] * row["prompt_length"]
    as_bytes = rows.row(3, as_bytes=True)
    assert as_bytes["image"]["bytes"].startswith(b"\x89PNG") and as_bytes["input_ids"] == rows[3]["input_ids"]


def test_the_conv_stem_makes_one_token_per_patch():
    config = ConvStemVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8, stem_channels=16)
    stem = ConvStem(config)
    assert stem(torch.zeros(2, 3, 64, 64)).shape == (2, 32, 8, 8)
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(ConvStemVisionConfig(hidden_size=32, num_attention_heads=2, patch_size=14))


def test_the_tiny_default_saves_and_loads_through_the_auto_classes(tmp_path, tiny_processor):
    model, processor = build_tiny_vlm(TinyModelConfig())
    assert model.config.vision_config.model_type == MODEL_TYPE
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # a fresh interpreter: importing vlmtune registers the vision tower, nothing else is needed (no remote code)
    script = (
        "import sys, torch, vlmtune.conv_stem_vision\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, local_files_only=True)\n"
        "print(type(m.model.vision_tower).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["ConvStemVisionModel", str(sum(p.numel() for p in model.parameters()))]


def test_the_linear_patch_embedding_stays_available_and_a_typo_is_refused():
    import dataclasses

    model, _ = build_tiny_vlm(dataclasses.replace(TinyModelConfig(), vision_stem="patch"))
    assert model.config.vision_config.model_type == "clip_vision_model"
    with pytest.raises(ValueError, match="vision_stem"):
        build_tiny_vlm(dataclasses.replace(TinyModelConfig(), vision_stem="Conv"))
