"""benchmarks/datastore_subset.py: a folder of a dataset's first shards that
``load_datastore`` accepts, holding exactly those shards' tokens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from parallm.engine.spec.datastore import load_datastore
from parallm.engine.spec.history import SEPARATOR
from parallm.tokenizer import load_tokenizer
from parallm.train.config import DataSection
from parallm.train.data import prepare_dataset

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks/datastore_subset.py"


def test_the_first_shards_load_as_a_datastore(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama3")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 3)
    data = DataSection(corpus=str(corpus), dataset_dir=str(tmp_path / "data"),
                       tokenizer=str(model), vocab_size=480, val_fraction=0.0,
                       shard_tokens=64)  # fmt: skip
    prepare_dataset(data)
    shards = sorted(Path(data.dataset_dir).glob("train_*.npy"))
    assert len(shards) >= 3
    target = tmp_path / "subset"
    cmd = [sys.executable, str(SCRIPT), data.dataset_dir, str(target), "--shards", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "128 training tokens" in proc.stdout
    want = np.concatenate([np.load(f) for f in shards[:2]]).astype(np.int32)
    want[want == load_tokenizer(model).eos_token_id] = SEPARATOR
    assert load_datastore(str(target), 480, model).tolist() == want.tolist()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr
