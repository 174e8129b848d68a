"""Validate once, step many times: the fast path the drop-in optimizers take.

A ``torch.optim`` step on a small model is dominated by per-tensor Python work, not by the
arithmetic: for the 18 tensors of the conv-4 network, checking every tensor of every list on
every call costs more than the fused kernel itself. A :class:`PreparedStep` checks the params
and the state lists once (device, dtype, shape, contiguity), resolves the implementation once,
and keeps the addresses. Each call then only checks the new gradients and that no param or
state tensor has moved (``p.data = ...`` gives it a new address), and re-prepares if one has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastmeta import backends
from fastmeta.backends import Impl
from fastmeta.ops import tensor_lists as tl


class PreparedStep:
    """One in-place multi-tensor op bound to fixed params and state lists.

    Args:
        op: the op's name (``"adam_step_"``), for messages and :func:`backends.trace`.
        step_fn: the public op (``adam_step_``), called for the reference and Triton paths.
        native_name: the ``fastmeta._C`` function of the op (``"adam_step"``).
        params: the tensors to update.
        states: the op's state lists in its positional order; None for an unused one.
        state_steps: the step counters, for ops that keep them; None otherwise.
        impl: the requested implementation, resolved here once.
        watch_state: also check on each call that the state tensors have not moved. The
            optimizers pass False: they own their state, replace it only through
            ``load_state_dict`` (which drops their plans), and so check the params alone.
    """

    def __init__(
        self,
        op: str,
        step_fn: Callable[..., None],
        native_name: str,
        params: Sequence[torch.Tensor],
        states: Sequence[tuple[str, Sequence[torch.Tensor] | None]],
        state_steps: Sequence[torch.Tensor] | None,
        *,
        impl: Impl | str,
        watch_state: bool = True,
    ) -> None:
        self.op = op
        self.step_fn = step_fn
        self.native_name = native_name
        self.params = list(params)
        self.states = [None if s is None else list(s) for _, s in states]
        self.state_steps = None if state_steps is None else list(state_steps)
        device = tl.check_params(op, self.params)
        for name, tensors in states:
            if tensors is not None:
                tl.check_like_params(op, name, tensors, self.params)
        self.impl = backends.resolve(impl, device, op=op, record=False)
        self._native = None
        if self.impl is Impl.NATIVE and self.params:
            tl.check_contiguous(op, "params", self.params)
            for name, tensors in states:
                if tensors is not None:
                    tl.check_contiguous(op, name, tensors)
            self._native = getattr(backends.native(), native_name)
            self._state_pointers = [tl.pointers(s) if s is not None else [] for s in self.states]
            self._step_args: list = []
            if self.state_steps is not None:
                step_dtype = tl.check_steps(op, self.state_steps, self.params)
                tl.require_cpu_steps(op, self.state_steps)
                self._step_args = [tl.pointers(self.state_steps), step_dtype]
            self._numels = tl.numels(self.params)
            self._dtypes = tl.dtype_codes(self.params)
            self._shapes = [p.shape for p in self.params]
            self._dtype_objs = [p.dtype for p in self.params]
            self._param_pointers = tl.pointers(self.params)
            self._watched = list(self.params)
            if watch_state:
                self._watched += [t for s in self.states if s for t in s]
                if self.state_steps is not None:
                    self._watched += self.state_steps
            self._watched_pointers = tl.pointers(self._watched)

    def native_group(self, params: list[torch.Tensor]):
        """This plan as a ``fastmeta._C.PreparedGroup`` bound to ``params`` (the param group's
        own tensors, the ones this plan was prepared for), for the optimizers' per-step fast
        path; None when the plan does not run natively."""
        if self._native is None:
            return None
        steps, step_dtype = self._step_args if self._step_args else ([], 0)
        return backends.native().PreparedGroup(
            self.op, list(params), self._param_pointers, self._state_pointers, steps, step_dtype,
            self._numels, self._dtypes,
        )

    def still_valid(self) -> bool:
        """False when a param or state tensor no longer lives where it was prepared."""
        if self._native is None:
            return True
        return tl.pointers(self._watched) == self._watched_pointers

    def __call__(
        self,
        grads: Sequence[torch.Tensor],
        *,
        validated: bool = False,
        grads_from_params: bool = False,
        **hyper,
    ):
        """Runs the op on ``grads`` (one per param); returns what the op returns (None for
        the plain optimizers, ``(h, new_lr)`` for the hypergradient ones).

        Args:
            grads: the gradients, one per param.
            validated: the caller has just checked :meth:`still_valid` (the optimizers do,
                for all of a group's plans before running any); otherwise it is checked here.
            grads_from_params: the grads are the params' dense ``.grad`` (the optimizers refuse
                sparse ones first, with torch's message); torch itself guarantees their shape,
                dtype and device match the param's, so only strides are checked then.
            hyper: the op's hyperparameters (tensors are read as numbers).
        """
        if self._native is None:
            args = [self.params, grads, *self.states]
            if self.state_steps is not None:
                args.append(self.state_steps)
            return self.step_fn(*args, impl=self.impl, **hyper)
        if not validated and not self.still_valid():
            raise RuntimeError(f"{self.op}: a param or state tensor moved since this step was "
                               "prepared (e.g. `p.data = ...`); prepare it again")
        backends.note(self.op, self.impl)
        grad_pointers = self._grad_pointers(grads, grads_from_params)
        for name, value in hyper.items():
            if isinstance(value, torch.Tensor):
                hyper[name] = tl.check_scalar(self.op, name, value)
        return self._native(
            self._param_pointers, grad_pointers, *self._state_pointers,
            *self._step_args, self._numels, self._dtypes, **hyper,
        )

    def _grad_pointers(self, grads: Sequence[torch.Tensor], from_params: bool) -> list[int]:
        if len(grads) != len(self.params):
            raise ValueError(f"{self.op}: grads has {len(grads)} tensors but params has "
                             f"{len(self.params)}")
        if not from_params:
            for g, shape, dtype in zip(grads, self._shapes, self._dtype_objs):
                if g.shape != shape or g.dtype != dtype or not g.is_cpu or g.is_sparse:
                    tl.check_like_params(self.op, "grads", grads, self.params)  # raises
        if all([g.is_contiguous() for g in grads]):
            self._keepalive = []
            return [g.data_ptr() for g in grads]
        # The kernel reads a contiguous copy of a strided gradient; keep it alive for the call.
        self._keepalive = [g if g.is_contiguous() else g.contiguous() for g in grads]
        return [g.data_ptr() for g in self._keepalive]
