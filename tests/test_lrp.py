"""LRP: relevance conservation, canonization, and refusal of unsupported models."""
import pytest
import timm
import torch
from torch import nn

from exmap_ray.errors import UserError
from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.heatmaps.lrp import LRP
from exmap_ray.spec import HeatmapSpec


class BiasFreeResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block, max/avg pooling, linear head: no biases anywhere."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, affine=False)  # no shift: folding adds no bias
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        x = self.pool(self.act(self.bn1(self.conv1(x))))
        x = self.act2(self.conv3(self.act2(self.conv2(x))) + x)
        return self.fc(self.flat(self.gap(x)))


def _net(seed=0):
    torch.manual_seed(seed)
    m = BiasFreeResNet()
    m.bn1.running_var.uniform_(0.5, 2.0)
    m.bn1.running_mean.zero_()
    return m.eval()


@pytest.mark.parametrize("rule", [
    {"conv_rule": "alpha_beta", "alpha": 2.0, "beta": 1.0},
    {"conv_rule": "alpha_beta", "alpha": 1.0, "beta": 0.0},
    {"conv_rule": "gamma", "gamma": 0.25},
    {"conv_rule": "gamma", "gamma": 0.0},
])
def test_relevance_is_conserved_on_bias_free_net(rule):
    x = torch.rand(6, 3, 12, 12) + 0.05
    rel, pred = LRP(_net(), HeatmapSpec(epsilon=1e-9, **rule))(x)
    totals = rel.flatten(1).sum(1)
    # one-hot seed at the predicted class: total input relevance is 1 per image
    torch.testing.assert_close(totals, torch.ones(6), rtol=1e-3, atol=1e-3)
    assert rel.shape == x.shape and (pred == _net()(x).argmax(1)).all()


def test_residual_sum_splits_relevance_by_share():
    from exmap_ray.heatmaps.lrp import relevance_sum

    a = torch.tensor([3.0], requires_grad=True)
    b = torch.tensor([1.0], requires_grad=True)
    (ga, gb) = torch.autograd.grad(relevance_sum(a, b, 1e-9), (a, b), torch.tensor([1.0]))
    torch.testing.assert_close(ga, torch.tensor([0.75]))
    torch.testing.assert_close(gb, torch.tensor([0.25]))


@pytest.mark.parametrize("backbone", ["test_resnet", "resnet10t"])
def test_lrp_on_timm_resnets_canonizes_batchnorm(backbone):
    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=2).eval()
    for m in model.modules():  # non-trivial BN statistics, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    lrp = LRP(model, HeatmapSpec())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lrp.net.modules())
    x = torch.rand(4, 3, 28, 28)
    torch.testing.assert_close(lrp.net(x), model(x), rtol=1e-4, atol=1e-4)
    rel, pred = lrp(x)
    assert rel.shape == x.shape and torch.isfinite(rel).all() and rel.abs().sum() > 0
    assert (pred == model(x).argmax(1)).all()


def test_lrp_keeps_channels_zero_input_gets_zero_relevance():
    """A red-only image gets relevance only in the red channel (the property ExMap relies on on C-MNIST)."""
    model = timm.create_model("test_resnet", num_classes=2).eval()
    x = torch.zeros(2, 3, 28, 28)
    x[:, 0, 8:20, 12:16] = 1.0
    rel, _ = LRP(model, HeatmapSpec())(x)
    assert rel[:, 0].abs().sum() > 0 and rel[:, 1:].abs().sum() == 0


@pytest.mark.parametrize("backbone", ["test_vit", "test_efficientnet"])
def test_unsupported_models_are_refused_by_name(backbone):
    model = timm.create_model(backbone, num_classes=2).eval()
    with pytest.raises(UserError, match=r"heatmaps.method 'lrp'.*(unsupported|cannot be traced).*gradcam"):
        LRP(model, HeatmapSpec())


@pytest.mark.parametrize("method", HEATMAP_METHODS.names())
def test_every_method_explains_the_predicted_class(method):
    model = timm.create_model("test_resnet", num_classes=2).eval()
    x = torch.rand(5, 3, 28, 28)
    maps, pred = HEATMAP_METHODS.get(method)(model, HeatmapSpec())(x)
    assert maps.shape[0] == 5 and maps.shape[-2:] == (28, 28) and torch.isfinite(maps).all()
    assert (pred == model(x).argmax(1)).all()


def test_input_x_gradient_matches_autograd():
    model = timm.create_model("test_resnet", num_classes=2).eval()
    x = torch.rand(3, 3, 28, 28, requires_grad=True)
    logits = model(x)
    sel = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (g,) = torch.autograd.grad(sel, x)
    maps, _ = HEATMAP_METHODS.get("input_x_gradient")(model, HeatmapSpec())(x.detach())
    torch.testing.assert_close(maps, (x * g).detach(), rtol=1e-4, atol=1e-6)
