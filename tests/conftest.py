import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.config import TinyModelConfig
from vlmtune.models import build_tiny_processor


@pytest.fixture(scope="session")
def tiny_processor():
    return build_tiny_processor(TinyModelConfig())


def png_bytes(size=(32, 32), mode="RGB", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    fill = color if mode in ("RGB",) else (color + (128,) if mode == "RGBA" else 128)
    Image.new(mode, size, fill).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def make_drop(tmp_path):
    """Write a drop folder: images given as {relative path: bytes}, records as dicts or raw lines."""

    def make(name="drop1", images=None, records=(), root=None):
        drop = (root or tmp_path / "drops") / name
        (drop / "images").mkdir(parents=True, exist_ok=True)
        for relative, data in (images or {}).items():
            (drop / relative).parent.mkdir(parents=True, exist_ok=True)
            (drop / relative).write_bytes(data)
        lines = []
        for record in records:
            lines.append(record if isinstance(record, (str, bytes)) else json.dumps(record))
        payload = b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n"
        (drop / "annotations.jsonl").write_bytes(payload)
        return drop

    return make


def read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
