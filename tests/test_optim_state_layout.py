"""The drop-in optimizers lay each state key of a param group out in one buffer
(fastmeta.optim.optimizer.new_state); to the user the state is torch.optim's."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fastmeta.optim as fo
from fastmeta.optim.optimizer import new_state

# (optimizer, its options, the state keys that are per-element tensors)
CASES = [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, ["momentum_buffer"]),
    ("Adam", {"lr": 1e-2, "amsgrad": True}, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    ("AdamW", {"lr": 1e-2}, ["exp_avg", "exp_avg_sq"]),
    ("Adagrad", {"lr": 0.1, "initial_accumulator_value": 0.5}, ["sum"]),
    ("RMSprop", {"lr": 1e-2, "momentum": 0.5, "centered": True},
     ["square_avg", "momentum_buffer", "grad_avg"]),
    ("SGDHD", {"lr": 0.1, "momentum": 0.9}, ["momentum_buffer", "direction"]),
    ("AdamHD", {"lr": 1e-2}, ["exp_avg", "exp_avg_sq", "direction"]),
]
SHAPES = [(64, 3, 3, 3), (64,), (1,), (0,), (10, 33), (7,)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        p = torch.randn(shape, generator=g).requires_grad_()
        p.grad = torch.randn(shape, generator=g)
        params.append(p)
    return params


@pytest.mark.parametrize("name, options, keys", CASES, ids=[c[0] for c in CASES])
def test_each_state_key_of_a_group_lives_in_one_aligned_buffer(name, options, keys):
    params = _params()
    opt = getattr(fo, name)(params, **options)
    opt.step()
    for key in keys:
        tensors = [opt.state[p][key] for p in params]
        storages = {t.untyped_storage().data_ptr() for t in tensors}
        assert len(storages) == 1, f"{key}: {len(storages)} buffers"
        for p, t in zip(params, tensors):
            assert t.shape == p.shape and t.dtype == p.dtype and t.is_contiguous()
            assert t.data_ptr() % 64 == 0, f"{key}: a slice not on a cache line"
        # No two params share an element.
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                       for t in tensors if t.numel())
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("name, options, keys", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_state_laid_out_in_one_buffer_trains_like_torch_and_round_trips(name, options, keys):
    ours = getattr(fo, name)(_params(), **options)
    ref_params = _params()
    ref = getattr(torch.optim, name)(ref_params, **options)
    for _ in range(5):
        ours.step()
        ref.step()
    # Saved and loaded into torch.optim: training continues identically.
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    state_bytes = sum(ours.state[p][k].numel() * ours.state[p][k].element_size()
                      for p in ours.param_groups[0]["params"] for k in keys)
    assert buffer.tell() < 1.5 * state_bytes + 20_000  # each buffer stored once
    buffer.seek(0)
    ours_params = ours.param_groups[0]["params"]
    loaded = getattr(torch.optim, name)(
        [p.detach().clone().requires_grad_() for p in ours_params], **options)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    for p_loaded, p_ours in zip(loaded.param_groups[0]["params"], ours_params):
        p_loaded.grad = p_ours.grad.clone()
    for _ in range(3):
        ours.step()
        loaded.step()
        ref.step()
    for a, b, c in zip(ours_params, loaded.param_groups[0]["params"], ref_params):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    for key in keys:
        for a, c in zip(ours_params, ref_params):
            torch.testing.assert_close(ours.state[a][key], ref.state[c][key])


def test_deep_copy_keeps_the_buffers_apart():
    opt = fo.Adam(_params(), lr=1e-2)
    opt.step()
    twin = copy.deepcopy(opt)
    twin.step()
    p, q = opt.param_groups[0]["params"][0], twin.param_groups[0]["params"][0]
    assert (opt.state[p]["exp_avg"].untyped_storage().data_ptr()
            != twin.state[q]["exp_avg"].untyped_storage().data_ptr())
    assert not torch.equal(opt.state[p]["exp_avg"], twin.state[q]["exp_avg"])


def test_new_state_keeps_strides_dtypes_and_fill():
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    params = [torch.randn(5), cl, torch.randn(3, dtype=torch.float64), torch.randn(4),
              torch.randn(2, dtype=torch.complex64)]
    out = new_state(params, 0.25)
    assert out[1].stride() == cl.stride()  # torch's preserve_format, a tensor of its own
    assert out[0].untyped_storage().data_ptr() == out[3].untyped_storage().data_ptr()
    assert out[2].dtype == torch.float64 and out[4].dtype == torch.complex64
    for p, t in zip(params, out):
        assert t.shape == p.shape
    for t in out[:4]:
        assert bool((t == 0.25).all())
    assert bool((out[4] == complex(0.25, 0.25)).all())  # as torch's Adagrad fills complex sums
    contiguous = new_state([cl], contiguous=True)[0]
    assert contiguous.is_contiguous() and contiguous.shape == cl.shape


def test_adagrad_made_in_the_constructor_is_torchs_state_in_one_buffer():
    params = _params()
    ours = fo.Adagrad(params, lr=0.1, initial_accumulator_value=0.3)
    ref = torch.optim.Adagrad(_params(), lr=0.1, initial_accumulator_value=0.3)
    sums = [ours.state[p]["sum"] for p in params]
    assert len({t.untyped_storage().data_ptr() for t in sums}) == 1
    for p, q in zip(params, ref.param_groups[0]["params"]):
        assert list(ours.state[p]) == list(ref.state[q])  # same keys, same order
        torch.testing.assert_close(ours.state[p]["sum"], ref.state[q]["sum"])
