"""Optimiser pieces: parameter groups, LARS/LARC, warmup + cosine schedule, LR scaling."""
import math

import torch


def scaled_lr(base_lr, global_batch_size):
    """Linear scaling rule (Goyal et al. 2017): `base_lr` is quoted for a global batch of 256."""
    return base_lr * global_batch_size / 256


def decay_all_but_norm(model, weight_decay):
    """Two SGD groups: every trained weight and bias with weight decay, BatchNorm's affine parameters without
    (VISSL's regularize_bn: False, regularize_bias: True)."""
    norm = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
            for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if id(p) not in norm], weight_decay=weight_decay),
            dict(params=[p for p in params if id(p) in norm], weight_decay=0.0)]


def param_groups(model, weight_decay, exclude_bias_and_norm=True):
    """Two groups: weights (decayed, LARS-adapted) and biases + norm parameters (neither).

    SimCLR/BYOL/SwAV practice: 1-D parameters (biases, BN/LN affine) get no weight decay
    and no LARS trust ratio.
    """
    decayed, plain = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (plain if exclude_bias_and_norm and p.ndim <= 1 else decayed).append(p)
    return [dict(params=decayed, weight_decay=weight_decay, lars=True),
            dict(params=plain, weight_decay=0.0, lars=False)]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and LARC (You et al. 2017; NVIDIA Apex's LARC, as VISSL and swav use it).

    Apex's LARC(SGD), step by step, for each parameter w with gradient g of a group with
    `lars=True`: when |w| > 0 and |g| > 0, the update direction is d = (g + wd*w) * ratio with
    the trust ratio eta * |w| / (|g| + wd*|w| + eps); with `clip=True` the ratio becomes
    min(ratio / lr, 1), so that the effective rate lr * ratio is min(lr * ratio, lr) (Apex's
    clip mode; at lr = 0 that is 1). When |w| = 0 or |g| = 0 the parameter gets d = g: neither
    the trust ratio nor weight decay (Apex takes the decay away from the wrapped SGD and adds
    it back only to the parameters it adapts). Then SGD's momentum: buf = d on the first step,
    buf = momentum * buf + d after, and w -= lr * buf (Nesterov: lr * (d + momentum * buf)).
    Groups with `lars=False` are plain SGD with momentum and their weight decay (d = g + wd*w).
    Unlike Apex, p.grad is left as it was (Apex scales it in place).

    `decayed_norm=True` is the LARS of BYOL's, Barlow Twins' and VICReg's code instead: the weight decay is
    added first, d = g + wd*w, and the trust ratio is eta * |w| / |d| (no eps), 1 where |w| = 0 or |d| = 0.

    `foreach=True` runs each group as a few multi-tensor (torch._foreach_*) kernels
    instead of ~10 small kernels per parameter, the same arithmetic (tests/test_speed.py
    checks it against the per-parameter loop); None: foreach when the parameters are on CUDA.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8,
                 clip=False, nesterov=False, foreach=None, decayed_norm=False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lars=True,
                        trust_coefficient=trust_coefficient, eps=eps, clip=clip, nesterov=nesterov,
                        decayed_norm=decayed_norm)
        if clip and decayed_norm:
            raise ValueError("LARS: clip is Apex's mode; the decayed-norm LARS has none.")
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            foreach = self.foreach if self.foreach is not None else all(p.is_cuda for p in params)
            if foreach and params:
                self._foreach_group_step(group, params)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["lars"] and group.get("decayed_norm"):
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    grad = grad * self._decayed_ratio(group, torch.linalg.vector_norm(p),
                                                      torch.linalg.vector_norm(grad))
                elif group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    ratio, adapt = self._trust_ratio(group, w_norm, g_norm)
                    if group["weight_decay"]:  # Apex decays only the parameters it adapts (adapt is 1.0 or 0.0)
                        grad = grad.add(p * adapt, alpha=group["weight_decay"])
                    grad = grad * ratio
                elif group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = grad.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                    buf = state["momentum_buffer"]
                    grad = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.add_(grad, alpha=-group["lr"])
        return loss

    @staticmethod
    def _trust_ratio(group, w_norm, g_norm):
        """(ratio, adapt) from the norms (0-dim, or stacked for many parameters): Apex's adaptive lr and 1.0
        where |w| > 0 and |g| > 0; ratio 1.0 and adapt 0.0 (no decay) elsewhere, where Apex leaves g alone."""
        adapt = (w_norm > 0) & (g_norm > 0)
        ratio = group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
        if group["clip"]:
            ratio = torch.clamp(ratio / group["lr"], max=1.0)  # lr = 0: inf -> 1, as Apex's min(ratio / lr, 1)
        return torch.where(adapt, ratio, torch.ones_like(ratio)), adapt.to(ratio.dtype)

    @staticmethod
    def _decayed_ratio(group, w_norm, d_norm):
        """BYOL's / Barlow Twins' trust ratio eta * |w| / |g + wd*w|, 1 where either norm is 0."""
        adapt = (w_norm > 0) & (d_norm > 0)
        ratio = group["trust_coefficient"] * w_norm / torch.where(adapt, d_norm, torch.ones_like(d_norm))
        return torch.where(adapt, ratio, torch.ones_like(ratio))

    def _foreach_group_step(self, group, params):
        """`step` for one group with multi-tensor kernels: the per-parameter loop above, op for op."""
        grads = [p.grad for p in params]
        if group["lars"] and group.get("decayed_norm"):
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"]) if group["weight_decay"] \
                else grads
            w_norm = torch.stack(torch._foreach_norm(params))
            d_norm = torch.stack(torch._foreach_norm(updates))
            updates = torch._foreach_mul(updates, list(self._decayed_ratio(group, w_norm, d_norm).unbind(0)))
        elif group["lars"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio, adapt = self._trust_ratio(group, w_norm, g_norm)
            updates = grads
            if group["weight_decay"]:
                decayed = torch._foreach_mul(params, list(adapt.unbind(0)))
                updates = torch._foreach_add(grads, decayed, alpha=group["weight_decay"])
            updates = torch._foreach_mul(updates, list(ratio.unbind(0)))
        elif group["weight_decay"]:
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        else:
            updates = grads
        if group["momentum"]:
            buffers, fresh = [], []
            for p, u in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" in state:
                    buffers.append(state["momentum_buffer"])
                    fresh.append(None)
                else:
                    state["momentum_buffer"] = u.clone()
                    fresh.append(state["momentum_buffer"])
            old = [u for u, f in zip(updates, fresh) if f is None]
            if buffers:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, old)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            updates = torch._foreach_add(updates, buffers, alpha=group["momentum"]) if group["nesterov"] else buffers
        torch._foreach_add_(params, updates, alpha=-group["lr"])


