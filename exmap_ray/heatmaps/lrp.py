"""Layer-wise relevance propagation on timm CNNs, built once per model.

    python benchmarks/lrp_speed.py            # img/s against a bare forward+backward to the input

How it works: the model is traced with torch.fx, BatchNorm is folded into the
preceding convolution (canonization), and each layer is wrapped in an autograd
function whose backward pass returns the layer's *input relevance* instead of
its gradient. One ordinary `backward()` from a one-hot seed at the predicted
class then yields the relevance map at the input, sign and channels kept.

Rules (Montavon et al., "Layer-wise relevance propagation: an overview"):
- convolutions: alpha-beta (default alpha=2, beta=1) or gamma. Both split each
  output into its positive contributions P (x+ w+, x- w-, b+) and negative
  ones N (x+ w-, x- w+, b-), so they hold for signed inputs (the first layer
  of an ImageNet-normalised image) exactly as zennit's AlphaBeta and Gamma:
  alpha-beta gives alpha * (share of P) - beta * (share of N); gamma boosts
  the contributions of the output's own sign by (1 + gamma), i.e. w + gamma w+
  on positive contributions where the output is positive and w + gamma w- on
  negative ones where it is negative. That is also the rule the released
  ExMap code puts on every convolution, with gamma = 4;
- linear layers and average pools: epsilon;
- residual additions: relevance split in proportion to each branch's share;
- ReLU, max-pool, flatten, dropout, identity: relevance passes unchanged;
- BatchNorm: folded into the convolution before it (canonization, the default,
  `heatmaps.canonize: true`), or with `canonize: false` kept as its own layer
  under the epsilon rule.

Cost: a convolution computes P and N in one convolution with the stacked
weights [w+, w-] (P + N is the layer's output, so no separate forward), and
its relevance in one transposed convolution. Where the input comes out of a
ReLU (every convolution but the stem's, found from the traced graph) x- = 0
and that is all; a signed input needs the pair twice. So LRP costs about two
input x gradient passes, not four or eight.

Features: `explain(x)` also returns the penultimate features (the input of the
classifier in the folded, wrapped copy, caught by a forward pre-hook) and the
logits of the same forward. A wrapped convolution's output is P + N, and a folded
convolution is conv and BatchNorm in one, so both equal the plain model's to fp32
rounding (checked in tests/test_heatmap_extraction.py).

Mixed precision (`heatmaps.precision`): under bf16 autocast the convolutions
and their transposes run in bf16, while every division by P, N or z and the
relevance handed from layer to layer stay in fp32. Each convolution's output z
then comes from the layer's own weight, stacked beside [w+, w-] (ConvRule), not
from P + N rounded apart: measured on trained models in benchmarks/bf16_lrp.py.

The composite is set by spec keys: `heatmaps.conv_rule` (alpha_beta | gamma),
`heatmaps.alpha` / `heatmaps.beta` (alpha - beta must be 1, so relevance is
conserved), `heatmaps.gamma`, `heatmaps.epsilon` (the linear/pool rule and the
stabiliser of every division) and `heatmaps.canonize`. tests/test_lrp.py checks
every rule against zennit.

Supported: CNNs built only from Conv2d (+BatchNorm), Linear, ReLU, max/avg
pools, flatten and residual additions: timm's ResNet family (resnet*, resnet*d,
resnet*t, test_resnet) and VGG-style nets. Anything else (attention, LayerNorm,
GELU, squeeze-excite multiplications, pre-activation BatchNorm, 'same'-padded
convolutions) is refused with an error naming the layer, rather than producing
meaningless relevance.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

from ..errors import UserError
from ..models import autocast
from ..options import non_negative, opt, positive
from .method import HEATMAP_METHODS, Explained, HeatmapMethod, as_fp32, classifier_name, is_timm


@dataclass
class LrpKeys:
    """LRP's own keys, in `heatmaps:` beside the keys every method takes."""

    conv_rule: Literal["alpha_beta", "gamma"] = opt("alpha_beta", "LRP rule on convolutions (paper: alpha2-beta1)")
    alpha: float = opt(2.0, "LRP alpha-beta: alpha (alpha - beta = 1 conserves relevance)", positive)
    beta: float = opt(1.0, "LRP alpha-beta: beta", non_negative)
    gamma: float = opt(
        0.25,
        "LRP gamma rule: extra weight on the contributions of the output's own sign "
        "(zennit's Gamma); the released ExMap code uses 4",
        non_negative,
    )
    epsilon: float = opt(1e-6, "LRP epsilon on linear layers and pools; stabilises division", positive)
    canonize: bool = opt(
        True,
        "LRP: fold BatchNorm into the convolution before it (canonization), so the conv "
        "rule sees the effective weights; false keeps BatchNorm as a layer under epsilon",
    )


