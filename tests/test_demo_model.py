"""The embedded demo model: a real, small qwen3_moe checkpoint that ships in the package,
retrained reproducibly by scripts/train_demo_model.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path


from tests.helpers.reference import header_bytes
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.demo import DEMO_MODEL
from vllm_aimer.layout import expert_layout

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_demo_model.py"


def test_demo_model_is_a_small_qwen3_moe():
    ckpt = open_checkpoint(DEMO_MODEL)
    layout = expert_layout(ckpt)
    assert layout.arch.family == "qwen3_moe"
    assert (layout.num_experts, layout.top_k, len(layout.layers)) == (16, 2, 4)
    size = sum(f.stat().st_size for f in DEMO_MODEL.iterdir())
    assert size <= 8 * 2**20, f"demo model is {size / 2**20:.1f} MiB"
    assert sum(header_bytes(DEMO_MODEL).values()) == ckpt.total_bytes
    record = json.loads((DEMO_MODEL / "training.json").read_text())
    assert record["steps"] >= 1000 and record["corpus_sha256"]


def test_demo_tokenizer_round_trips_python():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    text = "def __init__(self, name):\n    self.name = name  # où\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # a trained vocabulary, not bytes


def test_demo_model_ships_in_the_wheel(tmp_path):
    """The package data rule puts every demo model file into the built wheel."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [wheel] = tmp_path.glob("vllm_aimer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in DEMO_MODEL.iterdir():
        assert f"vllm_aimer/demo_model/{f.name}" in names


def test_training_is_reproducible(tmp_path):
    """Two short trainings with the same seed give byte-identical checkpoints and data."""
    args = ["--steps", "3", "--batch", "2", "--seq", "32", "--heldout-docs", "4"]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *args, "--output", str(tmp_path / n),
                               "--heldout", str(tmp_path / f"{n}.jsonl")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in ("a", "b")]
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]

    def digest(d: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 4
