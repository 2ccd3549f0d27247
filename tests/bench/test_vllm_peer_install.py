"""benchmarks/peers: the device-side install (install_vllm.sh) and the wheel trimming, on CPU
with small synthetic wheels standing in for vLLM's: parts staged call by call, what is missing
reported, md5s checked, the wheel put back together, installed and imported. Plumbing only."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "benchmarks/peers/install_vllm.sh"


def _wheel(path: Path, name: str, files: dict[str, str]) -> Path:
    """A minimal valid wheel of package ``name`` 0.26.0 holding ``files``."""
    info = f"{name}-0.26.0.dist-info"
    members = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.26.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }  # fmt: skip
    record = "".join(f"{m},,\n" for m in members) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in {**members, f"{info}/RECORD": record}.items():
            z.writestr(member, text)
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def carried(tmp_path):
    """carry1, carry2: halves of a fake vllm wheel; carry3: a small wheel. Like
    fetch_vllm_wheels.sh lays them out, each with the same MANIFEST.md5."""
    vllm_files = {
        "vllm/__init__.py": "__version__ = '0.26.0'\n",
        "vllm/v1/__init__.py": "",
        "vllm/v1/engine/__init__.py": "",
        "vllm/v1/engine/core.py": "import llguidance_stand_in\n",
        "vllm/entrypoints/__init__.py": "",
        "vllm/entrypoints/openai/__init__.py": "",
        "vllm/entrypoints/openai/api_server.py": "",
        "vllm/padding.txt": os.urandom(30000).hex(),  # enough bytes for two parts
    }
    src = tmp_path / "src"
    src.mkdir()
    big = _wheel(src / "vllm-0.26.0-py3-none-any.whl", "vllm", vllm_files)
    small = _wheel(src / "llguidance_stand_in-0.26.0-py3-none-any.whl", "llguidance_stand_in",
                   {"llguidance_stand_in.py": ""})  # fmt: skip
    data = big.read_bytes()
    half = len(data) // 2
    parts = {"vllm.whl.part00": data[:half], "vllm.whl.part01": data[half:]}
    manifest = "".join(f"{hashlib.md5(b).hexdigest()}  {n}\n" for n, b in parts.items())
    manifest += f"{_md5(big)}  {big.name}\n{_md5(small)}  {small.name}\n"
    root = tmp_path / "peers"
    for i, (name, blob) in enumerate(parts.items(), start=1):
        (root / f"carry{i}").mkdir(parents=True)
        (root / f"carry{i}" / name).write_bytes(blob)
        (root / f"carry{i}" / "MANIFEST.md5").write_text(manifest)
    (root / "carry3").mkdir()
    shutil.copy(small, root / "carry3")
    (root / "carry3" / "MANIFEST.md5").write_text(manifest)
    return root


def _install_call(
    tmp_path: Path, carry: list[Path], pip: str = f"{sys.executable} -m pip"
) -> subprocess.CompletedProcess:
    """One device call: only the folders in ``carry`` are there."""
    here = tmp_path / "call"
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir()
    for folder in carry:
        shutil.copytree(folder, here / folder.name)
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, CARRIED=str(here), PARTS=str(tmp_path / "parts"),
               SITE=str(tmp_path / "site"), OUT=str(tmp_path / "out"),
               PATH=venv_bin + os.pathsep + os.environ["PATH"],
               PIP=pip)  # fmt: skip
    return subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("pip", [f"{sys.executable} -m pip", "false"], ids=["pip", "no-pip"])
def test_parts_are_staged_call_by_call_then_installed(carried, tmp_path, pip):
    """With pip, and on a python without pip (the wheels are then unpacked by hand)."""
    first = _install_call(tmp_path, [carried / "carry1"], pip)
    assert first.returncode == 3
    assert "still missing: vllm parts [ vllm.whl.part01 ] and 1 small wheels" in first.stdout

    second = _install_call(tmp_path, [carried / "carry2", carried / "carry3"], pip)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "md5 ok" in second.stdout and "import vllm 0.26.0 ok" in second.stdout
    assert (tmp_path / "site" / "vllm" / "v1" / "engine" / "core.py").is_file()
    assert "import vllm 0.26.0 ok" in (tmp_path / "out" / "install_vllm.log").read_text()

    assert ("no pip: unpacking" in second.stdout) == (pip == "false")
    again = _install_call(tmp_path, [], pip)  # the next call finds it installed
    assert again.returncode == 0 and "already installed" in again.stdout


def test_a_corrupt_part_is_refused(carried, tmp_path):
    part = carried / "carry2" / "vllm.whl.part01"
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    part.write_bytes(bytes(blob))
    done = _install_call(tmp_path, [carried / "carry2"])
    assert done.returncode == 1 and "md5 mismatch" in done.stdout
    assert not (tmp_path / "parts" / "vllm.whl.part01").exists()


def test_an_incomplete_install_names_the_module_missing(carried, tmp_path):
    """Without the small wheel vllm's engine core cannot import: the call says so."""
    manifest = carried / "carry1" / "MANIFEST.md5"
    kept = [line for line in manifest.read_text().splitlines() if "llguidance" not in line]
    for i in (1, 2):
        (carried / f"carry{i}" / "MANIFEST.md5").write_text("\n".join(kept) + "\n")
    done = _install_call(tmp_path, [carried / "carry1", carried / "carry2"])
    assert done.returncode == 1
    assert "No module named 'llguidance_stand_in'" in done.stdout + done.stderr


def test_trim_leaves_out_only_what_an_h200_run_never_loads(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "trim_vllm_wheel", REPO / "benchmarks/peers/trim_vllm_wheel.py"
    )
    trim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trim)
    dropped = ["vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs",
               "vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so"]  # fmt: skip
    kept = ["vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so", "vllm/__init__.py",
            "vllm/third_party/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so"]  # fmt: skip
    src = _wheel(tmp_path / "vllm-0.26.0-py3-none-any.whl", "vllm",
                 dict.fromkeys(dropped + kept, "x"))  # fmt: skip
    dst = tmp_path / "trimmed.whl"
    assert sorted(trim.trim(src, dst, "cpython-312")) == sorted(dropped)
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        record = z.read("vllm-0.26.0.dist-info/RECORD").decode()
    assert set(kept) <= names and not set(dropped) & names
    assert all(k in record for k in kept) and not any(d in record for d in dropped)
    no_fa3 = _wheel(tmp_path / "other.whl", "vllm", {"vllm/__init__.py": ""})
    with pytest.raises(SystemExit, match="no FlashAttention 3"):
        trim.trim(no_fa3, tmp_path / "x.whl", "cpython-312")
