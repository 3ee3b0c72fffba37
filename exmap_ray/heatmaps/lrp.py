"""Layer-wise relevance propagation on timm CNNs, built once per model.

How it works: the model is traced with torch.fx, BatchNorm is folded into the
preceding convolution (canonization), and each layer is wrapped in an autograd
function whose backward pass returns the layer's *input relevance* instead of
its gradient. One ordinary `backward()` from a one-hot seed at the predicted
class then yields the relevance map at the input, sign and channels kept.

Rules (Montavon et al., "Layer-wise relevance propagation: an overview"):
- convolutions: alpha-beta (default alpha=2, beta=1) or gamma;
- linear layers and average pools: epsilon;
- residual additions: relevance split in proportion to each branch's share;
- ReLU, max-pool, flatten, dropout, identity: relevance passes unchanged;
- BatchNorm: folded into the convolution before it (canonization, the default,
  `heatmaps.canonize: true`), or with `canonize: false` kept as its own layer
  under the epsilon rule.

The composite is set by spec keys: `heatmaps.conv_rule` (alpha_beta | gamma),
`heatmaps.alpha` / `heatmaps.beta` (alpha - beta must be 1, so relevance is
conserved), `heatmaps.gamma`, `heatmaps.epsilon` (the linear/pool rule and the
stabiliser of every division) and `heatmaps.canonize`.

Supported: CNNs built only from Conv2d (+BatchNorm), Linear, ReLU, max/avg
pools, flatten and residual additions: timm's ResNet family (resnet*, resnet*d,
resnet*t, test_resnet) and VGG-style nets. Anything else (attention, LayerNorm,
GELU, squeeze-excite multiplications, pre-activation BatchNorm) is refused with
an error naming the layer, rather than producing meaningless relevance.
"""
from __future__ import annotations

import copy
import operator
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

from ..errors import UserError

