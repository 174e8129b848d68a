"""Dispatch: which implementation runs, overrides, errors and the one-time fallback warning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

from fastmeta import backends
from fastmeta.backends import Impl, ImplementationUnavailable
from fastmeta.ops.sgd import sgd_step_


def _step(impl="auto"):
    p, g = torch.ones(4), torch.ones(4)
    with backends.trace() as calls:
        sgd_step_([p], [g], lr=0.5, impl=impl)
    return calls, p


@pytest.fixture
def no_native(monkeypatch):
    """Pretends the extension is not built."""
    monkeypatch.setattr(backends, "_native_loaded", True)
    monkeypatch.setattr(backends, "_native_module", None)
    monkeypatch.setattr(backends, "_native_error", "pretend: not built")
    monkeypatch.setattr(backends, "_warned", set())


def test_parse_rejects_unknown_names():
    with pytest.raises(ValueError, match="impl: expected one of auto, reference, native, triton"):
        _step("cuda-please")


@pytest.mark.native
def test_auto_on_cpu_runs_native(monkeypatch):
    monkeypatch.delenv("FASTMETA_IMPL", raising=False)
    calls, p = _step()
    assert calls == [("sgd_step_", Impl.NATIVE)]
    torch.testing.assert_close(p, torch.full((4,), 0.5))


def test_explicit_reference_runs_reference():
    calls, p = _step("reference")
    assert calls == [("sgd_step_", Impl.REFERENCE)]
    torch.testing.assert_close(p, torch.full((4,), 0.5))


def test_env_override_is_obeyed(monkeypatch):
    monkeypatch.setenv("FASTMETA_IMPL", "reference")
    calls, _ = _step()
    assert calls == [("sgd_step_", Impl.REFERENCE)]


def test_env_override_with_bad_name_raises(monkeypatch):
    monkeypatch.setenv("FASTMETA_IMPL", "fortran")
    with pytest.raises(ValueError, match="impl: expected one of"):
        _step()


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv("FASTMETA_IMPL", "native")
    calls, _ = _step("reference")
    assert calls == [("sgd_step_", Impl.REFERENCE)]


def test_explicit_native_without_extension_raises(no_native):
    with pytest.raises(ImplementationUnavailable, match="impl=native was requested but the "
                       "extension fastmeta._C is not built"):
        _step("native")


def test_env_native_without_extension_raises(no_native, monkeypatch):
    monkeypatch.setenv("FASTMETA_IMPL", "native")
    with pytest.raises(ImplementationUnavailable, match="fastmeta._C is not built"):
        _step()


def test_auto_without_extension_falls_back_and_warns_once(no_native, monkeypatch):
    monkeypatch.delenv("FASTMETA_IMPL", raising=False)
    with pytest.warns(RuntimeWarning, match="falls back to the PyTorch reference"):
        calls, p = _step()
    assert calls == [("sgd_step_", Impl.REFERENCE)]
    torch.testing.assert_close(p, torch.full((4,), 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calls, _ = _step()  # a second fallback is silent
    assert calls == [("sgd_step_", Impl.REFERENCE)]


def test_native_refuses_non_cpu_tensors():
    with pytest.raises(ImplementationUnavailable, match="native kernels run on CPU tensors only"):
        backends.resolve("native", torch.device("meta"), op="x")


def test_triton_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backends, "_triton_checked", True)
    monkeypatch.setattr(backends, "_triton_error", None)
    with pytest.raises(ImplementationUnavailable, match="Triton kernels need CUDA tensors"):
        backends.resolve("triton", torch.device("cpu"), op="x")


def test_auto_on_other_devices_uses_reference(monkeypatch):
    monkeypatch.delenv("FASTMETA_IMPL", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falls back"):
        assert backends.resolve("auto", torch.device("meta"), op="x") is Impl.REFERENCE


def test_available_reports_every_field():
    info = backends.available()
    for key in ("native", "isa", "native_threads", "triton", "cuda", "triton_interpreted",
                "torch_blas"):
        assert key in info
    assert info["cuda"] == torch.cuda.is_available()
    if info["native"]:
        assert info["isa"] in {"avx512", "avx2", "generic"}
        assert info["native_threads"] >= 1
    else:
        assert info["isa"] is None


@pytest.mark.native
def test_extension_imports_and_reports_isa():
    import fastmeta._C as C

    assert C.isa() in {"avx512", "avx2", "generic"}
    assert C.num_threads() == torch.get_num_threads() or C.num_threads() >= 1


@pytest.mark.native
def test_forced_generic_isa_gives_the_same_result():
    """FASTMETA_CPU_ISA=generic runs the portable build; it must agree with the SIMD build."""
    code = (
        "import torch, fastmeta._C as C; from fastmeta.ops.sgd import sgd_step_;"
        "torch.manual_seed(0); p=torch.randn(100003); g=torch.randn(100003);"
        "sgd_step_([p],[g],lr=0.1,weight_decay=0.01,impl='native');"
        "print(C.isa(), repr(p.sum().item()))"
    )
    out = {}
    for isa in ("generic", importlib.import_module("fastmeta._C").isa()):
        env = {**__import__("os").environ, "FASTMETA_CPU_ISA": isa}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        name, total = res.stdout.split()
        assert name == isa
        out[isa] = float(total)
    values = list(out.values())
    assert values[0] == pytest.approx(values[1], rel=1e-6)


@pytest.mark.native
def test_forcing_an_isa_the_build_lacks_is_refused():
    code = "import fastmeta._C"
    env = {**__import__("os").environ, "FASTMETA_CPU_ISA": "sse9"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "FASTMETA_CPU_ISA=sse9" in res.stderr


def test_available_reports_torch_blas_off_when_asked(monkeypatch):
    monkeypatch.setenv("FASTMETA_NO_TORCH_BLAS", "1")
    assert backends.available()["torch_blas"] is False


def test_fastmeta_info_says_whether_native_code_uses_torchs_blas(monkeypatch, capsys):
    from fastmeta.cli import main

    assert main(["info"]) == 0
    found = backends.torch_blas_gemm(torch.float32) is not None
    assert ("found" if found else "not used") in capsys.readouterr().out
    monkeypatch.setenv("FASTMETA_NO_TORCH_BLAS", "1")
    assert main(["info"]) == 0
    assert "torch BLAS from native  not used" in capsys.readouterr().out
