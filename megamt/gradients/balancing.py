"""Per-task loss weights: equal, static, uncertainty, DWA, GradNorm, FAMO.

ZeRO-3 design. A balancer's own parameters (log-variances, GradNorm weights, FAMO
logits) are NOT in the DeepSpeed model: a ZeRO-3 parameter read outside the engine's
forward is an empty shard. Each balancer is a small component replicated on every rank
with its own tiny tensors and optimizer; its gradient (``T`` numbers) is averaged over
the ranks before each of its steps, or it updates in closed form from numbers that are
identical on every rank (global task means, the all-reduced Gram matrix). So every rank
holds bit-identical weights without a broadcast.

Contract (the trainer's calls)::

    loss = balancer.combine(task_means, present)   # differentiable scalar; absent tasks get no weight
    engine.backward(loss)
    ...; engine.step()
    balancer.update(step, task_means.detach(), gram=stats.gram)  # global means; NaN = absent

``combine`` is ``sum_{t present} w_t * mean_t`` (+ the uncertainty regulariser), with
``w = 1`` meaning "plain sum" for every balancer at initialisation (DWA, GradNorm and
FAMO weights sum to ``T``). In gradient-method mode the trainer calls ``combine`` once
per task-homogeneous micro-batch with only that task present; the weights are constant
within a step, so this is the same as one call with every task.

``update`` expects **global** per-task means (identical on all ranks), NaN (or
``present=False``) for tasks absent from the step.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

BALANCERS = ("equal", "static", "uncertainty", "dwa", "gradnorm", "famo")


def world_sum_(t: Tensor) -> Tensor:
    """Sum a small tensor over the ranks in place (no-op without torch.distributed); the
    all-reduce runs on the backend's device (megamt.comm)."""
    from megamt import comm

    if comm.world_size() > 1:
        t.copy_(comm.all_reduce(comm.on_device(t)))
    return t


def _world_mean_(t: Tensor) -> Tensor:
    """Average a small tensor over the ranks in place (no-op without torch.distributed)."""
    from megamt import comm

    return world_sum_(t).div_(comm.world_size())


class LossBalancer:
    """Equal weights; the base of every balancer."""

    name = "equal"

    def __init__(self, task_names: Sequence[str]):
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        self.w = torch.ones(self.num_tasks, dtype=torch.float32)

    # ---------------------------------------------------------------- combine
    def current_weights(self) -> Tensor:
        """The weight vector used by ``combine`` (a tensor; may require grad)."""
        return self.w

    def combine(self, task_means: Tensor, present: Tensor) -> Tensor:
        """``sum_{t present} w_t * mean_t`` as a differentiable scalar."""
        if task_means.shape != (self.num_tasks,) or present.shape != (self.num_tasks,):
            raise ValueError(f"combine: task_means and present must have shape ({self.num_tasks},) for tasks "
                             f"{self.task_names}, got {tuple(task_means.shape)} and {tuple(present.shape)}")
        present = present.to(device=task_means.device, dtype=torch.bool)
        w = self.current_weights().to(task_means.device, task_means.dtype)
        # an absent task's mean may be NaN (0/0): zero it before the product, or its
        # gradient (NaN * 0) would poison the weight's gradient
        safe = torch.where(present, task_means, torch.zeros_like(task_means))
        terms = torch.where(present, w * safe, torch.zeros_like(task_means))
        return terms.sum() + self.regularizer(present)

    def regularizer(self, present: Tensor) -> Tensor | float:
        return 0.0

    # ---------------------------------------------------------------- logging / updates
    def weights(self) -> dict[str, float]:
        w = self.current_weights().detach().float().cpu()
        return {t: float(w[i]) for i, t in enumerate(self.task_names)}

    needs_grad_norms = False
    """Whether ``update`` wants per-task gradient norms on steps without ``G`` (GradNorm):
    the trainer then collects them at the shared representation
    (``megamt.gradients.representation``)."""

    def update(self, step: int, task_means: Tensor, gram: Optional[Tensor] = None,
               present: Optional[Tensor] = None, grad_norms: Optional[Tensor] = None) -> None:
        """After ``engine.step()``: learn from the step's global task means (and ``G``, or
        per-task gradient norms ``grad_norms`` where ``G`` was not measured)."""

    @staticmethod
    def _present(task_means: Tensor, present: Optional[Tensor]) -> Tensor:
        ok = torch.isfinite(task_means.detach().float().cpu())
        if present is not None:
            ok &= present.detach().cpu().bool()
        return ok

    def state_dict(self) -> dict:
        return {"name": self.name, "w": self.w.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"balancer state is for {state.get('name')!r}, this run uses {self.name!r} "
                             "(gradients.loss_weighting changed since the checkpoint)")
        self.w = state["w"].clone()


