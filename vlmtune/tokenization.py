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
import pyarrow.parquet as pq
from PIL import Image

from vlmtune import families, formats
from vlmtune.config import TokenizeConfig
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
                    **example,
                }
            )
    shard = datasets.Dataset.from_list(encoded, features=TOKENIZED_FEATURES) if encoded else _empty()
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


def assemble_splits(shard_dirs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Concatenate drop shards into a train / validation / test `DatasetDict` saved at `out_dir/dataset`.

    An image that is in the test split anywhere is removed from train and validation (quarantined as
    `test_leakage`), so no image is ever both trained on and tested on.
    """
    shards = [datasets.load_from_disk(str(Path(path) / "shard")) for path in shard_dirs]
    combined = datasets.concatenate_datasets(shards) if shards else _empty()
    test_images = {sha for sha, split in zip(combined["image_sha256"], combined["split"]) if split == "test"}
    quarantine = QuarantineLog(stage="tokenized_dataset")
    keep = []
    for index, (sha, split, sample_id, drop) in enumerate(zip(combined["image_sha256"], combined["split"], combined["sample_id"], combined["drop"])):
        if split != "test" and sha in test_images:
            quarantine.add(drop=drop, file=formats.CLEAN_SAMPLES_FILE, line=int(sample_id.rsplit(":", 1)[-1]), reason=formats.TEST_LEAKAGE, detail=f"image also in test, was {split}", record=sample_id)
        else:
            keep.append(index)
    combined = combined.select(keep)
    split_column = combined["split"]
    dataset = datasets.DatasetDict(
        {name: combined.select([i for i, split in enumerate(split_column) if split == name]) for name in formats.SPLITS}
    )
    save_dataset(dataset, Path(out_dir) / "dataset")
    quarantine.write(Path(out_dir) / formats.QUARANTINE_FILE)
    return {
        "splits": {name: dataset[name].num_rows for name in formats.SPLITS},
        "n_quarantined": len(quarantine),
        "quarantine_reasons": quarantine.counts(),
        "n_tokens": {name: int(sum(len(ids) for ids in dataset[name]["input_ids"])) for name in formats.SPLITS},
    }


def encode_batch(processor, questions: list[str], answers: list[str], images: list[bytes | Image.Image]) -> list[dict[str, Any]]:
    """input_ids = processed prompt + answer + end-of-turn; labels mask the prompt (and its image tokens) with -100.

    The end-of-turn token is the one the family's template closes an answer with (Qwen2-VL's
    `<|im_end|>`, Idefics3's `<end_of_utterance>`), else EOS; exactly one is kept in the labels.
    """
    tokenizer = processor.tokenizer
    answer_format = families.answer_format(processor)
    end_token_id = tokenizer.convert_tokens_to_ids(answer_format.end_token)
    pil_images = [_as_pil(image) for image in images]
    prompts = [build_prompt(processor, question) for question in questions]
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


def _empty() -> datasets.Dataset:
    return datasets.Dataset.from_dict({name: [] for name in TOKENIZED_FEATURES}, features=TOKENIZED_FEATURES)

