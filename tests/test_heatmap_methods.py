"""A property test per heatmap method, beyond LRP's conservation (tests/test_lrp.py).

- integrated gradients: completeness (attributions sum to f(x) - f(0)), tighter with more steps;
- input x gradient: Euler's identity on a positively homogeneous (bias-free ReLU) net;
- Grad-CAM: equals CAM on a global-average-pool + linear head;
- LRP: the composite is set by spec keys (canonize on/off, alpha - beta = 1 enforced).
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from exmap_ray.errors import UserError
from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.heatmaps.lrp import LRP
from exmap_ray.spec import HeatmapSpec, from_dict


class HomogeneousNet(nn.Module):
    """Bias-free conv / BN(no shift) / ReLU / pools / residual / linear: f(a x) = a f(x) for a > 0."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6, affine=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.act, self.pool, self.gap = nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        x = self.pool(self.act(self.bn(self.conv1(x))))
        x = self.act(self.conv2(x) + x)
        return self.fc(self.gap(x).flatten(1))


def _homogeneous(seed=0):
    torch.manual_seed(seed)
    m = HomogeneousNet()
    m.bn.running_var.uniform_(0.5, 2.0)  # running mean stays 0: no shift, still homogeneous
    return m.eval()


def _nonlinear_resnet():
    """timm's test_resnet with BatchNorm statistics that make it clearly non-linear along the IG path."""
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", num_classes=2).eval()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.2, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    return m


def test_integrated_gradients_completeness_tightens_with_steps():
    model = _nonlinear_resnet()
    x = 2 * torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, base = model(x), model(torch.zeros_like(x))
    pred = logits.argmax(1)
    gap = (logits - base).gather(1, pred[:, None]).squeeze(1)  # f(x) - f(baseline) at the target class
    assert gap.abs().min() > 0.5  # the check is not vacuous
    err = {}
    for steps in (2, 8, 64):
        maps, p = HEATMAP_METHODS.get("integrated_gradients")(model, HeatmapSpec(ig_steps=steps))(x)
        assert maps.shape == x.shape and (p == pred).all()
        err[steps] = float(((maps.flatten(1).sum(1) - gap).abs() / gap.abs()).mean())
    assert err[64] < 0.01 and err[64] < err[8] < err[2]
    assert err[2] > 0.02  # with 2 steps the Riemann sum is visibly off: the property has teeth


def test_integrated_gradients_equals_input_x_gradient_on_a_homogeneous_net():
    """f(a x) = a f(x) makes the gradient constant along the path from 0, so IG = x * grad exactly."""
    model = _homogeneous()
    x = torch.rand(5, 3, 12, 12) + 0.1
    ig, _ = HEATMAP_METHODS.get("integrated_gradients")(model, HeatmapSpec(ig_steps=3))(x)
    ixg, _ = HEATMAP_METHODS.get("input_x_gradient")(model, HeatmapSpec())(x)
    torch.testing.assert_close(ig, ixg, rtol=1e-4, atol=1e-6)


def test_input_x_gradient_sums_to_the_logit_on_a_homogeneous_net():
    model = _homogeneous(1)
    x = torch.rand(6, 3, 12, 12)
    maps, pred = HEATMAP_METHODS.get("input_x_gradient")(model, HeatmapSpec())(x)
    with torch.no_grad():
        target = model(x).gather(1, pred[:, None]).squeeze(1)
    torch.testing.assert_close(maps.flatten(1).sum(1), target, rtol=1e-4, atol=1e-5)  # Euler's identity


def test_gradcam_equals_cam_on_a_gap_linear_head():
    model = timm.create_model("test_resnet", num_classes=2).eval()
    x = torch.rand(3, 3, 32, 32)
    cam, pred = HEATMAP_METHODS.get("gradcam")(model, HeatmapSpec())(x)
    with torch.no_grad():
        A = model.forward_features(x)
        w = model.get_classifier().weight[pred]  # (B, C)
        ref = F.relu((w[:, :, None, None] * A).sum(1, keepdim=True)) / (A.shape[2] * A.shape[3])
        ref = F.interpolate(ref, size=x.shape[-2:], mode="bilinear", align_corners=False)
    assert cam.shape == (3, 1, 32, 32) and (cam >= 0).all()
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("conv_rule", ["alpha_beta", "gamma"])
def test_lrp_without_canonization_keeps_batchnorm_and_conserves(conv_rule):
    model = _homogeneous(2)
    x = torch.rand(4, 3, 12, 12) + 0.05
    lrp = LRP(model, HeatmapSpec(conv_rule=conv_rule, canonize=False, epsilon=1e-9))
    assert any(isinstance(m, nn.BatchNorm2d) for m in lrp.net.modules())
    rel, _ = lrp(x)
    torch.testing.assert_close(rel.flatten(1).sum(1), torch.ones(4), rtol=1e-3, atol=1e-3)
    # canonized and not: same forward function, different relevance split
    folded = LRP(model, HeatmapSpec(conv_rule=conv_rule, canonize=True, epsilon=1e-9))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.net.modules())
    torch.testing.assert_close(folded.net(x), lrp.net(x), rtol=1e-4, atol=1e-5)


