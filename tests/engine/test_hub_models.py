"""Hugging Face Hub ids for ``model`` and ``tokenizer``, resolved through a hub cache folder that
the tests lay out themselves (models--Org--Name/snapshots/<commit>/..., refs/<name>), offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

import parallm.hub
from parallm import LLM, SamplingParams
from parallm.cli import build_parser, main
from parallm.commands.engine_args import engine_kwargs
from parallm.server import launcher

ENGINE = {"dtype": "float32", "device": "cpu", "max_model_len": 128, "kv_cache_memory": 8 << 20}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 7]
MAIN_COMMIT = "a" * 40
V2_COMMIT = "b" * 40
WEIGHTS_ONLY = ("config.json", "generation_config.json", "model.safetensors")


def add_snapshot(
    cache: Path, repo: str, commit: str, source: Path, refs: tuple[str, ...] = ("main",),
    only: tuple[str, ...] | None = None,
) -> Path:  # fmt: skip
    """Copy ``source``'s files (or ``only`` those) into the cache as ``repo`` at ``commit``."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and (only is None or file.name in only):
            shutil.copy(file, snapshot / file.name)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as a user sets it; huggingface_hub's own flag too, so that nothing in
    these tests can reach the network whatever parallm does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def hub_cache(tiny_model_dir, tmp_path_factory) -> Path:
    """Org/Tiny: main = the llama3 tiny model, tag v2 = the same shapes with other weights;
    Org/TokenizerOnly: tokenizer files only; Org/NoWeights: config and tokenizer only."""
    cache = tmp_path_factory.mktemp("hub-cache")
    add_snapshot(cache, "Org/Tiny", MAIN_COMMIT, tiny_model_dir("llama3"))
    add_snapshot(cache, "Org/Tiny", V2_COMMIT, tiny_model_dir("llama3", seed=1), refs=("v2",))
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    add_snapshot(cache, "Org/TokenizerOnly", MAIN_COMMIT, tiny_model_dir("llama3"),
                 only=tokenizer_files)  # fmt: skip
    no_weights = tuple(f.name for f in tiny_model_dir("llama3").iterdir()
                       if not f.name.endswith(".safetensors"))  # fmt: skip
    add_snapshot(cache, "Org/NoWeights", MAIN_COMMIT, tiny_model_dir("llama3"), only=no_weights)
    return cache


def greedy_tokens(llm: LLM) -> list[int]:
    return llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_hub_id_loads_the_cached_snapshot(offline, hub_cache, tiny_model_dir):
    llm = LLM("Org/Tiny", download_dir=str(hub_cache), **ENGINE)
    assert Path(llm.engine.model_dir) == hub_cache / "models--Org--Tiny" / "snapshots" / MAIN_COMMIT
    assert llm.get_tokenizer() is not None
    local = LLM(str(tiny_model_dir("llama3")), **ENGINE)
    assert greedy_tokens(llm) == greedy_tokens(local)
    out = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.text == local.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].text


@pytest.mark.parametrize("revision", ["v2", V2_COMMIT])
def test_revision_picks_a_tag_or_a_commit(offline, hub_cache, tiny_model_dir, revision):
    llm = LLM("Org/Tiny", revision=revision, download_dir=str(hub_cache), **ENGINE)
    assert Path(llm.engine.model_dir).name == V2_COMMIT
    other = LLM(str(tiny_model_dir("llama3", seed=1)), **ENGINE)
    assert greedy_tokens(llm) == greedy_tokens(other)


def test_tokenizer_as_a_hub_id(offline, hub_cache, tiny_model_dir, tmp_path):
    for name in WEIGHTS_ONLY:
        shutil.copy(tiny_model_dir("llama3") / name, tmp_path / name)
    llm = LLM(str(tmp_path), tokenizer="Org/TokenizerOnly", download_dir=str(hub_cache), **ENGINE)
    expected = LLM(str(tiny_model_dir("llama3")), **ENGINE).get_tokenizer()("Hello")["input_ids"]
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].prompt_token_ids == expected


