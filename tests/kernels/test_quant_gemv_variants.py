"""benchmarks/quant_gemv_variants.py: its conversions are exact on every byte value, each GEMV
variant matches the float64 reference, its checks catch a wrong variant, and the cheaper
variants compile for sm_90 without the per-weight conversion they exist to avoid.

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``). The
interpreter cannot run ``int8_prmt`` (inline PTX) nor a bfloat16 ``tl.dot`` (its results are
wrong), so those run as GPU tests; on CPU the PRMT constants are checked by emulating PRMT, and
``int8_tensor_core`` runs with float16 and float32 rows (its bf16 conversion is checked alone).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks/quant_gemv_variants.py"


def _load():
    return load_benchmark("quant_gemv_variants")


qv = _load()
INTERPRETING, interpreter_test, requires_cuda = kernel_modes(qv._gemv_convert_kernel)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INLINE_ASM = {"int8_prmt"}  # inline PTX: compiled kernels only
SMALL_TILES = {False: [(16, 32, 4), (8, 64, 2)], True: [(16, 32, 4), (32, 64, 4)]}


def _interpretable(name: str, dtype: torch.dtype) -> bool:
    bf16_dot = name == "int8_tensor_core" and dtype == torch.bfloat16
    return name not in INLINE_ASM and not bf16_dot


def _cases(interpretable: bool):
    return [
        pytest.param(name, kind, dtype, id=f"{name}-{kind}-{str(dtype)[6:]}")
        for name, variant in qv.VARIANTS.items()
        for kind in variant.kinds
        for dtype in DTYPES
        if _interpretable(name, dtype) == interpretable
    ]


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@interpreter_test
@pytest.mark.parametrize(
    ("name", "dtype", "kind"),
    [c[:3] for c in qv.CONVERSIONS if c[0] not in INLINE_ASM],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_conversion_is_exact_on_all_256_bytes_interpreter(name, dtype, kind):
    # The interpreter widens e4m3's NaN bytes (0x7f, 0xff) to +-480; the GPU test checks them.
    interpreter_nans = [0x7F, 0xFF] if kind == "fp8" else []
    assert qv.conversion_mismatches(name, dtype, kind, "cpu") == interpreter_nans


def test_a_wrong_conversion_is_reported(monkeypatch):
    """The exactness check names the byte a conversion gets wrong (and NaN equals NaN)."""

    def off_by_one_at_byte_200(q, name, dtype=torch.float32):
        y = q.to(dtype).clone()
        y[200] += 1
        return y

    monkeypatch.setattr(qv, "convert", off_by_one_at_byte_200)
    assert qv.conversion_mismatches("cast", torch.float32, "int8", "cpu") == [200]
    assert qv.conversion_mismatches("cast", torch.float32, "fp8", "cpu") == [200]
    monkeypatch.setattr(qv, "convert", lambda q, name, dtype=torch.float32: q.to(dtype))
    assert qv.conversion_mismatches("cast", torch.float32, "fp8", "cpu") == []  # NaN bytes


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX ``prmt.b32`` (default mode): output byte i is byte ``selector`` nibble i of the
    eight bytes of b:a (a the low four)."""
    pool = (b << 32 | a).to_bytes(8, "little")
    return int.from_bytes(bytes(pool[(selector >> 4 * i) & 7] for i in range(4)), "little")


@pytest.mark.parametrize("position", range(4))
def test_prmt_constants_build_each_weight_exactly(position):
    """int8_prmt's XOR and PRMT constants, emulated on every int8 value at each of the four
    byte positions of a register (the other bytes random): bits minus the magic are the value."""
    g = torch.Generator().manual_seed(position)
    for value in range(-128, 128):
        others = torch.randint(0, 256, (4,), generator=g).tolist()
        others[position] = value & 0xFF
        packed = int.from_bytes(bytes(others), "little")
        bits = _prmt(packed ^ qv.PRMT_FLIP, qv.PRMT_MAGIC, qv.PRMT_SELECTORS[position])
        as_float = struct.unpack("<f", struct.pack("<I", bits))[0]
        assert as_float - qv.MAGIC_F32 == value


@interpreter_test
@pytest.mark.parametrize(("name", "kind", "dtype"), _cases(interpretable=True))
def test_variant_matches_the_float64_reference_interpreter(name, kind, dtype):
    variant = qv.VARIANTS[name]
    tiles = SMALL_TILES[variant.tensor_core]
    for n, k in [(48, 64), (40, 200)]:  # the second ragged in N and K
        assert qv.check_variant(variant, kind, "cpu", tiles, n, k, dtype) == []


@interpreter_test
def test_the_checks_catch_a_wrong_variant_interpreter():
    """A GEMV with its row scales flipped, one that drops the last K tile, and an x-quantizing
    one whose x scale is off by 2% (inside the activation bound, outside its twin's) all fail."""
    flipped = qv.Variant("flipped", ("int8",), False, lambda x: (
        lambda w, s, **t: qv.gemv_convert(x, w, s.flip(0), "int8_magic", **t), x.double()))  # fmt: skip
    short = qv.Variant("short", ("int8",), False, lambda x: (
        lambda w, s, **t: qv.gemv_convert(x[:, :128].contiguous(), w[:, :128].contiguous(), s,
                                          "cast", **t), x.double()))  # fmt: skip

    def bind_off(x):
        xq, xs = qv.per_token_fp8(x)
        run = lambda w, s, **t: qv.gemv_dot(xq, w, s, x_scale=xs * 1.02, out_dtype=x.dtype, **t)  # noqa: E731
        return run, xq.double() * xs.double()

    off = qv.Variant("off", ("fp8",), True, bind_off, act_tol=qv.FP8_ACT_TOL)
    tile = [(16, 32, 4)]
    assert qv.check_variant(flipped, "int8", "cpu", tile, 40, 200, torch.float32)
    assert qv.check_variant(short, "int8", "cpu", tile, 40, 200, torch.float32)
    assert qv.check_variant(off, "fp8", "cpu", tile, 40, 200, torch.float32)
    right = qv.VARIANTS["fp8_tensor_core"]
    assert qv.check_variant(right, "fp8", "cpu", tile, 40, 200, torch.float32) == []


@interpreter_test
@pytest.mark.parametrize("k", [64, 300, 2048])
def test_per_token_int8_is_its_twin_bit_for_bit_interpreter(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g) * 3
    x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5])  # scale 1: ties to even
    x[0, 6:] = x[0, 6:].clamp(-100, 100)
    for row in (x, x.to(torch.bfloat16), torch.zeros(1, k)):
        q, scale = qv.per_token_int8(row)
        want_q, want_scale = qv.per_token_int8_ref(row)
        assert torch.equal(scale, want_scale) and torch.equal(q, want_q)
    assert qv.per_token_int8(x)[0][0, :6].tolist() == [127, 0, 2, 2, -2, 0]


@pytest.fixture
def tiny_flow(monkeypatch):
    """The script's GPU flow made to run on CPU: tiny shapes and tiles, weights on CPU, a fake
    clock (microseconds = 10 + block_n, after running the GEMV on every copy), and a variant
    ``broken`` whose GEMV raises (as one that does not compile would)."""
    shapes = {"tiny": {"qkv": (96, 128, "norm"), "o": (64, 128, "plain")}}
    monkeypatch.setattr(qv, "SHAPES", shapes)
    monkeypatch.setattr(qv, "CHECK_SHAPE", (40, 200))
    monkeypatch.setattr(qv, "CUDA_CORE_TILES", [(16, 64, 4)])
    monkeypatch.setattr(qv, "DOT_TILES", [(16, 64, 4), (32, 32, 4)])
    # The interpreter widens e4m3's NaN bytes (test_conversion_is_exact_on_all_256_bytes_*).
    conversions = [c for c in qv.CONVERSIONS if c[:3] != ("cast", torch.float32, "fp8")]
    monkeypatch.setattr(qv, "CONVERSIONS", conversions)

    def weights(n, k, kind, copies):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)) / k**0.5
        return [(w.to(torch.bfloat16), None)] if kind == "bf16" else [
            qv.random_weights(n, k, kind, "cpu", seed=n)]  # fmt: skip

    def fake_us(fn, copies, tile):
        for w, s in copies:
            fn(w, s, **tile)
        return 10.0 + tile["block_n"]

    def raises(x):
        def run(w, s, **tile):
            raise RuntimeError("does not compile")

        return run, x.double()

    monkeypatch.setattr(qv, "_weights", weights)
    monkeypatch.setattr(qv, "time_us", fake_us)
    monkeypatch.setitem(qv.VARIANTS, "broken", qv.Variant("broken", ("int8",), False, raises))


@interpreter_test
def test_checks_then_timings_then_the_layer_summary_interpreter(tiny_flow, capsys):
    """A variant that raises is reported failed and never timed, the others are checked and
    timed at each tile, and the summary adds each role's fastest tile."""
    names = ["baseline", "int8_magic", "broken", "fp8_tensor_core_prequant"]
    failed = qv.run_checks(names, ["int8", "fp8"], device="cpu")
    assert failed == {("broken", "int8")}
    assert "does not compile" in capsys.readouterr().out
    rows = qv.bench(["tiny"], names, ["int8", "fp8"], True, 1, failed, device="cpu")
    timed = {(r["role"], r["weights"], r["variant"], tuple(r["tile"])): r for r in rows}
    assert ("o", "int8", "baseline", qv.package_gemv.O_TILE_1B) in timed  # the package's tile
    assert ("qkv", "bf16", "baseline", qv.package_gemv.QKV_TILE) in timed
    assert not any(key[2] == "broken" for key in timed)
    o_magic = timed["o", "int8", "int8_magic", (16, 64, 4)]
    assert o_magic["us"] == 26.0 and o_magic["x_package"] == 18.0 / 26.0
    assert o_magic["x_bf16"] == timed["o", "bf16", "baseline", qv.package_gemv.O_TILE]["us"] / 26.0
    summary = {(s["weights"], s["variant"]): s for s in qv.summarize(rows)}
    assert set(summary) == {("int8", "baseline"), ("int8", "int8_magic"),
                            ("fp8", "baseline"), ("fp8", "fp8_tensor_core_prequant")}  # fmt: skip
    fp8_dot = summary["fp8", "fp8_tensor_core_prequant"]
    assert fp8_dot["layer_us"] == 2 * 26.0 and fp8_dot["tiles"]["o"] == [16, 64, 4]
    # q/k/v's best is the 16-row sweep tile (its package tile has 32 rows), o's its 8-row one
    assert summary["int8", "baseline"]["layer_us"] == 26.0 + 18.0