PASS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)
EPS_MODULES = (nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
SHAPE_OPS = {"flatten", "view", "reshape", "size", "contiguous"}
# modules whose output is >= 0 when their input is (ReLU: always)
KEEPS_SIGN = (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def _stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


# ----------------------------------------------------------------------------- conv rules
# A convolution's output splits into its positive and negative contributions, P and N (z = P + N):
#   P = x+ (*) w+ + x- (*) w- + b+,   N = x+ (*) w- + x- (*) w+ + b-.
# Both come out of one convolution with the stacked weights [w+, w-] (for x-: [w-, w+]), held as a
# pair axis: Zs (B, groups, 2, C/groups, H, W). A rule gives
#   coefficients(Rs, Zs): S, the output relevance per unit of P and of N (Rs: (B, groups, 1, C/groups, H, W)),
#   weights(a, b): the pair of weights that carries S back to an input of sign +, called with (w+, w-);
#                  for the x- part the same function is called with (w-, w+),
# and the input relevance is R_in = x+ * S (*)^T weights(w+, w-) + x- * S (*)^T weights(w-, w+).
# Every division happens here, in fp32. `z` is the layer's output, (B, groups, 1, C/groups, H, W): in fp32
# P + N; under bf16 autocast a convolution of its own (see ConvRule), as P and N rounded apart lose it.


def _pair_sign(device) -> torch.Tensor:
    """[+1, -1] along the pair axis, made once per device (a copy per layer and batch would sync a GPU)."""
    if device not in _PAIR_SIGN:
        _PAIR_SIGN[device] = torch.tensor([1.0, -1.0], device=device).view(1, 1, 2, 1, 1, 1)
    return _PAIR_SIGN[device]


_PAIR_SIGN: dict = {}


class AlphaBeta:
    """alpha * (share of P) - beta * (share of N): zennit's AlphaBeta."""

    needs_z = False  # coefficients() reads P and N alone: z = P + N is not formed in the backward

    def __init__(self, alpha: float, beta: float, eps: float):
        self.alpha, self.beta, self.eps = alpha, beta, eps

    def coefficients(self, Rs, Zs, z):
        # P >= 0 and N <= 0 always, so each is stabilised away from 0 by its own sign (N = 0 carries nothing).
        # Zs is the backward's own fp32 copy (or the saved pair, used once): overwritten, no new buffers
        Zs = Zs.add_(self.eps * _pair_sign(Zs.device))
        return torch.div(Rs, Zs, out=Zs)

    def weights(self, a, b):
        return self.alpha * a, -self.beta * b


class Gamma:
    """Contributions of the output's own sign weighted by (1 + gamma): zennit's Gamma.

    Where z > 0: R / (z + gamma P) through w + gamma w+ (for x+; w + gamma w- for x-); where z < 0
    the same with N and w + gamma w-; z = 0 passes nothing. gamma = 0 is the epsilon rule. This is
    also the symmetric gamma rule of the released ExMap code (there with gamma = 4).
    """

    needs_z = True

    def __init__(self, gamma: float, eps: float):
        self.gamma, self.eps = gamma, eps

    def coefficients(self, Rs, Zs, z):
        # [R / (z + gamma P), R / (z + gamma N)], in Zs's own buffer (the backward's, used once). The first
        # member counts where z > 0, the second where z < 0. Each half's denominator takes |z| with its own
        # sign, which is z where that half counts and keeps it away from 0 where it does not (P >= 0 >= N),
        # so the halves are zeroed by a multiply with their mask (a broadcast masked_fill is 3x slower on
        # the CPU), with no 0/0 to turn into NaN.
        za = z.abs()
        D = Zs.mul_(self.gamma)
        D[:, :, 0:1].add_(za).add_(self.eps)
        D[:, :, 1:2].sub_(za).sub_(self.eps)
        S = torch.div(Rs, D, out=D)
        S[:, :, 0:1].mul_(z > 0)
        S[:, :, 1:2].mul_(z < 0)
        return S

    def weights(self, a, b):
        g = self.gamma
        return (1 + g) * a + b, a + (1 + g) * b  # [w + gamma w+, w + gamma w-] for x+


class ConvRule(nn.Module):
    """A Conv2d whose backward pass is a conv rule; P and N come from one stacked convolution.

    `nonneg_input`: the input comes out of a ReLU (x- = 0), so half of the work is skipped.

    Under bf16 autocast the output z is not P + N: P and N are rounded to bf16 apart, and where they
    nearly cancel their sum keeps few correct digits (the features of a trained resnet10t came out 3.6%
    off fp32, a plain bf16 forward's 1.4%). So the stacked convolution also carries the layer's own
    weight, [w+, w-, w], and z comes out of it rounded once, as in a plain bf16 forward: 1.5 times the
    forward convolution's work, none added to the backward (benchmarks/results/bf16_lrp.md). In fp32
    nothing changes: z = P + N, as zennit computes it."""

    def __init__(self, conv: nn.Conv2d, rule, nonneg_input: bool):
        super().__init__()
        self.conv, self.rule, self.nonneg = conv, rule, nonneg_input
        self.groups, self.out_channels = conv.groups, conv.out_channels
        w = conv.weight.detach()
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        b = None if conv.bias is None else conv.bias.detach()
        self.register_buffer("w_fwd", self._stack(wp, wn), persistent=False)
        self.register_buffer(
            "b_fwd", None if b is None else self._stack(b.clamp(min=0), b.clamp(max=0)), persistent=False
        )
        self.register_buffer("w_bwd", self._stack(*rule.weights(wp, wn)), persistent=False)
        if not nonneg_input:
            w_fwd_neg, w_bwd_neg = self._stack(wn, wp), self._stack(*rule.weights(wn, wp))
            if self.groups == 1:  # x+ and x- side by side as one input: one convolution each way, not two
                self.register_buffer("w_fwd_both", torch.cat([self.w_fwd, w_fwd_neg], 1), persistent=False)
                self.register_buffer("w_bwd_both", torch.cat([self.w_bwd, w_bwd_neg], 1), persistent=False)
            else:
                self.register_buffer("w_fwd_neg", w_fwd_neg, persistent=False)
                self.register_buffer("w_bwd_neg", w_bwd_neg, persistent=False)
        self._cast: dict = {}

    def _stack(self, *parts: torch.Tensor) -> torch.Tensor:
        """Output channels in (groups, part, C/groups) order, so grouped convolutions keep their blocks."""
        g = self.groups
        return torch.stack([t.unflatten(0, (g, -1)) for t in parts], 1).flatten(0, 2)

    def pairs(self, z: torch.Tensor, n: int = 2) -> torch.Tensor:
        return z.unflatten(1, (self.groups, n, self.out_channels // self.groups))

    def param(self, name: str, dtype: torch.dtype):
        """A stacked weight in the compute dtype (cast once per dtype, not per batch)."""
        t = getattr(self, name)
        if t is None or t.dtype == dtype:
            return t
        key = (name, dtype, t.device)
        if key not in self._cast:
            self._cast[key] = t.to(dtype)
        return self._cast[key]

    def low_precision(self, dtype: torch.dtype):
        """The forward's weight and bias under autocast: [w+, w-, w] where the input is >= 0 (P, N and z in
        one convolution), w alone for a signed input. Made at first use, once per dtype and device."""
        w = self.conv.weight.detach()
        key = ("low", dtype, w.device)
        if key not in self._cast:
            b = None if self.conv.bias is None else self.conv.bias.detach()
            if self.nonneg:
                W = self._stack(w.clamp(min=0), w.clamp(max=0), w)
                b = None if b is None else self._stack(b.clamp(min=0), b.clamp(max=0), b)
                if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
                    W = W.contiguous(memory_format=torch.channels_last)  # as the model's other weights
            else:
                W = w
            self._cast[key] = (W.to(dtype), None if b is None else b.to(dtype))
        return self._cast[key]

    def conv2(self, x, w, b=None):
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def transposed(self, shape, w, S):
        """The transposed convolution of S to the input's shape. `conv_transpose2d` with the output padding
        that gives that shape, not `conv2d_input`: that one hands the convolution's backward an expanded
        stand-in for the input, which the CPU kernel copies out in full (a fill and a copy per layer)."""
        c = self.conv
        pad = tuple(
            shape[2 + i]
            - ((S.shape[2 + i] - 1) * c.stride[i] - 2 * c.padding[i] + c.dilation[i] * (c.kernel_size[i] - 1) + 1)
            for i in range(2)
        )
        return F.conv_transpose2d(S, w, None, c.stride, c.padding, pad, c.groups, c.dilation)

    def forward(self, x):
        return _ConvRuleFn.apply(x, self)


class _ConvRuleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer: ConvRule):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else layer.w_fwd.dtype
        low = dtype != torch.float32  # z from a convolution of its own (ConvRule's docstring)
        C, g = layer.out_channels, layer.groups
        if layer.nonneg and low:  # one convolution: P, N and z, each rounded once
            Z = layer.conv2(x, *layer.low_precision(dtype))
            z = layer.pairs(Z, 3)[:, :, 2]
        elif layer.nonneg:
            Z, z = layer.conv2(x, layer.param("w_fwd", dtype), layer.param("b_fwd", dtype)), None
        elif g == 1:  # [x+, x-] (*) [[w+, w-], [w-, w+]]: P and N of a signed input in one convolution
            Z = layer.conv2(_split_sign(x), layer.param("w_fwd_both", dtype), layer.param("b_fwd", dtype))
            z = layer.pairs(layer.conv2(x, *layer.low_precision(dtype)), 1)[:, :, 0] if low else None
        else:
            Z = layer.conv2(x.clamp(min=0), layer.param("w_fwd", dtype), layer.param("b_fwd", dtype)) + layer.conv2(
                x.clamp(max=0), layer.param("w_fwd_neg", dtype)
            )
            z = layer.pairs(layer.conv2(x, *layer.low_precision(dtype)), 1)[:, :, 0] if low else None
        ctx.layer = layer
        # the input itself, not [x+, x-]: record_conv_rules reads it back as the layer's input
        ctx.save_for_backward(x, Z, None if z is None or layer.nonneg else z)
        # in fp32, also under autocast: the relevance handed between layers stays fp32. A new tensor, not a
        # view of Z, so that an in-place ReLU after it is allowed
        if z is not None:
            return z.flatten(1, 2).float()
        if g == 1:
            return torch.add(Z[:, :C].float(), Z[:, C:])
        Zs = layer.pairs(Z)
        out = torch.empty((Z.shape[0], C, *Z.shape[2:]), dtype=torch.float32, device=Z.device)
        torch.add(Zs[:, :, 0].float(), Zs[:, :, 1], out=out.view(Zs[:, :, 0].shape))
        return out

    @staticmethod
    def backward(ctx, R):
        x, Z, z_signed = ctx.saved_tensors
        layer = ctx.layer
        C = layer.out_channels
        if Z.shape[1] == 3 * C:  # [P, N, z] (low precision, input >= 0)
            Z3 = layer.pairs(Z.float(), 3)
            Zs, z = Z3[:, :, :2], Z3[:, :, 2:]
        else:
            Zs = layer.pairs(Z.float())
            if z_signed is not None:
                z = z_signed.float().unsqueeze(2)
            else:
                z = torch.add(Zs[:, :, 0:1], Zs[:, :, 1:2]) if layer.rule.needs_z else None
        S = layer.rule.coefficients(layer.pairs(R.float(), 1), Zs, z).flatten(1, 3).to(Z.dtype)
        if layer.nonneg:
            T = layer.transposed(x.shape, layer.param("w_bwd", Z.dtype), S)
            R_in = T.mul_(x) if T.dtype == x.dtype else x * T  # in place where no dtype is promoted
        elif layer.groups == 1:  # one transposed convolution to [x+, x-]'s channels, then x+ * T+ + x- * T-
            X = _split_sign(x)
            T = layer.transposed(X.shape, layer.param("w_bwd_both", Z.dtype), S)
            R_in = torch.add(*(T.mul_(X) if T.dtype == X.dtype else X * T).chunk(2, 1))
        else:
            R_in = x.clamp(min=0) * layer.transposed(x.shape, layer.param("w_bwd", Z.dtype), S) + x.clamp(
                max=0
            ) * layer.transposed(x.shape, layer.param("w_bwd_neg", Z.dtype), S)
        return R_in.to(x.dtype), None


def _split_sign(x: torch.Tensor) -> torch.Tensor:
    """[x+, x-] along the channels, (B, 2 C_in, H, W), written once."""
    X = torch.empty((x.shape[0], 2 * x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
    torch.clamp(x, min=0, out=X[:, : x.shape[1]])
    torch.clamp(x, max=0, out=X[:, x.shape[1] :])
    return X


class EpsilonRule(nn.Module):
    """R_in = x * d/dx [z . R / z] for a (near-)linear module: linear layers, average pools, BatchNorm."""

    def __init__(self, module: nn.Module, eps: float):
        super().__init__()
        self.module, self.eps = module, eps

    def forward(self, x):
        return _EpsilonFn.apply(x, self)


class _EpsilonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer: EpsilonRule):
        with torch.enable_grad():  # keep this layer's own small graph for its backward: no recompute
            xd = x.detach().requires_grad_(True)
            z = layer.module(xd)
        ctx.xd, ctx.z, ctx.eps = xd, z, layer.eps
        ctx.save_for_backward(x)
        return z.detach().float()

    @staticmethod
    def backward(ctx, R):
        (x,) = ctx.saved_tensors
        z = ctx.z
        s = R.float() / _stabilize(z.detach().float(), ctx.eps)
        (g,) = torch.autograd.grad(z, ctx.xd, s.to(z.dtype))
        del ctx.xd, ctx.z
        return (x * g.float()).to(x.dtype), None


class _SumFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, eps):
        ctx.eps = eps
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, R):
        a, b = ctx.saved_tensors
        s = R.float() / _stabilize(a.float() + b.float(), ctx.eps)
        return (a * s).to(a.dtype), (b * s).to(b.dtype), None


def relevance_sum(a, b, eps):
    return _SumFn.apply(a, b, eps)


torch.fx.wrap("relevance_sum")


@HEATMAP_METHODS.register("lrp", keys=LrpKeys)
class LRP(HeatmapMethod):
    """Layer-wise relevance propagation (the paper): alpha-beta or gamma on convolutions, epsilon elsewhere.

    `LRP(model, hspec)(x) -> (relevance (B, C, H, W), predicted class (B,))`; `explain(x)` adds the
    features and logits of the same forward.

    The canonized, rule-wrapped copy of the model is built once here, not per batch.
    """

    def __init__(self, model: nn.Module, hspec):
        self.eps = hspec.epsilon
        self.precision = hspec.precision
        if hspec.conv_rule == "alpha_beta" and abs(hspec.alpha - hspec.beta - 1.0) > 1e-6:
            raise UserError(
                f"heatmaps.method 'lrp' with conv_rule alpha_beta needs heatmaps.alpha - heatmaps.beta "
                f"= 1 so that relevance is conserved; got alpha={hspec.alpha}, beta={hspec.beta} "
                f"(the paper: alpha 2, beta 1)"
            )
        CONV_RULES = {
            "alpha_beta": lambda: AlphaBeta(hspec.alpha, hspec.beta, hspec.epsilon),
            "gamma": lambda: Gamma(hspec.gamma, hspec.epsilon),
        }
        self.net = build_lrp_model(model, CONV_RULES[hspec.conv_rule](), hspec.epsilon, canonize=hspec.canonize)
        if any(
            p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
            for p in model.parameters()
        ):  # a channels_last model: its folded, stacked weights too
            self.net.to(memory_format=torch.channels_last)
        # the penultimate features: what the (wrapped) classifier receives in the forward
        # (a model that is not timm's, as in the property tests, has no penultimate layer to name: no features)
        self._features: list[torch.Tensor] = []
        if is_timm(model):
            name = classifier_name(model)
            try:
                clf = self.net.get_submodule(name)
            except AttributeError:
                raise UserError(
                    f"heatmaps.method 'lrp': the traced copy of '{type(model).__name__}' has no classifier "
                    f"'{name}' (its features could not be kept); use heatmaps.method "
                    f"input_x_gradient"
                ) from None
            clf.register_forward_pre_hook(lambda _module, args: self._features.append(args[0].detach()))

    def explain(self, x: torch.Tensor) -> Explained:
        x = x.detach().requires_grad_(True)
        self._features.clear()
        with autocast(x.device.type, self.precision):
            logits = self.net(x)
        feats = self._features[0] if self._features else None
        self._features.clear()
        pred = logits.argmax(1)
        seed = torch.zeros_like(logits).scatter_(1, pred[:, None], 1.0)  # one-hot; no range check (a GPU sync)
        (rel,) = torch.autograd.grad(logits, x, seed)
        return Explained(rel.detach(), pred.detach(), as_fp32(feats), logits.detach().float())


def _nonneg_nodes(gm: torch.fx.GraphModule) -> set:
    """Nodes whose value is >= 0 for every input: ReLU outputs and sign-keeping ops of them."""
    out: set = set()
    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.ReLU) or (isinstance(mod, KEEPS_SIGN) and args and args[0] in out):
                out.add(node)
        elif node.op == "call_method" and node.target in SHAPE_OPS and args and args[0] in out:
            out.add(node)
        elif (
            node.op == "call_function"
            and node.target in (torch.flatten, operator.add, operator.iadd, torch.add)
            and args
            and all(a in out for a in args)
        ):
            out.add(node)
    return out


def build_lrp_model(model: nn.Module, conv_rule, eps: float, canonize: bool = True) -> torch.fx.GraphModule:
    name = type(model).__name__
    eps_modules = EPS_MODULES if canonize else EPS_MODULES + (nn.BatchNorm2d,)
    try:
        # canonize: fold BatchNorm into the conv before it; otherwise BatchNorm keeps its own (epsilon) rule
        gm = fuse(copy.deepcopy(model).eval()) if canonize else torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as e:  # noqa: BLE001 - any tracing failure means: not a supported model
        raise UserError(
            f"heatmaps.method 'lrp': model '{name}' cannot be traced for LRP ({type(e).__name__}: {e}); "
            f"use heatmaps.method input_x_gradient or gradcam"
        ) from None
    gm.requires_grad_(False)  # relevance flows to the input only
    nonneg = _nonneg_nodes(gm)
    for node in list(gm.graph.nodes):
        where = f"node '{node.name}'"
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod) is nn.Conv2d and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
                gm.add_submodule(node.target, ConvRule(mod, conv_rule, node.args[0] in nonneg))
            elif isinstance(mod, eps_modules):
                gm.add_submodule(node.target, EpsilonRule(mod, eps))
            elif not isinstance(mod, PASS_MODULES):
                _unsupported(name, f"layer '{node.target}' ({type(mod).__name__})")
        elif node.op == "call_function":
            if (
                node.target in (operator.add, operator.iadd, torch.add)
                and all(isinstance(a, torch.fx.Node) for a in node.args[:2])
                and len(node.args) == 2
            ):
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(relevance_sum, (node.args[0], node.args[1], eps))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            elif node.target not in (torch.flatten, getattr):
                _unsupported(name, f"{where} (function {getattr(node.target, '__name__', node.target)})")
        elif node.op == "call_method" and node.target not in SHAPE_OPS:
            _unsupported(name, f"{where} (method .{node.target})")
    gm.graph.lint()
    gm.recompile()
    return gm


