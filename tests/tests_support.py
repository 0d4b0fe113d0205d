"""Helpers shared by the tests that drive Dagster as a user does."""

import json
import socket

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
