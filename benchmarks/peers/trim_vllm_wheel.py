"""Write a copy of the vllm wheel without the files an H200 run of a dense model never loads.

The device tool carries at most 64 MiB a call, the working tree included, so every MiB of the
wheel is a share of a call. Left out, and why none of them can change a measurement:
- ``vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so`` (124 MiB of 289): FlashAttention 2. On Hopper
  vLLM picks FlashAttention 3 (``get_flash_attn_version``); FA2 is its fallback for ALiBi and
  other GPUs. vLLM imports it inside try/except, so without it FA2 reads as unavailable, and a
  path that needed it would fail loudly, not run something else.
- ``vllm/vllm-rs``: the Rust frontend, used only with ``VLLM_USE_RUST_FRONTEND=1``.
- ``vllm/third_party/deep_gemm/_C.cpython-3XX-*.so`` for Pythons other than the machine's.
RECORD loses the same lines, so the wheel stays consistent.
Usage: python trim_vllm_wheel.py IN.whl OUT.whl [--python-tag cpython-312]
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

LEFT_OUT = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs")
DEEP_GEMM_EXT = re.compile(r"^vllm/third_party/deep_gemm/_C\.(cpython-3\d+)-[^/]*\.so$")


def left_out(name: str, python_tag: str) -> bool:
    """Whether the wheel member ``name`` is dropped for a machine running ``python_tag``."""
    if name in LEFT_OUT:
        return True
    match = DEEP_GEMM_EXT.match(name)
    return match is not None and match.group(1) != python_tag


def trim(src: Path, dst: Path, python_tag: str) -> list[str]:
    """Copy ``src`` to ``dst`` without the members ``left_out`` names; those names."""
    dropped = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        if "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so" not in zin.namelist():
            raise SystemExit(f"{src}: no FlashAttention 3 kernels in it; is it vllm 0.26.0?")
        for info in zin.infolist():
            if left_out(info.filename, python_tag):
                dropped.append(info.filename)
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(
                    line for line in lines if not left_out(line.split(",", 1)[0], python_tag)
                ).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
    return dropped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="the vllm wheel as downloaded")
    p.add_argument("dst", type=Path, help="where to write the trimmed wheel")
    p.add_argument("--python-tag", default="cpython-312", help="the GPU machine's Python")
    args = p.parse_args()
    for name in trim(args.src, args.dst, args.python_tag):
        print(f"left out {name}")


if __name__ == "__main__":
    main()
