"""Padding-free batches (vlmtune.packing + vlmtune.speed.varlen_attention): one packed row gives the
padded batch's loss and gradients, families that cannot pack are refused, and `fit` trains packed.

On CPU the packed row runs through transformers' SDPA with the block mask it builds from
`position_ids`; on a CUDA machine the same tests run PyTorch's variable-length flash kernel.
"""

import math

import pytest
import torch
from PIL import Image

from tiny_families import FAMILIES
from vlmtune.collate import TrainingCollator
from vlmtune.config import TrainConfig
from vlmtune.methods import apply_lora
from vlmtune.packing import PAD_TO_MULTIPLE_OF, check_packable, pack_sequences
from vlmtune.speed.answer_loss import IGNORE_INDEX, answer_loss
from vlmtune.speed.varlen_attention import NAME, packed_attention
from vlmtune.tokenization import encode_batch
from vlmtune.train import fit

# Lengths differ on purpose: padding is what packing removes.
QUESTIONS = ["what color is the shape?", "is there a circle anywhere in this picture at all?", "what?", "is it blue?"]
ANSWERS = ["red", "yes", "triangle", "no it is not"]
PACKABLE = ("idefics3", "llava", "llava_next", "llava_onevision", "smolvlm")
REFUSED = {"paligemma": "bidirectionally", "qwen2_vl": "multimodal RoPE", "qwen2_5_vl": "multimodal RoPE", "glm4v": "multimodal RoPE"}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_packing_restarts_positions_ignores_each_samples_first_label_and_rounds_up():
    packed = pack_sequences([[5, 6, 7], [8, 9]], [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9]], pad_token_id=0, pad_to_multiple_of=8)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and packed["cu_seq_lens_q"].dtype == torch.int32
    assert packed["max_length_q"] == 3 and packed["use_cache"] is False
    # A label at a sample's first position would train the previous sample's last token to predict it.
    first_labelled = pack_sequences([[1, 2], [3, 4]], [[1, 2], [3, 4]], pad_token_id=0, pad_to_multiple_of=1)
    assert first_labelled["labels"].tolist() == [[IGNORE_INDEX, 2, IGNORE_INDEX, 4]]
    assert pack_sequences([[1] * PAD_TO_MULTIPLE_OF], [[1] * PAD_TO_MULTIPLE_OF], pad_token_id=0)["input_ids"].shape[1] == PAD_TO_MULTIPLE_OF
    with pytest.raises(ValueError, match="empty sample"):
        pack_sequences([[1], []], [[1], []], pad_token_id=0)


@pytest.mark.parametrize("name", PACKABLE)
def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(name):
    model, processor, rows = _family_batch(name)
    model = apply_lora(model, TrainConfig(lora_rank=4, lora_alpha=8)).to(DEVICE)
    padded = TrainingCollator(processor)(rows)
    packed = TrainingCollator(processor, padding_free=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].shape[1] % PAD_TO_MULTIPLE_OF == 0
    assert packed["input_ids"].shape[1] < padded["input_ids"].numel()
    reference_loss, reference_grads = _loss_and_lora_grads(model, padded)
    with packed_attention(model):
        assert model.get_base_model().config.get_text_config()._attn_implementation == NAME
        loss, grads = _loss_and_lora_grads(model, packed)
        answer_only = answer_loss(model, _on_device(packed))  # the answer-only loss takes packed rows too
    assert model.get_base_model().config.get_text_config()._attn_implementation != NAME  # restored after
    tolerance = 2e-2 if DEVICE.type == "cuda" else 1e-4  # bf16 on CUDA (the flash kernel has no fp32)
    assert math.isclose(loss, reference_loss, rel_tol=tolerance) and math.isclose(float(answer_only.detach()), reference_loss, rel_tol=tolerance)
    for key, reference in reference_grads.items():
        assert torch.allclose(grads[key], reference, rtol=10 * tolerance, atol=10 * tolerance * float(reference.abs().max())), key


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_families_whose_positions_or_masks_packing_breaks_are_refused_with_the_reason(name):
    model, _ = FAMILIES[name].build()
    with pytest.raises(ValueError, match=REFUSED[name]):
        check_packable(model)


def test_fit_trains_on_packed_batches(tmp_path):
    from test_families import _dataset

    model, processor, _ = _family_batch("llava")
    model = apply_lora(model, TrainConfig(lora_rank=4, lora_alpha=8))
    images = [Image.new("RGB", FAMILIES["llava"].image_size, (60 * i, 200 - 40 * i, 30)) for i in range(4)]
    dataset = _dataset(processor, images)
    config = TrainConfig(lora_rank=4, lora_alpha=8, max_steps=8, batch_size=4, eval_steps=4, max_eval_samples=4, learning_rate=1e-2,
                         warmup_ratio=0, padding_free=True, gradient_checkpointing=False)
    summary = fit(model, processor, dataset, dataset, config, tmp_path / "checkpoints", log=lambda _: None)
    assert summary["steps"] == 8 and math.isfinite(summary["best_eval_loss"])
    assert summary["train_loss_last"] < summary["train_loss_first"]
    with pytest.raises(ValueError, match="multimodal RoPE"):
        qwen, qwen_processor = FAMILIES["qwen2_vl"].build()
        fit(qwen, qwen_processor, dataset, dataset, config, tmp_path / "qwen", log=lambda _: None)


def _family_batch(name: str):
    spec = FAMILIES[name]
    torch.manual_seed(0)
    model, processor = spec.build()
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    model = model.to(dtype)
    images = [Image.new("RGB", spec.image_size, (60 * i, 200 - 40 * i, 30)) for i in range(len(QUESTIONS))]
    rows = [{**example, "image": image} for example, image in zip(encode_batch(processor, QUESTIONS, ANSWERS, images), images)]
    return model, processor, rows


def _on_device(batch: dict) -> dict:
    dtype = next(value.dtype for key, value in batch.items() if key == "pixel_values")
    model_dtype = torch.bfloat16 if DEVICE.type == "cuda" else dtype
    return {
        key: (value.to(DEVICE, model_dtype) if key == "pixel_values" else value.to(DEVICE)) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _loss_and_lora_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**_on_device(batch)).loss
    loss.backward()
    grads = {name: parameter.grad.detach().float().clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert grads
    return float(loss.detach()), grads
