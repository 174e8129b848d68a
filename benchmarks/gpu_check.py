"""The prepared device check for a lent NVIDIA GPU (run through ``benchmarks/gpu_check``).

1. Correctness: every Triton op against the PyTorch reference on CUDA tensors (in-place
   multi-tensor steps over several steps and dtypes; the differentiable steps forward and
   backward).
2. Speed: ``fastmeta.optim.Adam``/``SGD`` (Triton) against torch's for-loop, foreach and fused
   CUDA optimizers, and the differentiable Adam step on ``[8, 1M]`` against eager autograd and
   ``torch.func.vmap``; each as a percentage of the measured device-to-device copy bandwidth.

Results go to ``--out`` (JSON + a text table) and to stdout. Designed to finish in a few
minutes on an H200.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

from fastmeta import functional
from fastmeta.bench import harness, inner
from fastmeta.bench.optimizers import TORCH_VARIANTS, bench_optimizer
from fastmeta.ops.adagrad import adagrad_step_
from fastmeta.ops.adam import adam_step_
from fastmeta.ops.rmsprop import rmsprop_step_
from fastmeta.ops.sgd import sgd_step_

SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (3, 5, 7), (64, 1, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Where the checks run; --dry-run-on-cpu switches to CPU tensors (Triton interpreted).
DEVICE = "cuda"
TOL = {torch.float64: 1e-7, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inplace_cases():
    """(name, run(params, grads, states, steps, impl), state count, uses steps)"""
    return [
        ("sgd momentum nesterov", lambda p, g, s, t, impl, first: sgd_step_(
            p, g, s[0], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
            first_step=first, impl=impl), 1, False),
        ("adam amsgrad", lambda p, g, s, t, impl, first: adam_step_(
            p, g, s[0], s[1], s[2], t, lr=1e-2, amsgrad=True, weight_decay=0.1, impl=impl),
         3, True),
        ("adamw", lambda p, g, s, t, impl, first: adam_step_(
            p, g, s[0], s[1], None, t, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
            impl=impl), 2, True),
        ("adagrad", lambda p, g, s, t, impl, first: adagrad_step_(
            p, g, s[0], t, lr=0.1, lr_decay=0.01, impl=impl), 1, True),
        ("rmsprop centered momentum", lambda p, g, s, t, impl, first: rmsprop_step_(
            p, g, s[0], s[1], s[2], t, lr=1e-2, momentum=0.9, centered=True, impl=impl),
         3, True),
    ]


def check_inplace() -> list[dict]:
    results = []
    for name, run, n_states, uses_steps in _inplace_cases():
        for dtype in DTYPES:
            gen = torch.Generator().manual_seed(0)
            base = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in SHAPES]
            grads = [[torch.randn(s, generator=gen).to(DEVICE, dtype) for s in SHAPES]
                     for _ in range(3)]
            outs = {}
            for impl in ("reference", "triton"):
                params = [p.clone() for p in base]
                states = [[(p.abs() if k == 0 and "adagrad" in name else torch.zeros_like(p))
                           for p in params] for k in range(n_states)]
                steps = [torch.zeros((), device=DEVICE) for _ in params] if uses_steps else None
                for k in range(3):
                    run(params, grads[k], states, steps, impl, k == 0)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                outs[impl] = params + [t for s in states for t in s]
            err = max(((a.double() - b.double()).abs() / (b.double().abs() + 1)).max().item()
                      if a.numel() else 0.0 for a, b in zip(outs["triton"], outs["reference"]))
            results.append({"check": f"{name} {str(dtype)[6:]}", "max_rel_err": err,
                            "ok": err <= 3 * TOL[dtype]})
    return results


def check_differentiable() -> list[dict]:
    results = []
    cases = {
        "sgd": lambda p, g, impl: functional.sgd(p, g, lr=torch.full((4,), 0.1, device=DEVICE,
                                                                      dtype=p.dtype), impl=impl),
        "momentum": lambda p, g, impl: functional.momentum(p, g, None, lr=0.1, momentum=0.9,
                                                           impl=impl),
        "adam": lambda p, g, impl: functional.adam(p, g, None, lr=0.1, eps_root=1e-12,
                                                   impl=impl),
        "rmsprop": lambda p, g, impl: functional.rmsprop(p, g, None, lr=0.1, impl=impl),
        "adagrad": lambda p, g, impl: functional.adagrad(p, g, None, lr=0.1, impl=impl),
    }
    # flash-attention's rule: the kernel's error against an fp64 reference may be at most
    # twice the error of the same computation done by PyTorch in fp32.
    for name, fn in cases.items():
        try:
            gen = torch.Generator().manual_seed(0)
            p0, g0, up = (torch.randn(4, 5000, generator=gen, dtype=torch.float64).to(DEVICE)
                          for _ in range(3))
            outs = {}
            for impl, dtype in (("reference", torch.float64), ("reference", torch.float32),
                                ("triton", torch.float32)):
                p = p0.to(dtype).requires_grad_()
                g = g0.to(dtype).requires_grad_()
                new, _ = fn(p, g, impl)
                dp, dg = torch.autograd.grad(new, (p, g), up.to(dtype))
                outs[(impl, dtype)] = [t.detach().double() for t in (new, dp, dg)]
            exact = outs[("reference", torch.float64)]

            def error(key, exact=exact, outs=outs):
                return max((a - b).abs().max().item() for a, b in zip(outs[key], exact))

            kernel_err = error(("triton", torch.float32))
            torch_err = error(("reference", torch.float32))
            results.append({"check": f"differentiable {name} float32 (fwd+bwd)",
                            "max_rel_err": kernel_err, "torch_fp32_err": torch_err,
                            "ok": kernel_err <= 2 * torch_err + 1e-7})
        except Exception as exc:  # report, don't stop the rest of the check
            results.append({"check": f"differentiable {name}",
                            "error": f"{type(exc).__name__}: {exc}", "ok": False})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--dry-run-on-cpu", action="store_true",
                        help="run only the correctness checks, on CPU tensors with Triton's "
                        "interpreter (needs TRITON_INTERPRET=1): tests this script without a GPU")
    args = parser.parse_args()
    if args.dry_run_on_cpu:
        global DEVICE
        DEVICE = "cpu"
        checks = check_inplace() + check_differentiable()
        for c in checks:
            print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}: "
                  f"{c.get('max_rel_err', c.get('error'))} (torch fp32: {c.get('torch_fp32_err')})")
        return 0 if all(c["ok"] for c in checks) else 1
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with an NVIDIA GPU")
        return 2
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(f"copy bandwidth: {harness.cuda_copy_bandwidth() / 1e9:.0f} GB/s")
    checks = check_inplace() + check_differentiable()
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}: "
              + (f"max rel err {c['max_rel_err']:.2e}" if "max_rel_err" in c else c["error"]))
    rows = []
    for name in ("Adam", "SGD"):
        try:
            rows += list(bench_optimizer(name, workloads=["conv4", "resnet18", "single_16m"],
                                         min_run_time=0, device="cuda", progress=lambda m: None))
        except Exception:
            traceback.print_exc()
    try:
        rows += list(inner.adam_step_rows(min_run_time=0, device="cuda"))
    except Exception:
        traceback.print_exc()
    table = harness.format_table(rows, list(TORCH_VARIANTS) + ["eager autograd",
                                                               "torch.func vmap"])
    print(table)
    with open(os.path.join(args.out, "gpu_check.txt"), "w") as f:
        f.write(table + "\n")
    harness.write_json(os.path.join(args.out, "gpu_check.json"), "gpu_check", rows,
                       extra={"checks": checks, "copy_bandwidth_Bps": harness.cuda_copy_bandwidth(),
                              "seconds": time.perf_counter() - started})
    print(f"gpu_check: {sum(c['ok'] for c in checks)}/{len(checks)} checks ok, "
          f"{time.perf_counter() - started:.0f} s")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