def warmup_cosine(step, total_steps, warmup_steps, peak_lr, final_lr=0.0, start_lr=0.0, endpoint=False):
    """Linear warmup from `start_lr` to `peak_lr`, then cosine decay to `final_lr`, per step.

    endpoint: the warmup is np.linspace(start_lr, peak_lr, warmup_steps), whose last step is the
    peak (SwAV's and DINO's schedules); else start + (peak - start) step / warmup_steps, which
    reaches the peak at the first cosine step (SimCLR's, BYOL's, Barlow Twins')."""
    if step < warmup_steps:
        if endpoint:
            return start_lr + (peak_lr - start_lr) * (step / (warmup_steps - 1) if warmup_steps > 1 else 0.0)
        return start_lr + (peak_lr - start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def warmup_then_milestones_or_cosine(step, steps_per_epoch, total_steps, peak_lr, warmup_epochs, warmup_start,
                                     schedule, decay, milestones):
    """VISSL's composite schedule: linear warmup from `warmup_start` x peak over `warmup_epochs`, then
    `schedule` "step": x `decay` at each milestone epoch, or "cosine": cosine to 0, per step."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return peak_lr * (warmup_start + (1 - warmup_start) * step / warmup_steps)
    if schedule == "cosine":
        return warmup_cosine(step, total_steps, warmup_steps, peak_lr)
    epoch = step // steps_per_epoch
    return peak_lr * decay ** sum(epoch >= m for m in milestones)


def vissl_warmup_start(warmup_start, base_lr, peak_lr):
    """The fraction of the peak lr that VISSL's automatically scaled linear warmup starts from.

    `warmup_start` when given; else the lr of 256 images, base_lr / peak_lr. VISSL's YAML writes a
    ramp (e.g. 0.025 -> 0.1) but its lr scaling (vissl/utils/hydra_config.py, resolve_linear_schedule)
    replaces the start with one node's lr, the same as 256 images with 8 x 32 per node, and drops the
    ramp when start and end are equal: no ramp up to a 256-image batch."""
    if warmup_start is not None:
        return warmup_start
    return min(1.0, base_lr / peak_lr) if peak_lr else 1.0


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
