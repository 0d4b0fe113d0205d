"""Stage 3: turn clean samples into an Arrow dataset of token ids with prompt-masked labels.

Each drop is tokenized once into its own shard (keyed by the drop's clean version and the
processor), and the train / validation / test splits are assembled from shards, so a new drop
costs only its own tokenization. Images stay encoded bytes (`datasets.Image`); pixels are made
in the collator, so the dataset stays near the size of its source images.

The processor expands the image placeholder into the model's image tokens, so the prompt length
is measured after expansion. A sample over `max_length` is quarantined with its length rather
than truncated: cutting image tokens breaks the model's input and cutting the answer trains on
nothing (TRL #5904, LLaMA-Factory #7363).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from vlmtune import families, formats
from vlmtune.artifacts import fingerprint
from vlmtune.config import CleanConfig, TokenizeConfig
from vlmtune.near_duplicates import near_matches
from vlmtune.quarantine import QuarantineLog

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips
TOKENIZED_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("string"),
        "drop": datasets.Value("string"),
        "split": datasets.Value("string"),
        "image_sha256": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "prompt_length": datasets.Value("int32"),
        "answers": datasets.List(datasets.Value("string")),  # all human answers (VQAv2: ten), for the official VQA accuracy
        "history": datasets.Value("string"),  # earlier turns of a conversation as JSON; not yet part of the prompt
        "image_phash": datasets.Value("string"),
        "image_colors": datasets.Value("binary"),
    }
)


def tokenize_drop(clean_dir: Path, processor, out_dir: Path, config: TokenizeConfig) -> dict[str, Any]:
    """Tokenize one drop's clean samples into an Arrow shard at `out_dir/shard`; return counts."""
    table = pq.read_table(Path(clean_dir) / formats.CLEAN_SAMPLES_FILE)
    rows = table.to_pylist()
    quarantine = QuarantineLog(stage="tokenized_dataset")
    encoded = []
    batch_size = 256
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        for row, example in zip(batch, encode_batch(processor, [r["question"] for r in batch], [r["answer"] for r in batch], [r["image_bytes"] for r in batch])):
            if len(example["input_ids"]) > config.max_length:
                quarantine.add(
                    drop=row["drop"], file=formats.CLEAN_SAMPLES_FILE, line=row["line"], reason=formats.TOO_LONG,
                    detail=f"{len(example['input_ids'])} tokens after the processor; budget {config.max_length}",
                    record=row["sample_id"],
                )
                continue
            encoded.append(
                {
                    "sample_id": row["sample_id"],
                    "drop": row["drop"],
                    "split": row["split"],
                    "image_sha256": row["image_sha256"],
                    "image": {"bytes": row["image_bytes"], "path": None},
                    "question": row["question"],
                    "answer": row["answer"],
                    "answer_type": row["answer_type"],
                    "question_type": row["question_type"],
                    "answers": row.get("answers"),
                    "history": row.get("history"),
                    "image_phash": row.get("image_phash"),
                    "image_colors": row.get("image_colors"),
                    **example,
                }
            )
    shard = dataset_from_rows(encoded)
    save_dataset(shard, Path(out_dir) / "shard")
    quarantine.write(Path(out_dir) / formats.QUARANTINE_FILE)
    return {
        "n_in": len(rows),
        "n_kept": len(encoded),
        "n_quarantined": len(quarantine),
        "quarantine_reasons": quarantine.counts(),
        "n_tokens": sum(len(example["input_ids"]) for example in encoded),
        "n_label_tokens": sum(sum(1 for label in example["labels"] if label != IGNORE_INDEX) for example in encoded),
    }