def test_lrp_composite_comes_from_spec_keys_and_bad_alpha_beta_is_refused():
    spec = from_dict({"heatmaps": {"conv_rule": "gamma", "gamma": 0.5, "canonize": False, "ig_steps": 8}})
    assert (spec.heatmaps.gamma, spec.heatmaps.canonize, spec.heatmaps.ig_steps) == (0.5, False, 8)
    assert from_dict({}).heatmaps.ig_steps == 32 and from_dict({}).heatmaps.canonize is True
    with pytest.raises(UserError, match=r"alpha - heatmaps.beta = 1"):
        LRP(_homogeneous(), HeatmapSpec(alpha=2.0, beta=0.5))


def test_unsupported_model_is_refused_without_canonization_too():
    with pytest.raises(UserError, match=r"heatmaps.method 'lrp'.*(unsupported|cannot be traced)"):
        LRP(timm.create_model("test_vit", num_classes=2).eval(), HeatmapSpec(canonize=False))


@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients", "gradcam"])
def test_gradient_methods_under_bf16_autocast(method):
    """heatmaps.precision bf16: forward passes under autocast, fp32 maps close to the fp32 ones."""
    model = _nonlinear_resnet()
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    full, p32 = HEATMAP_METHODS.get(method)(model, HeatmapSpec(precision="fp32", ig_steps=8))(x)
    half, p16 = HEATMAP_METHODS.get(method)(model, HeatmapSpec(precision="bf16", ig_steps=8))(x)
    assert half.dtype == torch.float32 and half.shape == full.shape and torch.isfinite(half).all()
    same = p32 == p16
    cos = F.cosine_similarity(half.flatten(1)[same], full.flatten(1)[same], dim=1)
    assert same.sum() >= 3 and cos.min() > 0.95, cos


@pytest.mark.parametrize("method", HEATMAP_METHODS.names())
def test_features_of_a_bf16_forward_are_close_not_exact(method):
    """heatmaps.precision bf16: the features and logits `explain` keeps are the bf16 forward's, in fp32
    (what the heatmaps stage stores for val under bf16): within a few percent of the fp32 ones."""
    model = _nonlinear_resnet()
    x = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    full = HEATMAP_METHODS.get(method)(model, HeatmapSpec(precision="fp32", ig_steps=4)).explain(x)
    half = HEATMAP_METHODS.get(method)(model, HeatmapSpec(precision="bf16", ig_steps=4)).explain(x)
    assert half.features.dtype == half.logits.dtype == torch.float32
    err = (half.features - full.features).abs().max() / full.features.abs().max()
    assert 0 < err < 0.05, err  # bf16 keeps 8 bits of mantissa: not exact, but close
    cos = F.cosine_similarity(half.features, full.features, dim=1)
    assert cos.min() > 0.999, cos


def test_a_method_without_explain_gets_a_plain_forward_beside_it():
    """A plugin method that only maps images to (relevance, pred): the actors still get features and logits."""
    from exmap_ray.heatmaps.method import with_features
    from exmap_ray.models import embed

    class OnlyMaps:
        def __init__(self, model, hspec):
            self.model = model

        def __call__(self, x):
            return x.abs(), self.model(x).argmax(1)

    model = _nonlinear_resnet()
    x = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    e = with_features(OnlyMaps(model, HeatmapSpec()), model, "fp32").explain(x)
    f, logits = embed(model, x, precision="fp32")
    torch.testing.assert_close(e.features, torch.from_numpy(f))
    torch.testing.assert_close(e.logits, torch.from_numpy(logits))
    assert torch.equal(e.relevance, x.abs())
    lrp = HEATMAP_METHODS.get("lrp")(model, HeatmapSpec())
    assert with_features(lrp, model) is lrp  # a registered method explains itself: one forward
