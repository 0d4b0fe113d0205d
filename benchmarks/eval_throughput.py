"""Questions per second of the evaluation's batched greedy generation (KV cache, left padding), on CPU and GPU.

    python benchmarks/eval_throughput.py                      # tiny LLaVA built from config, easy-VQA test questions
    python benchmarks/eval_throughput.py --model artifacts/merged_model/_all/<fingerprint>

With the default randomly initialised model, answers rarely stop early, so every question costs the
full `--max-new-tokens`: a worst case. A trained model (`--model`, e.g. the merged model folder)
shows the speed the report sees. Each device runs the same questions after one warm-up batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets
import torch

from vlmtune.config import TinyModelConfig
from vlmtune.generate import greedy_answers
from vlmtune.models import build_tiny_vlm, load_processor
from vlmtune.tokenization import dataset_from_rows, encode_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a saved model folder (default: the tiny LLaVA, random weights)")
    parser.add_argument("--questions", type=int, default=512, help="easy-VQA test questions per device")
    parser.add_argument("--cpu-questions", type=int, default=None, help="fewer questions on the CPU (default: --questions)")
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    model, processor = load(args.model)
    rows = easyvqa_test_rows(processor, args.questions)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # questions per CPU-second (this process's CPU time) stays meaningful on a shared, oversubscribed host
    print(f"{'device':<8}{'batch':>6}{'questions':>10}{'seconds':>9}{'questions/s':>13}{'questions/cpu-s':>17}")
    for device in devices:
        device_rows = rows.select(range(min(args.cpu_questions or len(rows), len(rows)))) if device == "cpu" else rows
        model = model.to(device)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            greedy_answers(model, processor, device_rows.select(range(min(batch_size, len(device_rows)))), batch_size, args.max_new_tokens)
            _synchronize(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            greedy_answers(model, processor, device_rows, batch_size, args.max_new_tokens)
            _synchronize(device)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            rates = f"{len(device_rows) / seconds:>13.1f}{len(device_rows) / cpu_seconds:>17.1f}"
            print(f"{device:<8}{batch_size:>6}{len(device_rows):>10}{seconds:>9.2f}{rates}")


def load(model_dir: Path | None):
    if model_dir is None:
        return build_tiny_vlm(TinyModelConfig())
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32), load_processor(model_dir)


def easyvqa_test_rows(processor, n: int) -> datasets.Dataset:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    images = [Path(paths[image_id]).read_bytes() for image_id in image_ids[:n]]
    encoded = encode_batch(processor, questions[:n], answers[:n], images)
    return dataset_from_rows(
        [{"sample_id": str(i), "drop": "easyvqa-test", "split": "test", "image_sha256": "", "image": {"bytes": image, "path": None},
          "question": q, "answer": a, "answer_type": "", "question_type": "", **example}
         for i, (q, a, image, example) in enumerate(zip(questions, answers, images, encoded))]
    )


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
