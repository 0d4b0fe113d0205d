import torch
from PIL import Image

from vlmtune.config import TinyModelConfig
from vlmtune.generate import greedy_answers
from vlmtune.models import build_tiny_vlm
from vlmtune.tokenization import encode_batch


def test_batched_greedy_answers_equal_one_by_one(tiny_processor):
    torch.manual_seed(0)
    model, processor = build_tiny_vlm(TinyModelConfig())
    questions = ["a?", "what colour is the big shape?", "is there a red circle in the image?", "shape?", "no"]
    images = [Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90)) for i in range(len(questions))]
    rows = [{**example, "image": image} for example, image in zip(encode_batch(processor, questions, ["x"] * len(questions), images), images)]
    assert len({row["prompt_length"] for row in rows}) > 1, "prompts of different lengths, so the batch is padded"
    batched, _ = greedy_answers(model, processor, rows, batch_size=len(rows), max_new_tokens=6)
    single = [greedy_answers(model, processor, [row], batch_size=1, max_new_tokens=6)[0][0] for row in rows]
    assert batched == single
