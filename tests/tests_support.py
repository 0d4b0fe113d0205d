"""Helpers shared by the tests that drive Dagster as a user does."""

import json
import re
import socket

from torch import nn

from conftest import png_bytes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_drop(root, name, n=1, ready=False):
    drop = root / name
    (drop / "images").mkdir(parents=True, exist_ok=True)
    (drop / "images" / "a.png").write_bytes(png_bytes())
    (drop / "annotations.jsonl").write_text(
        "".join(json.dumps({"image": "images/a.png", "question": f"q{i}?", "answer": "x"}) + "\n" for i in range(n))
    )
    if ready:
        (drop / "_READY").write_text("")
    return drop


def _transformers_4_skips(name: str, keys: list[str]) -> bool:  # 4.x: the key and a dot inside the full name
    return any(key + "." in name or key == name for key in keys)


def _transformers_5_17_skips(name: str, keys: list[str]) -> bool:  # 5.17: a regex from the start, no boundary
    return any(re.match(rf"{key}\.", name) or re.match(key, name) or name.endswith(key) for key in keys)


def assert_4bit_skips_exactly(model: nn.Module, patterns: list[str], kept_out: tuple[str, ...]) -> None:
    """Each way transformers has matched `llm_int8_skip_modules` (the installed one's own function, and
    the rules of 4.x and of 5.17, written out) keeps every linear under one of `kept_out`
    (dotted module paths, found anywhere in a full name) in full precision, and no other linear."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    expected = {name for name in linears if any(f".{key}." in f".{name}." for key in kept_out)}
    assert expected
    matchers = {
        "installed": lambda name: not should_convert_module(name, patterns),
        "4.x": lambda name: _transformers_4_skips(name, patterns),
        "5.17": lambda name: _transformers_5_17_skips(name, patterns),
    }
    for version, skips in matchers.items():
        kept = {name for name in linears if skips(name)}
        assert kept == expected, (version, sorted(kept ^ expected)[:8])
