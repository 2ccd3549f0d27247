"""A datastore for prompt lookup (``prompt_lookup_datastore``, spec/datastore.py): a dataset
folder that ``parallm train`` prepared is checked when loaded (its token count, tokenizer and
vocabulary) and its documents end in separators; in the engine greedy tokens are plain
decoding's while the datastore's drafts are accepted, on the host and in the device drafter's
tail (the kernels' twins on CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_device_drafts import _device_llm
from test_spec_history import _one_at_a_time, held
from test_speculative import ENGINE

from parallm import LLM
from parallm.data.shards import token_dtype, write_shards
from parallm.engine.spec.config import SpeculativeConfig
from parallm.engine.spec.datastore import datastore_tokens, load_datastore
from parallm.engine.spec.history import SEPARATOR
from parallm.tokenizer import load_tokenizer
from parallm.train.config import DataSection
from parallm.train.data import prepare_dataset

# Own lookups of 3-4 tokens: a fresh random prompt rarely drafts from itself, so what drafts
# is the datastore (n from 3 to 8), with no ring of earlier requests.
# No ring of earlier requests unless a test asks for one: the datastore alone.
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 3,
        "prompt_lookup_max": 4, "prompt_lookup_history_tokens": 0}  # fmt: skip


def write_dataset(folder: Path, docs: list[list[int]], model_dir: Path) -> Path:
    """A dataset folder in ``parallm train``'s layout holding ``docs`` (each ended by EOS) in
    two shards, tokenized with ``model_dir``'s tokenizer."""
    tokenizer = load_tokenizer(model_dir)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    tokens = [t for doc in docs for t in (*doc, tokenizer.eos_token_id)]
    dtype = token_dtype(len(tokenizer))
    write_shards([tokens], folder, "train", len(tokens) // 2 + 1, dtype)
    meta = {"fingerprint": {}, "stats": {"train": {"tokens": len(tokens)}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _spec(folder: Path, **keys: object) -> dict:
    return {**SPEC, "prompt_lookup_datastore": str(folder), **keys}


def test_a_prepared_dataset_loads_with_separators_between_documents(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama3")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["def f(x):\n    return x\n", "class A:\n    pass\n"]
    for i, text in enumerate(texts):
        (corpus / f"doc{i}.py").write_text(text)
    cfg = DataSection(corpus=str(corpus), dataset_dir=str(tmp_path / "data"), tokenizer=str(model),
                      vocab_size=480, val_fraction=0.0)  # fmt: skip
    prepare_dataset(cfg)
    tokens = load_datastore(cfg.dataset_dir, 480, model)
    tokenizer = load_tokenizer(model)
    want = []
    for text in texts:  # the corpus's order
        want += [*tokenizer.encode(text, add_special_tokens=False), SEPARATOR]
    assert tokens.dtype == np.int32 and tokens.tolist() == want


def test_damaged_or_foreign_datasets_are_refused_by_name(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama3")
    folder = write_dataset(tmp_path / "ok", [[5, 6, 7, 8]] * 30, model)
    assert len(load_datastore(str(folder), 480, model)) == 150
    field = "speculative_config.prompt_lookup_datastore"
    (folder / "train_00001.npy").unlink()  # a lost shard
    with pytest.raises(ValueError, match=f"{field}: .* holds 76 training tokens where its"):
        load_datastore(str(folder), 480, model)
    big = write_dataset(tmp_path / "big", [[5, 6, 479]], model)
    with pytest.raises(ValueError, match="holds token 479, outside the target's vocabulary of 400"):
        load_datastore(str(big), 400, model)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(model, other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    swapped = vocab["model"]["vocab"]
    first, second = list(swapped)[300:302]
    swapped[first], swapped[second] = swapped[second], swapped[first]
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=f"{field}: the dataset's tokenizer .* is not the target"):
        load_datastore(str(big), 480, other)
    spec = SpeculativeConfig.from_value(
        {**SPEC, "prompt_lookup_datastore": str(big), "prompt_lookup_history_tokens": 2**30}
    )
    with pytest.raises(ValueError, match=f"{field}: .* holds 4 training tokens; with prompt_"):
        datastore_tokens(spec, 480, model)


def test_the_config_key_is_checked_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="prompt_lookup_datastore: no dataset at"):
        SpeculativeConfig.from_value(_spec(tmp_path))
    with pytest.raises(ValueError, match="prompt_lookup_datastore must be a dataset folder's"):
        SpeculativeConfig.from_value({**SPEC, "prompt_lookup_datastore": 3})
    (tmp_path / "meta.json").write_text("{}")
    medusa = {"method": "medusa", "num_speculative_tokens": 2, "model": "heads"}
    with pytest.raises(ValueError, match="prompt_lookup_datastore is for method 'ngram' only"):
        SpeculativeConfig.from_value({**medusa, "prompt_lookup_datastore": str(tmp_path)})
    assert SpeculativeConfig.from_value(_spec(tmp_path)).prompt_lookup_datastore == str(tmp_path)


def _workload(ordinary_token_ids: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.choice(ordinary_token_ids, 24).tolist() for _ in range(3)]


def test_greedy_tokens_are_plain_decodings_and_the_datastores_drafts_are_accepted(
    tmp_path, tiny_model_dir, ordinary_token_ids
):
    """The datastore holds two of three requests' plain outputs (after other text): they
    draft their whole outputs from it; the third, nothing from it."""
    path = tiny_model_dir("llama3")
    prompts = _workload(ordinary_token_ids)
    plain = _one_at_a_time(LLM(str(path), **ENGINE), prompts)
    noise = ordinary_token_ids[:40]
    docs = [noise + prompts[0] + plain[0], noise, prompts[1][-6:] + plain[1]]
    folder = write_dataset(tmp_path / "data", docs, path)
    without = LLM(str(path), speculative_config=SPEC, **ENGINE)
    llm = LLM(str(path), speculative_config=_spec(folder), **ENGINE)
    assert "a datastore of" in llm.engine.summary()
    free = llm.engine.kv.num_free_blocks
    assert _one_at_a_time(without, prompts) == plain
    assert _one_at_a_time(llm, prompts) == plain
    assert llm.engine.kv.num_free_blocks == free
    ring, own = llm.engine.spec_stats, without.engine.spec_stats
    # Every step of the first two drafts 4 tokens from the datastore, all accepted: 4 of
    # every 5 tokens after the prefill's.
    assert ring.accepted_tokens == ring.draft_tokens >= 2 * 4 * ((len(plain[0]) - 1) // 5)
    assert own.accepted_tokens <= 4
    assert held(llm.engine.drafter.history) == docs  # no ring: nothing of the requests added


def test_device_staged_steps_draft_from_the_datastore_as_the_host_drafter_does(
    tmp_path, tiny_model_dir, ordinary_token_ids
):
    path = tiny_model_dir("llama3")
    prompts = _workload(ordinary_token_ids)
    plain = _one_at_a_time(LLM(str(path), **ENGINE), prompts)
    folder = write_dataset(tmp_path / "data", [prompts[0] + plain[0]], path)
    spec = _spec(folder, prompt_lookup_history_tokens=4096)  # and a ring of the requests
    host = LLM(str(path), speculative_config=spec, async_scheduling=True, **ENGINE)
    want = _one_at_a_time(host, prompts)
    llm = _device_llm(str(path), spec)
    engine = llm.engine
    assert engine.runner.device_drafts.history is engine.drafter.history
    assert _one_at_a_time(llm, prompts) == want == plain
    assert engine.stats["num_overlapped_steps"] > 10
    assert host.engine.spec_stats.accepted_tokens >= 4 * ((len(plain[0]) - 1) // 5)
    assert engine.spec_stats == host.engine.spec_stats
    assert held(engine.drafter.history)[0] == prompts[0] + plain[0]


@pytest.mark.gpu
def test_device_staged_steps_draft_from_the_datastore_on_cuda(
    tmp_path, tiny_model_dir, ordinary_token_ids
):
    """On CUDA (async scheduling, captured verify and tail graphs, the Triton kernels): the
    tail reads the datastore's base in the ring's device copy as the synchronous steps'
    host lookups (through the suffix index) do, and in float32 plain decoding's tokens."""
    path = tiny_model_dir("llama3")
    engine_args = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20,
                       enable_prefix_caching=False)  # fmt: skip
    prompts = _workload(ordinary_token_ids)
    plain = _one_at_a_time(LLM(str(path), **engine_args), prompts)
    folder = write_dataset(tmp_path / "data", [prompts[0] + plain[0], prompts[1] + plain[1]], path)
    spec = _spec(folder, prompt_lookup_history_tokens=4096)
    spec_args = dict(engine_args, cuda_graph_sizes=(1, 2, 4), speculative_config=spec)
    sync = LLM(str(path), async_scheduling=False, **spec_args)
    # The same full chains, staged from the host.
    sync.engine.use_full_chains(True)
    assert _one_at_a_time(sync, prompts) == plain
    llm = LLM(str(path), **spec_args)
    engine, drafts = llm.engine, llm.engine.runner.device_drafts
    assert drafts is not None and drafts.history.device_ring.is_cuda and drafts.graphs is not None
    assert _one_at_a_time(llm, prompts) == plain
    assert engine.num_overlapped_steps > 10 and drafts.graphs.num_replays > 10
    assert sync.engine.spec_stats.accepted_tokens >= 2 * 4 * ((len(plain[0]) - 1) // 5)
    assert engine.spec_stats == sync.engine.spec_stats