def _unsupported(model_name: str, what: str):
    raise UserError(
        f"heatmaps.method 'lrp' supports CNNs of Conv2d/BatchNorm/ReLU/pooling/residual-add/Linear "
        f"(timm resnet*, test_resnet, vgg*); model '{model_name}' has an unsupported {what}. "
        f"Use heatmaps.method input_x_gradient or gradcam for this backbone"
    )


def record_conv_rules(lrp: "LRP", x: torch.Tensor) -> tuple[list, list]:
    """Diagnostics (tests/test_lrp.py, benchmarks/bf16_lrp.py): run `lrp.explain(x)` once and record, for
    every rule-wrapped convolution, its forward (layer, input, output) and its rule's backward (layer,
    input, relevance in, relevance out), each cloned."""
    fwd, bwd = [], []

    def keep(m, i, o):  # clones: an in-place ReLU follows
        fwd.append((m, i[0].detach().clone(), o.detach().clone()))

    hooks = [m.register_forward_hook(keep) for m in lrp.net.modules() if isinstance(m, ConvRule)]
    rule_backward = _ConvRuleFn.backward

    def recording(ctx, R):
        out = rule_backward(ctx, R)
        x_in = ctx.saved_tensors[0]
        bwd.append((ctx.layer, x_in.detach().clone(), R.detach().clone(), out[0].detach().clone()))
        return out

    _ConvRuleFn.backward = staticmethod(recording)
    try:
        lrp.explain(x)
    finally:
        _ConvRuleFn.backward = staticmethod(rule_backward)
        for h in hooks:
            h.remove()
    return fwd, bwd