def assemble_splits(shard_dirs: list[Path], out_dir: Path, config: CleanConfig = CleanConfig()) -> dict[str, Any]:
    """Concatenate drop shards into a train / validation / test `DatasetDict` saved at `out_dir/dataset`.

    Across drops: a train or validation image that is, or is near-identical to, an image in the
    test split anywhere is quarantined as `test_leakage`, so no image is both trained on and
    tested on; a question asked again in a later drop on the same image (`duplicate`) or on a
    near-identical one (`near_duplicate`) is quarantined too. The near-duplicate thresholds are
    `config`'s (CleanConfig). Work is on Arrow columns, so adding a small drop costs little more
    than writing the splits.
    """
    shards = [datasets.load_from_disk(str(Path(path) / "shard")) for path in shard_dirs]
    table = pa.concat_tables([shard.data.table for shard in shards]) if shards else dataset_from_rows([]).data.table
    features = shards[0].features if shards else TOKENIZED_FEATURES
    quarantine = QuarantineLog(stage="tokenized_dataset")
    rejected = _cross_drop_rejections(table, config)
    sample_ids, drops, splits = table["sample_id"].to_pylist(), table["drop"].to_pylist(), table["split"].to_pylist()
    keep = np.ones(table.num_rows, dtype=bool)
    for index, (reason, detail) in rejected.items():
        keep[index] = False
        line = int(sample_ids[index].rsplit(":", 1)[-1].split("#")[0])
        quarantine.add(drop=drops[index], file=formats.CLEAN_SAMPLES_FILE, line=line, reason=reason, detail=f"{detail}, was {splits[index]}", record=sample_ids[index])
    split_array = np.array(splits, dtype=object)
    # An explicit fingerprint: datasets would otherwise hash the whole table to make one (a fifth of the time here).
    version = fingerprint([str(path) for path in shard_dirs], sorted(rejected))
    dataset = datasets.DatasetDict(
        {
            name: datasets.Dataset(
                table.filter(pa.array(keep & (split_array == name))), info=datasets.DatasetInfo(features=features), fingerprint=f"{version}-{name}"
            )
            for name in formats.SPLITS
        }
    )
    save_dataset(dataset, Path(out_dir) / "dataset")
    quarantine.write(Path(out_dir) / formats.QUARANTINE_FILE)
    return {
        "splits": {name: dataset[name].num_rows for name in formats.SPLITS},
        "n_quarantined": len(quarantine),
        "quarantine_reasons": quarantine.counts(),
        "n_tokens": {name: int(pc.sum(pc.list_value_length(dataset[name].data.table["input_ids"])).as_py() or 0) for name in formats.SPLITS},
    }


def _cross_drop_rejections(table: pa.Table, config: CleanConfig) -> dict[int, tuple[str, str]]:
    """Row index -> (reason, detail) for test leakage and for duplicates of an earlier drop's rows."""
    shas, splits = table["image_sha256"].to_pylist(), table["split"].to_pylist()
    has_hashes = "image_phash" in table.column_names
    phashes = table["image_phash"].to_pylist() if has_hashes else [None] * table.num_rows
    colors = table["image_colors"].to_pylist() if has_hashes else [None] * table.num_rows
    first_row: dict[str, int] = {}
    for index, sha in enumerate(shas):
        first_row.setdefault(sha, index)
    # Images from before perceptual hashes (or whose hash is missing) take part in exact matching only.
    hashed = [sha for sha, index in first_row.items() if phashes[index] is not None]
    hash_of = {sha: (phashes[first_row[sha]], colors[first_row[sha]]) for sha in hashed}

    def fingerprints(images: list[str]) -> tuple[list[str], list[bytes]]:
        return [hash_of[sha][0] for sha in images], [hash_of[sha][1] for sha in images]

    test_images = {sha for sha, split in zip(shas, splits) if split == "test"}
    trained = [sha for sha in hashed if sha not in test_images]
    test_hashed = [sha for sha in hashed if sha in test_images]
    near_test = near_matches(*fingerprints(trained), *fingerprints(test_hashed), config.near_duplicate_distance, config.near_duplicate_color_tolerance)
    leaked = {sha: test_hashed[match] for sha, match in zip(trained, near_test) if match >= 0}
    earlier = near_matches(*fingerprints(hashed), *fingerprints(hashed), config.near_duplicate_distance, config.near_duplicate_color_tolerance, earlier_only=True)
    representative = {sha: sha for sha in first_row}
    for sha, match in zip(hashed, earlier):
        if match >= 0:
            representative[sha] = representative[hashed[match]]

    rejected: dict[int, tuple[str, str]] = {}
    seen: dict[tuple, str] = {}
    histories = table["history"].to_pylist() if "history" in table.column_names else [None] * table.num_rows
    for index, (sha, split, question, drop, history) in enumerate(zip(shas, splits, table["question"].to_pylist(), table["drop"].to_pylist(), histories)):
        if split != "test" and sha in test_images:
            rejected[index] = (formats.TEST_LEAKAGE, "image also in test")
            continue
        if split != "test" and sha in leaked:
            rejected[index] = (formats.TEST_LEAKAGE, f"image near-identical to test image {leaked[sha][:12]}")
            continue
        key = (representative[sha], question.lower(), history)
        earlier_drop = seen.setdefault(key + (sha,), drop)
        near_drop = seen.setdefault(key, drop)
        if earlier_drop != drop:
            rejected[index] = (formats.DUPLICATE, f"same image and question as in drop {earlier_drop!r}")
        elif near_drop != drop:
            rejected[index] = (formats.NEAR_DUPLICATE, f"same question on a near-identical image in drop {near_drop!r}")
    return rejected


