"""The sync-free training step, captured as one CUDA graph (``--cuda_graphs``).

``TrainStep`` reads one value back from the device every step: whether to skip
the update.  On a GPU that read drains the queue each step. A step that reads
the device also cannot be captured in a CUDA graph.  ``SyncFreeStep``
decides on the device instead. Every update is computed, then applied with
weight 1 (take) or 0 (skip), so the step is one fixed sequence of kernels,
from the forward to the EMA:

- Adamax with the decision as a mask (``MaskedAdamax``).  A skipped update
  leaves the weights, both moments and the step count exactly as they were.
  The optimiser object and its checkpoints stay torch.optim.Adamax's, so a run
  may change between the two steps when it resumes.
- The EMA moves by (1 - decay) times keep (keep is 1 for a taken update, 0 for
  a skipped one).
- Where the update is skipped, BatchNorm statistics and the power-iteration
  vectors are put back with ``torch.where``, not a branch.
- The schedules' numbers (learning rate, KL weight, regulariser weight, EMA
  decay) are written into device scalars before each step.

On CUDA, after ``WARMUP_STEPS`` eager steps on a side stream (lazy
initialisation, cuDNN autotuning), the step is captured once with
``torch.cuda.graph``. From then on, each step is one graph replay instead of
thousands of launches.  A change in the step's structure makes a new capture:
KL balancing switching off at the end of the KL warm-up, or the regulariser's
weight reaching 0.  A batch of another shape runs eagerly.  ``graph_blockers``
lists the features a capture cannot hold; with any of them the run takes
``TrainStep``'s eager steps and says why.  Under DDP the ranks agree on the
skip inside the step and on a stop outside it, warm up for 11 steps, and replay
only if every rank captured.  On the CPU the same step runs without capture,
and the tests compare it with ``TrainStep``.

The step's metrics are the graph's output tensors, rewritten by the next
replay: read them (``hvae.logger``) before the next step.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from hvae.config import Config
from hvae.runtime import Runtime
from hvae.step import StepValues, TrainStep

WARMUP_STEPS = 3  # eager steps before the first capture (PyTorch's advice: a few, on a side stream)
DDP_WARMUP_STEPS = 11  # under DDP: PyTorch's CUDA notes ask for at least 11 before a capture


def graph_blockers(config: Config, runtime: Runtime) -> list[str]:
    """Why this run cannot capture its step in a CUDA graph (empty: it can)."""
    reasons = []
    if runtime.device.type != "cuda":
        reasons.append(f"CUDA graphs need a CUDA device, and this run is on {runtime.device.type}")
    return reasons


class MaskedAdamax:
    """Adamax updates of a ``torch.optim.Adamax``'s parameters, skipped on the device.

    Adamax (Kingma & Ba 2015, Algorithm 2, with torch's L2 weight decay and eps)::

        g     <- g + wd * theta
        m     <- m + (1 - beta1) * (g - m)
        u     <- max(beta2 * u, |g| + eps)
        theta <- theta - lr / (1 - beta1^t) * m / u

    With ``skip`` true, every line is the identity, with no branch.  The
    weight of g in m becomes 0 and the decay of u becomes 1.  The bound
    |g| + eps is multiplied by 0, t does not count, and the step size is 0.
    Gradients of a skipped update are often NaN, so they are zeroed first:
    0 * NaN would leak.  u is read as at least eps, which changes nothing after a taken
    update (then u >= eps) and avoids 0/0 for a parameter never updated yet.

    t is one device scalar, ``count``, shared by every parameter.  torch's
    per-parameter ``state["step"]`` is written from it when the optimiser's state
    is saved, and read back from it when a state is loaded (hooks), so
    checkpoints keep torch's layout.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        if not isinstance(optimizer, torch.optim.Adamax):
            raise TypeError(f"the sync-free step updates with Adamax, not {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.count = torch.zeros((), device=device)
        self.read_count()
        optimizer.register_state_dict_pre_hook(lambda opt: self.write_count())
        optimizer.register_load_state_dict_post_hook(lambda opt: self.read_count())

    def read_count(self) -> None:
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        self.count.fill_(max(steps, default=0.0))

    def write_count(self) -> None:
        """Each parameter's ``state["step"]``, from ``count`` (a host read: checkpoints only)."""
        t = float(self.count)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(t, dtype=torch.float32)  # torch's eager layout: CPU

    def _state(self, p: torch.Tensor) -> dict:
        state = self.optimizer.state[p]
        if not state:  # what torch.optim.Adamax would create
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, lr: torch.Tensor, skip: torch.Tensor, zero_skipped_grads: bool = True) -> None:
        """One update with learning rate ``lr`` unless ``skip`` (both 0-d device tensors).
        ``zero_skipped_grads=False``: the caller already zeroed a skipped update's gradients."""
        keep = (~skip).float()
        self.count.add_(keep)
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group.get("maximize"):
                raise ValueError("the sync-free step does not support Adamax(maximize=True)")
            (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            states = [self._state(p) for p in params]
            exp_avgs, exp_infs = [s["exp_avg"] for s in states], [s["exp_inf"] for s in states]
            grads = [p.grad for p in params]
            for g in grads if zero_skipped_grads else ():
                g.masked_fill_(skip, 0.0)
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            mix = torch._foreach_sub(grads, exp_avgs)                 # m += (1 - beta1) (g - m)
            torch._foreach_mul_(mix, torch.where(skip, 0.0, 1 - beta1))
            torch._foreach_add_(exp_avgs, mix)
            torch._foreach_mul_(exp_infs, torch.where(skip, 1.0, beta2))  # u = max(beta2 u, |g| + eps)
            bound = torch._foreach_abs(grads)
            torch._foreach_add_(bound, eps)
            torch._foreach_mul_(bound, keep)
            torch._foreach_maximum_(exp_infs, bound)
            step_size = -lr * keep / (1 - beta1 ** self.count.clamp_min(1))
            update = torch._foreach_div(exp_avgs, torch._foreach_clamp_min(exp_infs, eps))
            torch._foreach_mul_(update, step_size)
            torch._foreach_add_(params, update)


class SyncFreeStep(TrainStep):
    """``TrainStep`` with the skip decided on the device: no host read in the step.

    ``capture``: capture the step in a CUDA graph and replay it (CUDA only).
    The metrics' ``skipped`` is a device tensor here.

    Under DDP the ranks agree on the skip on the device (an all-reduce inside the
    step, captured with it), and on stopping after a signal with one host read per
    step, outside the graph: the agreement waits for the step to finish, and with
    a replayed step the GPU then idles only while the host launches the next
    replay (a few host ops), not while it dispatches thousands of kernels.
    """

    def __init__(self, *args, capture: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        device = self.runtime.device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA-graph capture needs a CUDA device, not {device}")
        self.adamax = MaskedAdamax(self.optimizer, device)
        self.optimizer.register_load_state_dict_post_hook(lambda opt: self.drop_graph())
        self._scalars = torch.zeros(4, device=device)  # lr, KL weight, reg lambda, EMA weight
        self.capture = capture
        self.autocast_cache = not capture  # cached casts cannot outlive a capture
        self.captures = 0                  # graphs captured so far (the benchmark reports it)
        self._eager_steps = 0
        self._graph = self._graph_key = self._static_in = self._static_out = None
        self._flat_grad = self._flat_gradients()

    # -------------------------------------------------------------- the step
    def __call__(self, x: torch.Tensor | Sequence[torch.Tensor], step: int,
                 stop_requested: bool | Callable[[], bool] = False) -> dict:
        host = StepValues.at(self.schedule, step)
        ema_decay = self.ema.decay_at(step) if self.ema is not None else 0.0
        for slot, value in zip(self._scalars, (host.lr, host.kl_weight, host.reg_lambda,
                                               1 - ema_decay)):
            slot.fill_(value)  # a kernel argument, not a copy: no sync
        lr, kl_weight, reg_lambda, ema_weight = self._scalars.unbind()
        values = StepValues(lr, kl_weight, reg_lambda, host.balancing, host.regularise)
        micro = [self.on_device(m) for m in (x if isinstance(x, (list, tuple)) else [x])]
        settling = host.regularise and not self.spectral.settled
        if self.capture:
            metrics = self._replayed(micro, values, ema_weight, eager=settling)
        else:
            metrics = self.device_step(micro, values, ema_weight)
        if settling and bool(metrics["skipped"]):  # HOST SYNC: only until an update is taken
            # the skip restored the power-iteration vectors and the flag of the regulariser's
            # longer first call: repeat that call next step, as TrainStep does
            self.spectral.forget_host_flag()
        if callable(stop_requested):
            stop_requested = stop_requested()
        return {**metrics, "stop": self.agree_on_stop(bool(stop_requested))}

    def agree_on_stop(self, requested: bool) -> bool:
        """Whether any rank was asked to stop (this rank's own flag outside DDP)."""
        if not self.runtime.distributed:
            return requested
        flag = torch.tensor(int(requested), device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)  # HOST SYNC under DDP: the step's only one, outside any graph

    def agree_on_skip(self, skip: torch.Tensor) -> torch.Tensor:
        """Skip where any rank decided to (an all-reduce on the device, no host read).
        The gradient norm is the same on every rank, but the loss checked for NaN is not."""
        if not self.runtime.distributed:
            return skip
        flag = skip.to(torch.int32)  # collectives do not reduce bools
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag > 0

    def _flat_gradients(self) -> torch.Tensor:
        """One buffer for all gradients, each parameter's ``.grad`` a view of it in the
        parameter's own layout; backward accumulates into the views.  Zeroing, masking,
        the norm and clipping are then one kernel each instead of one per parameter
        (2,557 for cifar10).  Every parameter takes part in every update: hvae's models
        have no parameter without a gradient (tests/test_graphed_step.py checks)."""
        if len({p.dtype for p in self.params}) != 1:
            raise ValueError("the sync-free step needs all parameters in one dtype")
        flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype,
                           device=self.params[0].device)
        for p, part in zip(self.params, flat.split([p.numel() for p in self.params])):
            dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(
                memory_format=torch.channels_last))
            p.grad = part.as_strided(p.shape, p.stride()) if dense else part.view(p.shape)
        return flat

    def clear_gradients(self) -> None:
        """Zero the gradients in place: a captured graph keeps their addresses."""
        self._flat_grad.zero_()

    def clip_gradients(self) -> torch.Tensor:
        """As ``clip_grad_norm_`` (scale by max_norm / norm, at most 1), on the flat buffer."""
        norm = torch.linalg.vector_norm(self._flat_grad)
        if self.config.grad_clip > 0:
            self._flat_grad.mul_((self.config.grad_clip / (norm + 1e-6)).clamp_max(1.0))
        return norm

    def device_step(self, micro: list[torch.Tensor], values: StepValues,
                    ema_weight: torch.Tensor) -> dict:
        """Forward, backward, decision and masked update, all on the device."""
        loss, reg = self.forward_backward_all(micro, values)
        norm, skip = self.clip_and_decide(loss)
        skip = self.agree_on_skip(skip)
        self.skipper.record(norm, skip)
        for state, saved in zip(self._forward_state, self._forward_backup):
            torch.where(skip, saved, state, out=state)  # a skipped update leaves no trace
        self._flat_grad.masked_fill_(skip, 0.0)  # a skipped update's gradients may be NaN
        self.adamax.step(values.lr, skip, zero_skipped_grads=False)
        if self.scaler.is_enabled():
            self.scaler.update()  # backs off when unscale_ found an overflow
        if self.ema is not None:
            self.ema.update(weight=ema_weight * (~skip).float())
        return {**self.metrics(loss, reg, values, norm.detach()), "skipped": skip,
                "skipped_total": self.skipper.skipped}

    # ---------------------------------------------------------- CUDA graphs
    def drop_graph(self) -> None:
        """Forget the captured graph (a loaded state replaces the tensors it wrote)."""
        self._graph = self._graph_key = self._static_in = self._static_out = None

    def release_graph(self) -> None:
        """Give the captured graph's memory back, before evaluation: a graph keeps the
        step's activations in its own pool, which evaluation could not use.  The next
        step captures again (no warm-up: a second or so)."""
        if self._graph is not None:
            self.drop_graph()
            if self.runtime.device.type == "cuda":
                torch.cuda.empty_cache()

    def _replayed(self, micro: list[torch.Tensor], values: StepValues,
                  ema_weight: torch.Tensor, eager: bool = False) -> dict:
        """The step by graph replay; eager on a side stream while warming up or ``eager``."""
        key = (values.balancing, values.regularise)
        if self._graph is not None and key != self._graph_key:
            self.drop_graph()  # the step's structure changed: capture it again
        warmup = DDP_WARMUP_STEPS if self.runtime.distributed else WARMUP_STEPS
        if eager or (self._graph is None and self._eager_steps < warmup):
            self._eager_steps += 1
            with side_stream(self.runtime.device):
                return self.device_step(micro, values, ema_weight)
        if self._graph is None:
            self._capture(micro, values, ema_weight, key)
            if self._graph is None:  # the capture failed and said why
                return self.device_step(micro, values, ema_weight)
        if [(m.shape, m.dtype) for m in micro] != [(s.shape, s.dtype) for s in self._static_in]:
            return self.device_step(micro, values, ema_weight)  # another batch shape: eager
        for static, m in zip(self._static_in, micro):
            static.copy_(m)
        self._graph.replay()
        return self._static_out

    def _capture(self, micro: list[torch.Tensor], values: StepValues, ema_weight: torch.Tensor,
                 key: tuple) -> None:
        """Capture one step on ``micro`` (its first replay does the step's work).  Under
        DDP every rank replays its graph, or none does: a graph's all-reduces pair up
        with the other ranks' only if those are captured too (NCCL's rule)."""
        self._static_in = [m.clone() for m in micro]
        start = time.perf_counter()
        error = None
        try:
            graph, out = capture_graph(
                lambda: self.device_step(self._static_in, values, ema_weight), self.runtime.device)
        except RuntimeError as err:
            error = next((l for l in str(err).splitlines() if l.strip()), type(err).__name__)
        if self.runtime.distributed:
            failed = torch.tensor(int(error is not None), device=self.runtime.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if bool(failed) and error is None:  # HOST SYNC: once per capture
                error = "another rank could not capture its step"
        if error is not None:
            print(f"--cuda_graphs: capturing the step failed ({error}); continuing with "
                  "the same step uncaptured", file=sys.stderr, flush=True)
            self.capture = False
            self.autocast_cache = True
            self.drop_graph()
            getattr(self.scaler, "_per_optimizer_states", {}).clear()  # its unscale_ was recorded
            return
        self._graph, self._graph_key, self._static_out = graph, key, out
        self.captures += 1
        if self.runtime.is_main:
            print(f"--cuda_graphs: training step captured in {time.perf_counter() - start:.1f} s "
                  f"(KL balancing {'on' if key[0] else 'off'}); replaying it from now on",
                  file=sys.stderr, flush=True)


# The CUDA calls, apart so that the tests can stand in for them on the CPU.
def capture_graph(fn: Callable[[], dict], device: torch.device) -> tuple[torch.cuda.CUDAGraph, dict]:
    """Capture ``fn()`` as a CUDA graph: (the graph, ``fn``'s outputs, which each replay
    rewrites).  ``torch.cuda.graph`` first synchronises and empties the allocator's cache,
    so the warm-up's cached blocks go to the graph's own pool."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the DataLoader's pin-memory thread may call CUDA meanwhile
    with torch.cuda.device(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a fresh stream, ordered after and before the current one's work
    (warm-up steps before a capture, as PyTorch's CUDA-graph notes advise).  Other
    devices have no streams: the block runs as it is."""
    if device.type != "cuda":
        yield
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)