PASS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)
EPS_MODULES = (nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
SHAPE_OPS = {"flatten", "view", "reshape", "size", "contiguous"}


def _stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _through(fn, inputs: tuple[torch.Tensor, ...], R: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """For a (near-)linear fn: R_in_i = x_i * d/dx_i [ fn(x) . R / fn(x) ]."""
    with torch.enable_grad():
        xs = tuple(x.detach().requires_grad_(True) for x in inputs)
        z = fn(*xs)
        grads = torch.autograd.grad(z, xs, (R / _stabilize(z, eps)).detach())
    return tuple(x * g for x, g in zip(inputs, grads))


def epsilon_rule(module: nn.Module, x: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    return _through(module, (x,), R, eps)[0]


def _conv(module: nn.Conv2d, w, b):
    return partial(F.conv2d, weight=w, bias=b, stride=module.stride, padding=module.padding,
                   dilation=module.dilation, groups=module.groups)


def alpha_beta_rule(module: nn.Conv2d, x, R, alpha: float, beta: float, eps: float):
    """alpha * (positive contributions' share) - beta * (negative contributions' share)."""
    w, b = module.weight, module.bias
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    bp = b.clamp(min=0) if b is not None else None
    bn = b.clamp(max=0) if b is not None else None
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    if bool((x >= 0).all()):  # after a ReLU: the x- terms vanish, skip half the work
        pos = _through(lambda a: _conv(module, wp, bp)(a), (xp,), R, eps)[0]
        neg = _through(lambda a: _conv(module, wn, bn)(a), (xp,), R, eps)[0] if beta else 0
    else:
        pos = sum(_through(lambda a, c: _conv(module, wp, bp)(a) + _conv(module, wn, None)(c), (xp, xn), R, eps))
        neg = sum(_through(lambda a, c: _conv(module, wn, bn)(a) + _conv(module, wp, None)(c), (xp, xn), R, eps)) \
            if beta else 0
    return alpha * pos - beta * neg


def gamma_rule(module: nn.Conv2d, x, R, gamma: float, eps: float):
    """Weights w + gamma * w+ favour positive evidence; gamma = 0 is the epsilon rule."""
    w, b = module.weight, module.bias
    w2 = w + gamma * w.clamp(min=0)
    b2 = b + gamma * b.clamp(min=0) if b is not None else None
    return _through(lambda a: _conv(module, w2, b2)(a), (x,), R, eps)[0]


class _RelevanceFn(torch.autograd.Function):
    """Forward: the module as usual. Backward: input relevance from output relevance."""

    @staticmethod
    def forward(ctx, x, module, rule):
        ctx.module, ctx.rule = module, rule
        ctx.save_for_backward(x)
        return module(x)

    @staticmethod
    def backward(ctx, R):
        (x,) = ctx.saved_tensors
        return ctx.rule(ctx.module, x, R), None, None


class RuleLayer(nn.Module):
    def __init__(self, module: nn.Module, rule):
        super().__init__()
        self.module, self.rule = module, rule

    def forward(self, x):
        return _RelevanceFn.apply(x, self.module, self.rule)


class _SumFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, eps):
        ctx.eps = eps
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, R):
        a, b = ctx.saved_tensors
        s = R / _stabilize(a + b, ctx.eps)
        return a * s, b * s, None


def relevance_sum(a, b, eps):
    return _SumFn.apply(a, b, eps)


torch.fx.wrap("relevance_sum")


class LRP:
    """`LRP(model, hspec)(x) -> (relevance (B, C, H, W), predicted class (B,))`.

    The canonized, rule-wrapped copy of the model is built once here, not per batch.
    """

    def __init__(self, model: nn.Module, hspec):
        self.eps = hspec.epsilon
        if hspec.conv_rule == "alpha_beta" and abs(hspec.alpha - hspec.beta - 1.0) > 1e-6:
            raise UserError(f"heatmaps.method 'lrp' with conv_rule alpha_beta needs heatmaps.alpha - heatmaps.beta "
                            f"= 1 so that relevance is conserved; got alpha={hspec.alpha}, beta={hspec.beta} "
                            f"(the paper: alpha 2, beta 1)")
        if hspec.conv_rule == "alpha_beta":
            conv_rule = partial(alpha_beta_rule, alpha=hspec.alpha, beta=hspec.beta, eps=hspec.epsilon)
        else:
            conv_rule = partial(gamma_rule, gamma=hspec.gamma, eps=hspec.epsilon)
        self.net = build_lrp_model(model, conv_rule, partial(epsilon_rule, eps=hspec.epsilon), hspec.epsilon,
                                   canonize=getattr(hspec, "canonize", True))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        logits = self.net(x)
        pred = logits.argmax(1)
        seed = F.one_hot(pred, logits.shape[1]).to(logits.dtype)
        (rel,) = torch.autograd.grad(logits, x, seed)
        return rel.detach(), pred.detach()


def build_lrp_model(model: nn.Module, conv_rule, eps_rule, eps: float, canonize: bool = True) -> torch.fx.GraphModule:
    name = type(model).__name__
    eps_modules = EPS_MODULES if canonize else EPS_MODULES + (nn.BatchNorm2d,)
    try:
        # canonize: fold BatchNorm into the conv before it; otherwise BatchNorm keeps its own (epsilon) rule
        gm = fuse(copy.deepcopy(model).eval()) if canonize else torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as e:  # noqa: BLE001 - any tracing failure means: not a supported model
        raise UserError(f"heatmaps.method 'lrp': model '{name}' cannot be traced for LRP ({type(e).__name__}: {e}); "
                        f"use heatmaps.method input_x_gradient or gradcam") from None
    for node in list(gm.graph.nodes):
        where = f"node '{node.name}'"
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Conv2d):
                gm.add_submodule(node.target, RuleLayer(mod, conv_rule))
            elif isinstance(mod, eps_modules):
                gm.add_submodule(node.target, RuleLayer(mod, eps_rule))
            elif not isinstance(mod, PASS_MODULES):
                _unsupported(name, f"layer '{node.target}' ({type(mod).__name__})")
        elif node.op == "call_function":
            if node.target in (operator.add, operator.iadd, torch.add) and \
                    all(isinstance(a, torch.fx.Node) for a in node.args[:2]) and len(node.args) == 2:
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
    raise UserError(f"heatmaps.method 'lrp' supports CNNs of Conv2d/BatchNorm/ReLU/pooling/residual-add/Linear "
                    f"(timm resnet*, test_resnet, vgg*); model '{model_name}' has an unsupported {what}. "
                    f"Use heatmaps.method input_x_gradient or gradcam for this backbone")