@interpreter_test
def test_main_writes_the_rows_and_fails_on_a_failed_check_interpreter(
    tiny_flow, monkeypatch, tmp_path
):
    monkeypatch.setattr(qv, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a CPU")
    out = tmp_path / "variants.json"
    args = ["--models", "tiny", "--no-sweep", "--repeats", "1", "--out", str(out)]
    assert qv.main([*args, "--variants", "baseline,int8_magic", "--kinds", "int8"]) == 0
    result = json.loads(out.read_text())
    assert result["failed"] == [] and result["device"] == "a CPU"
    assert {r["variant"] for r in result["rows"]} == {"baseline", "int8_magic"}
    assert {s["variant"] for s in result["summary"]} == {"baseline", "int8_magic"}
    assert qv.main([*args, "--variants", "baseline,broken", "--kinds", "int8"]) == 1
    assert json.loads(out.read_text())["failed"] == [["broken", "int8"]]


@pytest.mark.slow
def test_cheaper_variants_compile_without_the_conversion_for_sm90(tmp_path):
    """The premise of the variants, in the SASS of their main loops (compiled for sm_90 by
    this Triton's ptxas in a fresh process, no GPU needed): a plain int8 cast converts every
    weight (I2F, ``convert_fma``); the package's loop (which adopted int8_magic), int8_magic,
    int8_prmt and the e4m3 tensor-core loop convert none."""
    nvidia = Path(triton.__file__).parent / "backends/nvidia/bin"
    if not (nvidia / "ptxas").exists() or not (nvidia / "cuobjdump").exists():
        pytest.skip("this Triton install has no ptxas/cuobjdump for sm_90")
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--sass", "--no-sweep", "--variants",
           "baseline,convert_fma,int8_magic,int8_prmt,fp8_tensor_core", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {(r["variant"], r["weights"]): r for r in json.loads(out.read_text())["sass"]}
    cast = rows["convert_fma", "int8"]
    assert cast["conversion_per_weight"] == 1.0 and cast["bound"] == "conversion"
    cheaper = [("baseline", "int8"), ("int8_magic", "int8"), ("int8_prmt", "int8"),
               ("fp8_tensor_core", "fp8")]  # fmt: skip
    for key in cheaper:
        assert rows[key]["conversion_per_weight"] == 0.0, key
        assert rows[key]["clocks_per_weight"] < cast["clocks_per_weight"], key
    assert (
        rows["int8_prmt", "int8"]["alu_per_weight"] < rows["int8_magic", "int8"]["alu_per_weight"]
    )


def test_the_script_refuses_unknown_names():
    with pytest.raises(SystemExit):
        qv.main(["--variants", "baseline,int9_magic", "--sass"])
    with pytest.raises(SystemExit):
        qv.main(["--repeats", "0"])


# --- GPU ------------------------------------------------------------------------------------


def _skip_without_fp8(kind: str) -> None:
    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs compute capability 8.9 or later")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("name", "dtype", "kind", "users"), qv.CONVERSIONS)
def test_conversion_is_exact_on_all_256_bytes_cuda(name, dtype, kind, users):
    _skip_without_fp8(kind)
    assert qv.conversion_mismatches(name, dtype, kind, "cuda") == []


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("name", "kind", "dtype"), _cases(True) + _cases(False))
@pytest.mark.parametrize(("n", "k"), [(1000, 3000), (4096, 14336)])
def test_variant_matches_the_float64_reference_cuda(name, kind, dtype, n, k):
    """Every tile the benchmark times for bf16 rows (what it times); the first for the others
    (each tile and dtype is a compilation)."""
    _skip_without_fp8(kind)
    variant = qv.VARIANTS[name]
    weight = torch.empty(1, 1, dtype=qv.WEIGHT_DTYPES[kind])
    tiles = variant.tiles("o", weight, sweep=dtype == torch.bfloat16)
    assert qv.check_variant(variant, kind, "cuda", tiles, n, k, dtype) == []