def encode_batch(processor, questions: list[str], answers: list[str], images: list[bytes | Image.Image]) -> list[dict[str, Any]]:
    """input_ids = processed prompt + answer + end-of-turn; labels mask the prompt (and its image tokens) with -100.

    The end-of-turn token is the one the family's template closes an answer with (Qwen2-VL's
    `<|im_end|>`, Idefics3's `<end_of_utterance>`), else EOS; exactly one is kept in the labels.
    """
    if families.family_of_processor(processor).prompt_style == "cogvlm_vqa":  # no processor of their own: vlmtune.cogvlm's
        return [processor.encode(question, answer) for question, answer in zip(questions, answers)]
    tokenizer = processor.tokenizer
    answer_format = families.answer_format(processor)
    end_token_id = tokenizer.convert_tokens_to_ids(answer_format.end_token)
    pil_images = [_as_pil(image) for image in images]
    prompts = [build_prompt(processor, question) for question in questions]
    check_placeholders(processor, prompts, images_per_prompt=1)
    prompt_ids = _processed_prompt_ids(processor, prompts, pil_images)
    examples = []
    for prompt_text, prompt, answer in zip(prompts, prompt_ids, answers):
        prompt = list(prompt)
        target = _answer_ids(tokenizer, _prompt_as_tokenized(processor, prompt_text), answer_format.prefix + answer) + [end_token_id]
        examples.append(
            {
                "input_ids": prompt + target,
                "labels": [IGNORE_INDEX] * len(prompt) + target,
                "prompt_length": len(prompt),
            }
        )
    return examples


def check_placeholders(processor, prompts: list[str], images_per_prompt: int) -> None:
    """One image placeholder per image in every prompt, or the processor would pair text and pixels wrongly
    (LLaMA-Factory #7909, #5658): a template that drops or repeats the image part fails here, loudly."""
    image_token = getattr(processor, "image_token", "<image>")
    wrong = [prompt for prompt in prompts if prompt.count(image_token) != images_per_prompt]
    if wrong:
        raise ValueError(
            f"{len(wrong)} prompt(s) hold {wrong[0].count(image_token)} {image_token!r} placeholders for {images_per_prompt} image(s): {wrong[0][:200]!r}"
        )


