import pytest

from vlmtune.config import TinyModelConfig
from vlmtune.models import build_tiny_processor
from vlmtune.pinning import PinMismatch, check_pins, processor_pins


def test_a_resaved_processor_keeps_its_pins(tiny_processor, tmp_path):
    from transformers import AutoProcessor

    tiny_processor.save_pretrained(tmp_path)
    assert processor_pins(AutoProcessor.from_pretrained(tmp_path)) == processor_pins(tiny_processor)


def test_a_changed_template_or_pixel_budget_fails(tiny_processor):
    pins = processor_pins(tiny_processor)
    other_template = build_tiny_processor(TinyModelConfig())
    other_template.chat_template = other_template.chat_template.replace("\\n", " ")
    with pytest.raises(PinMismatch, match="chat_template"):
        check_pins(other_template, pins, "training")
    other_size = build_tiny_processor(TinyModelConfig(image_size=32))
    with pytest.raises(PinMismatch, match="image_processor"):
        check_pins(other_size, pins, "evaluation")
    check_pins(build_tiny_processor(TinyModelConfig()), pins, "merge")