def test_unknown_hub_id_offline_is_a_clear_error(offline, hub_cache):
    with pytest.raises(ValueError, match=r"^model: 'Org/Missing' is not a local directory.*"
                       r"HF_HUB_OFFLINE is set"):  # fmt: skip
        LLM("Org/Missing", download_dir=str(hub_cache), **ENGINE)
    with pytest.raises(ValueError, match=r"^model: 'Org/Tiny'.*revision nope.*HF_HUB_OFFLINE"):
        LLM("Org/Tiny", revision="nope", download_dir=str(hub_cache), **ENGINE)
    with pytest.raises(ValueError, match=r"^tokenizer: 'Org/Missing' is not a local directory"):
        LLM("Org/Tiny", tokenizer="Org/Missing", download_dir=str(hub_cache), **ENGINE)


def test_snapshot_without_weights_offline_is_incomplete(offline, hub_cache):
    with pytest.raises(ValueError, match=r"^model: 'Org/NoWeights'.*is incomplete.*HF_HUB_OFFLINE"):
        LLM("Org/NoWeights", download_dir=str(hub_cache), **ENGINE)
    # Random weights need only the config, which the snapshot has.
    llm = LLM("Org/NoWeights", download_dir=str(hub_cache), load_format="dummy", **ENGINE)
    assert len(greedy_tokens(llm)) == 8


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "a/b/c"])
def test_a_name_that_is_neither_a_directory_nor_a_hub_id(offline, name):
    with pytest.raises(ValueError, match=r"^model: .* is neither a local directory nor a Hugging"):
        LLM(name, **ENGINE)


def test_cache_first_and_download_only_when_missing(monkeypatch, hub_cache, tmp_path):
    """Online: a complete cached snapshot is used with no download; a missing one is
    downloaded with allow_patterns that fetch configs, safetensors and tokenizer files only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_download(name, field, revision, download_dir, patterns, where):
        calls.append((name, revision, download_dir, tuple(patterns)))
        return str(hub_cache / "models--Org--Tiny" / "snapshots" / MAIN_COMMIT)

    monkeypatch.setattr(parallm.hub, "_download", fake_download)
    cached = parallm.hub.resolve_model_dir("Org/Tiny", download_dir=str(hub_cache))
    assert cached.endswith(MAIN_COMMIT) and calls == []
    parallm.hub.resolve_model_dir("Org/Fresh", revision="r1", download_dir=str(tmp_path))
    ((name, revision, download_dir, patterns),) = calls
    assert (name, revision, download_dir) == ("Org/Fresh", "r1", str(tmp_path))
    assert {"*.safetensors", "*.json", "tokenizer.model"} <= set(patterns)
    assert not {"*.bin", "*.pt", "*"} & set(patterns)


def test_serve_hub_id_with_revision_and_download_dir(offline, hub_cache, monkeypatch, capsys):
    """``parallm serve Org/Tiny --revision v2 --download-dir CACHE`` loads the v2 snapshot and
    serves it as Org/Tiny (uvicorn itself is left out)."""
    loaded = []
    load = launcher.load_engine

    def load_and_keep(**kwargs):
        loaded.append(load(**kwargs))
        return loaded[-1]

    monkeypatch.setattr(launcher, "load_engine", load_and_keep)
    monkeypatch.setattr(launcher, "run_server", lambda *args, **kwargs: None)
    argv = ["serve", "Org/Tiny", "--revision", "v2", "--download-dir", str(hub_cache),
            "--device", "cpu", "--dtype", "float32", "--max-model-len", "128",
            "--kv-cache-memory", str(8 << 20), "--disable-frontend-multiprocessing"]  # fmt: skip
    assert main(argv) == 0
    (engine,) = loaded
    assert Path(engine.model_dir).name == V2_COMMIT
    assert (engine.config.revision, engine.config.download_dir) == ("v2", str(hub_cache))
    assert "model name 'Org/Tiny'" in capsys.readouterr().err
    args = build_parser().parse_args(["generate", "--model", "Org/Tiny", "--revision", "v2", "x"])
    assert engine_kwargs(args)["revision"] == "v2"


def test_huggingface_hub_is_a_declared_dependency():
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    assert '"huggingface-hub>=' in pyproject.read_text()