class StaticBalancer(LossBalancer):
    """Fixed weights from ``gradients.static_weights`` (tasks not listed: 1)."""

    name = "static"

    def __init__(self, task_names, static_weights: dict[str, float]):
        super().__init__(task_names)
        unknown = set(static_weights) - set(self.task_names)
        if unknown:
            raise ValueError(f"gradients.static_weights: unknown tasks {sorted(unknown)}; tasks are {self.task_names}")
        self.w = torch.tensor([float(static_weights.get(t, 1.0)) for t in self.task_names])


class UncertaintyBalancer(LossBalancer):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018).

    Learned log-variances ``s_t``: loss ``sum_t exp(-s_t) L_t + s_t`` (weight 1 at
    ``s = 0``; the optimum is ``s_t = log L_t``, i.e. weight ``1 / L_t``). ``s`` lives
    outside the DeepSpeed model. Its gradient has a closed form in the step's global task
    means, ``d/ds_t = 1 - exp(-s_t) L_t`` (0 for absent tasks), which is identical on every
    rank, so ``update`` takes an Adam step on it without any communication and whatever
    scaling the trainer applies to the model's loss. ``combine`` stays differentiable in
    ``s`` for users who drive the balancer themselves; its autograd gradient equals the
    closed form for the same means.
    """

    name = "uncertainty"

    def __init__(self, task_names, lr: float = 0.025):
        super().__init__(task_names)
        self.log_var = torch.zeros(self.num_tasks, dtype=torch.float32, requires_grad=True)
        self.opt = torch.optim.Adam([self.log_var], lr=lr)

    def current_weights(self):
        return torch.exp(-self.log_var)

    def regularizer(self, present):
        return torch.where(present.cpu(), self.log_var, torch.zeros_like(self.log_var)).sum().to(
            self.log_var.device)

    def combine(self, task_means, present):
        # the log-variances live on the CPU; the result moves to the loss' device
        if task_means.shape != (self.num_tasks,) or present.shape != (self.num_tasks,):
            raise ValueError(f"combine: task_means and present must have shape ({self.num_tasks},) for tasks "
                             f"{self.task_names}, got {tuple(task_means.shape)} and {tuple(present.shape)}")
        w = self.current_weights()
        present = present.cpu().bool()
        safe = torch.where(present, task_means.float().cpu(), torch.zeros(self.num_tasks))  # NaN-free gradients
        terms = torch.where(present, w * safe, torch.zeros(self.num_tasks))
        return (terms.sum() + self.regularizer(present)).to(task_means.device, task_means.dtype)

    def update(self, step, task_means, gram=None, present=None, grad_norms=None):
        ok = self._present(task_means, present)
        means = torch.where(ok, task_means.detach().float().cpu(), torch.zeros(self.num_tasks))
        with torch.no_grad():
            grad = torch.where(ok, 1.0 - torch.exp(-self.log_var) * means, torch.zeros(self.num_tasks))
        self.log_var.grad = grad
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self):
        return {"name": self.name, "log_var": self.log_var.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        if state.get("name") != self.name:
            return super().load_state_dict(state)
        with torch.no_grad():
            self.log_var.copy_(state["log_var"])
        self.opt.load_state_dict(state["opt"])


class DWABalancer(LossBalancer):
    """Dynamic Weight Average (Liu, Johns & Davison 2019).

    ``w_t = T softmax_t(r_t / temperature)`` with ``r_t = L_t(k-1) / L_t(k-2)``, the
    ratio of a task's average loss over the last two periods of ``window`` steps.
    Weights are 1 until two periods are complete; a task without a loss in either
    period gets ``r = 1``.
    """

    name = "dwa"

    def __init__(self, task_names, temperature: float = 2.0, window: int = 1):
        super().__init__(task_names)
        self.temperature = temperature
        self.window = window
        self.acc = torch.zeros(self.num_tasks, dtype=torch.float64)
        self.cnt = torch.zeros(self.num_tasks, dtype=torch.float64)
        self.history: list[Tensor] = []  # period averages (NaN = no loss), last two kept

    def update(self, step, task_means, gram=None, present=None, grad_norms=None):
        ok = self._present(task_means, present)
        means = task_means.detach().double().cpu()
        self.acc[ok] += means[ok]
        self.cnt[ok] += 1
        if (step + 1) % self.window:
            return
        avg = torch.where(self.cnt > 0, self.acc / self.cnt.clamp_min(1), torch.full_like(self.acc, math.nan))
        self.acc.zero_()
        self.cnt.zero_()
        self.history = (self.history + [avg])[-2:]
        if len(self.history) < 2:
            return
        prev, last = self.history
        r = last / prev
        r = torch.where(torch.isfinite(r), r, torch.ones_like(r))
        self.w = (self.num_tasks * torch.softmax(r / self.temperature, dim=0)).float()

    def state_dict(self):
        return {"name": self.name, "w": self.w.clone(), "acc": self.acc.clone(), "cnt": self.cnt.clone(),
                "history": [h.clone() for h in self.history]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.acc, self.cnt = state["acc"].clone(), state["cnt"].clone()
        self.history = [h.clone() for h in state["history"]]


class GradNormBalancer(LossBalancer):
    """GradNorm (Chen et al. 2018) with the per-task gradient norms from ``diag(G)``.

    With ``n_t = |grad_W (w_t L_t)| = sqrt(G_tt)`` (the Gram matrix of the weighted task
    losses' gradients over ALL parameters, from the surgery or the monitor) and the
    inverse training rate ``r_t = (L_t / L_t(0)) / mean_i(L_i / L_i(0))``, the GradNorm
    loss ``sum_t |n_t - mean(n) r_t^alpha|`` (target held constant, as in the paper) has
    the gradient ``sign(n_t - target_t) n_t / w_t`` in ``w_t``; it is averaged over the
    ranks, Adam steps, then ``w`` is clamped positive and renormalised to sum to ``T``.
    On steps without ``G`` (plain training, no per-task backward passes) ``n_t`` comes
    from ``grad_norms``: the norms of each task's gradient at the last shared hidden states,
    collected from the one mixed backward (``megamt.gradients.representation``; the
    classic per-task gradient of the last shared layer's weights would need a second
    backward through one forward, which ZeRO-3 does not support). Without either, the
    weights stay.
    """

    needs_grad_norms = True

    name = "gradnorm"

    def __init__(self, task_names, alpha: float = 1.5, lr: float = 0.025):
        super().__init__(task_names)
        self.alpha = alpha
        self.param = torch.ones(self.num_tasks, dtype=torch.float32, requires_grad=True)
        self.opt = torch.optim.Adam([self.param], lr=lr)
        self.initial = torch.full((self.num_tasks,), math.nan, dtype=torch.float64)
        self.w = self.param.detach().clone()

    def update(self, step, task_means, gram=None, present=None, grad_norms=None):
        ok = self._present(task_means, present)
        means = task_means.detach().double().cpu()
        first = ok & torch.isnan(self.initial)
        self.initial[first] = means[first]
        if gram is not None:
            n = gram.detach().double().cpu().diagonal().clamp_min(0).sqrt()
        elif grad_norms is not None:
            n = grad_norms.detach().double().cpu()
        else:
            return
        ok &= n > 0
        if ok.sum() < 2:
            return
        ratio = means / self.initial
        r = ratio / ratio[ok].mean()
        target = n[ok].mean() * r.pow(self.alpha)
        w = self.param.detach().double()
        grad = torch.where(ok, torch.sign(n - target) * n / w, torch.zeros_like(n)).float()
        self.param.grad = _world_mean_(grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.param.clamp_(min=1e-3)
            self.param.mul_(self.num_tasks / self.param.sum())
        self.w = self.param.detach().clone()

    def state_dict(self):
        return {"name": self.name, "param": self.param.detach().clone(), "opt": self.opt.state_dict(),
                "initial": self.initial.clone()}

    def load_state_dict(self, state):
        if state.get("name") != self.name:
            return super().load_state_dict(state)
        with torch.no_grad():
            self.param.copy_(state["param"])
        self.opt.load_state_dict(state["opt"])
        self.initial = state["initial"].clone()
        self.w = self.param.detach().clone()


class FAMOBalancer(LossBalancer):
    """FAMO (Liu et al. 2023): fast adaptive multitask optimisation, no per-task gradients.

    Logits ``xi`` (Adam, weight decay ``gamma``), ``z = softmax(xi)``. FAMO descends
    ``sum_t z_t log L_t`` normalised by ``c = sum_t z_t / L_t``, i.e. the gradient
    ``sum_t z_t / (c L_t) grad L_t``; here the weights ``T z_t / (c L_t)`` (``T`` so
    that they start at 1) are computed in ``update`` from the step's losses and used
    in the next step (FAMO's gradient with ``L_t`` one step old). ``update`` then
    moves ``xi`` along ``J_softmax^T delta`` with ``delta_t = log L_t(k-1) - log L_t(k)``
    (the official code's update, with the next batch's loss standing in for the
    re-evaluated one, as its authors allow).
    """

    name = "famo"

    def __init__(self, task_names, lr: float = 0.025, gamma: float = 0.001):
        super().__init__(task_names)
        self.logits = torch.zeros(self.num_tasks, dtype=torch.float32, requires_grad=True)
        self.opt = torch.optim.Adam([self.logits], lr=lr, weight_decay=gamma)
        self.prev = torch.full((self.num_tasks,), math.nan, dtype=torch.float64)

    def update(self, step, task_means, gram=None, present=None, grad_norms=None):
        ok = self._present(task_means, present) & (task_means.detach().cpu() > 0)
        cur = task_means.detach().double().cpu()
        both = ok & torch.isfinite(self.prev)
        if both.any():
            delta = torch.where(both, self.prev.clamp_min(1e-12).log() - cur.clamp_min(1e-12).log(),
                                torch.zeros_like(cur)).float()
            with torch.enable_grad():
                z = torch.softmax(self.logits, dim=0)
                (g,) = torch.autograd.grad(z, self.logits, grad_outputs=delta)
            self.logits.grad = _world_mean_(g.detach().clone())
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.prev = torch.where(ok, cur, self.prev)
        z = torch.softmax(self.logits.detach().double(), dim=0)
        known = torch.isfinite(self.prev)
        if known.all():
            c = (z / self.prev).sum()
            self.w = (self.num_tasks * z / (c * self.prev)).float()

    def state_dict(self):
        return {"name": self.name, "logits": self.logits.detach().clone(), "opt": self.opt.state_dict(),
                "prev": self.prev.clone(), "w": self.w.clone()}

    def load_state_dict(self, state):
        if state.get("name") != self.name:
            return super().load_state_dict(state)
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.opt.load_state_dict(state["opt"])
        self.prev = state["prev"].clone()
        self.w = state["w"].clone()


def build_balancer(gcfg, task_names: Sequence[str]) -> LossBalancer:
    """The balancer named by ``gradients.loss_weighting``."""
    name = gcfg.loss_weighting
    if name == "equal":
        return LossBalancer(task_names)
    if name == "static":
        return StaticBalancer(task_names, gcfg.static_weights)
    if name == "uncertainty":
        return UncertaintyBalancer(task_names, lr=gcfg.balancer_lr)
    if name == "dwa":
        return DWABalancer(task_names, temperature=gcfg.dwa_temperature, window=gcfg.dwa_window)
    if name == "gradnorm":
        return GradNormBalancer(task_names, alpha=gcfg.gradnorm_alpha, lr=gcfg.balancer_lr)
    if name == "famo":
        return FAMOBalancer(task_names, lr=gcfg.famo_lr, gamma=gcfg.famo_gamma)
    raise ValueError(f"gradients.loss_weighting: unknown balancer {name!r}; choose one of {BALANCERS}")
