from vlmtune.config import TinyModelConfig
from vlmtune.models import build_tiny_vlm
from vlmtune.pinning import processor_pins
from vlmtune.self_contained import self_contained_problems


def saved(tmp_path):
    model, processor = build_tiny_vlm(TinyModelConfig())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path, processor_pins(processor)


def test_a_complete_folder_has_no_problems(tmp_path):
    folder, pins = saved(tmp_path)
    assert self_contained_problems(folder, pins) == []


def test_a_folder_without_its_processor_or_generation_config_is_caught(tmp_path):
    folder, pins = saved(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja", "generation_config.json"):
        (folder / name).unlink(missing_ok=True)
    problems = self_contained_problems(folder, pins)
    assert any("generation_config" in p for p in problems) and any("processor does not load" in p for p in problems)


def test_a_processor_with_another_template_is_caught(tmp_path):
    folder, pins = saved(tmp_path)
    template = folder / "chat_template.jinja"
    if template.is_file():
        template.write_text(template.read_text().replace("<image>", "<image> "))
    else:  # older layouts keep the template inside processor_config.json
        config = folder / "processor_config.json"
        config.write_text(config.read_text().replace("<image>", "<image> "))
    assert any("chat_template" in p for p in self_contained_problems(folder, pins))