def build_prompt(processor, question: str) -> str:
    """The user turn (image + question) and the cue for the assistant's answer, in the model's own format.

    Chat-template families render `{"type": "image"}` + text parts through the processor's template,
    prefixed with the special tokens the tokenizer would add itself (LLaVA-1.5's `<s>`), since the
    processor is then called with `add_special_tokens=False`. PaliGemma has no template: its prompt is
    a task prefix after the image, and its processor adds BOS and the newline that ends the prefix.
    """
    image_token = getattr(processor, "image_token", "<image>")
    # A literal placeholder typed in a question must not become an image slot (LLaMA-Factory #7909).
    safe_question = question.replace(image_token, image_token[0] + "\u200b" + image_token[1:])
    if families.family_of_processor(processor).prompt_style == "prefix_suffix":
        return f"{image_token}answer en {safe_question}"  # big_vision's VQA task prefix, as PaliGemma was trained
    if not getattr(processor, "chat_template", None):
        return f"{image_token}{safe_question}\n"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": safe_question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    leading = _leading_special_tokens(processor.tokenizer)
    return prompt if prompt.startswith(leading) else leading + prompt


def _processed_prompt_ids(processor, prompts: list[str], images: list[Image.Image]) -> list[list[int]]:
    """Prompt ids with each image placeholder expanded by the processor."""
    if families.family_of_processor(processor).prompt_style == "prefix_suffix":
        # PaliGemma's processor builds legacy labels with numpy, which fails on a ragged batch: one at a time.
        return [processor(text=[prompt], images=[[image]], add_special_tokens=False)["input_ids"][0] for prompt, image in zip(prompts, images)]
    # One list of images per prompt: processors that split images (Idefics3, SmolVLM) read a flat list as one sample.
    return processor(text=prompts, images=[[image] for image in images], add_special_tokens=False)["input_ids"]


def _leading_special_tokens(tokenizer) -> str:
    """What the tokenizer puts before any text on its own (`<s>`, GLM's `[gMASK]<sop>`, or nothing)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n_leading = with_special.index(plain[0]) if plain and plain[0] in with_special else 0
    return tokenizer.decode(with_special[:n_leading])


def _prompt_as_tokenized(processor, prompt: str) -> str:
    """The prompt as the tokenizer sees it, image placeholders unexpanded (PaliGemma's processor adds BOS and a newline)."""
    if families.family_of_processor(processor).prompt_style != "prefix_suffix":
        return prompt
    image_token = processor.image_token
    cut = prompt.rfind(image_token) + len(image_token)
    return prompt[:cut] + processor.tokenizer.bos_token + prompt[cut:] + "\n"


def _answer_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """The answer's tokens as they follow the prompt, so a SentencePiece "▁" or BPE "Ġ" word start is the
    one the model sees after its cue, not the one it would see at the start of a text."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joint_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    if joint_ids[: len(prompt_ids)] == prompt_ids and len(joint_ids) > len(prompt_ids):
        return joint_ids[len(prompt_ids) :]
    return tokenizer(answer, add_special_tokens=False)["input_ids"]  # the answer merged into the cue's last token


def _as_pil(image: bytes | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image)).convert("RGB")


def save_dataset(dataset: datasets.Dataset | datasets.DatasetDict, path: Path) -> None:
    """`save_to_disk` that round-trips empty splits too: by default `datasets` writes no shard for them
    and `load_from_disk` then fails."""
    if isinstance(dataset, datasets.DatasetDict):
        dataset.save_to_disk(str(path), num_shards={name: 1 if split.num_rows == 0 else None for name, split in dataset.items()})
    else:
        dataset.save_to_disk(str(path), num_shards=1 if dataset.num_rows == 0 else None)


def dataset_from_rows(rows: list[dict[str, Any]]) -> datasets.Dataset:
    """Rows as a dataset of TOKENIZED_FEATURES; a column a row leaves out (answers, history, ...) is null."""
    return datasets.Dataset.from_dict({name: [row.get(name) for row in rows] for name in TOKENIZED_FEATURES}, features=TOKENIZED_FEATURES)

