"""The fused / GEMM paths of the conv stem, parallel branch, adapters and MLP against the plain module
computation they replace: outputs, every parameter gradient and the BatchNorm running statistics, in
train and eval mode, fp32, to ~1e-6.

`use_reference(model)` puts the original, one-module-per-op forwards back on a model (also used to
benchmark the old path against the new one in the same run)."""
import copy
import types

import pytest
import torch
from torch import nn

import msclip
from msclip.layers import Mlp, QuickGELU, batch_norm_group, conv1x1, depthwise_pool
from msclip.model import ImageTower
from msclip.parallel import BottleneckStage, FirstStage, LateralAdapter
from msclip.stems import BasicStage, ConvStem


def _mlp(self, x):
    return self.c_proj(QuickGELU()(self.c_fc(x)))


def _basic_stage(self, x):
    return torch.relu(self.bn1(self.conv1(x)) + self.down_bn(self.down_conv(x)))


def _conv_stem(self, x, first=None):
    x = torch.relu(self.bn1(self.conv1(x)))
    for stage in self.stages:
        x = stage(x)
    return self.last_conv(x)


def _first_stage(self, x, out=None):
    return torch.relu(self.bn(self.conv(x)))


def _bottleneck(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + self.residual_bn(self.residual_conv(x)))


def _adapter(self, x, branch, h, w):
    b, n, d = x.shape
    cls, patches = x[:, :1], x[:, 1:]
    grid = patches.transpose(1, 2).reshape(b, d, h, w)
    bottom = self.bottom_bn(self.bottom_dw(grid)).flatten(2).transpose(1, 2)
    top = self.t2b_pw(self.t2b_bn(self.t2b_dw(branch))).flatten(2).transpose(1, 2)
    return self.ln(torch.cat([cls + cls, bottom + top], dim=1))


def _embed(self, images):
    x = self.stem(images)
    b, d, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([self.class_embedding.expand(b, 1, d), x], dim=1) + self.positional_embedding
    hook = None if self.parallel is None else self.parallel.lateral_hook(images, h, w)
    return self.ln_pre(x), hook


_REFERENCE = {Mlp: _mlp, BasicStage: _basic_stage, ConvStem: _conv_stem, FirstStage: _first_stage,
              BottleneckStage: _bottleneck, LateralAdapter: _adapter, ImageTower: _embed}


def use_reference(model: nn.Module) -> nn.Module:
    """The original forwards (one nn module per conv / BN, QuickGELU as written) on `model`'s modules."""
    for module in model.modules():
        fn = _REFERENCE.get(type(module))
        if fn is not None:
            setattr(module, "embed" if isinstance(module, ImageTower) else "forward", types.MethodType(fn, module))
    return model


def _step(model, images, tokens):
    out = model(images, tokens)
    loss = (out["image_features"] * out["text_features"]).sum() * out["logit_scale"]
    if model.training:
        loss.backward()
    return out


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("name", ["msclip-s-b32-tiny", "msclip-s-b16-tiny", "clip-b32-tiny"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_paths_match_reference(name, train, one_thread):
    fast = msclip.create_model(name)
    ref = use_reference(copy.deepcopy(fast))
    fast.train(train)
    ref.train(train)
    size = fast.cfg.vision.image_size
    images = torch.randn(8, 3, size, size)
    tokens = msclip.get_tokenizer(name)(["a photo of a dog", "two cats", "x", "a red car"] * 2)
    for _ in range(2):  # the second step runs on the statistics the first one updated
        with torch.set_grad_enabled(train):
            a, b = _step(fast, images, tokens), _step(ref, images, tokens)
        for key in ("image_features", "text_features"):
            torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=0)
    buffers_a, buffers_b = _buffers(fast), _buffers(ref)
    assert buffers_a.keys() == buffers_b.keys()
    for key in buffers_a:  # running mean / var / count: each BN module's own, updated exactly once per step
        torch.testing.assert_close(buffers_a[key], buffers_b[key], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")
    assert fast.state_dict().keys() == ref.state_dict().keys()
    if train:
        grads_b = dict(ref.named_parameters())
        for key, p in fast.named_parameters():
            g, g_ref = p.grad, grads_b[key].grad
            assert g is not None and g_ref is not None, key
            scale = g_ref.abs().max().clamp_min(1e-3)
            torch.testing.assert_close(g / scale, g_ref / scale, atol=2e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_primitives_match_modules(one_thread):
    x = torch.randn(4, 4, 16, 16, requires_grad=True)
    for c_out, stride in ((8, 1), (8, 2)):
        conv = nn.Conv2d(4, c_out, 1, stride=stride, bias=False)
        torch.testing.assert_close(conv1x1(x, conv.weight, stride), conv(x), atol=1e-6, rtol=0)
    for k in (1, 2, 4, 8):
        dw = nn.Conv2d(4, 4, k, stride=k, groups=4, bias=False)
        torch.testing.assert_close(depthwise_pool(x, dw.weight), dw(x), atol=1e-6, rtol=0)
    # BatchNorm on a channel-major tensor (what the GEMM 1x1 conv returns) and on two channel blocks at once
    norms = [nn.BatchNorm2d(3), nn.BatchNorm2d(5)]
    twins = copy.deepcopy(norms)
    y = torch.randn(5, 8, 6, 6) * 3 + 1
    y_cm = y.transpose(0, 1).contiguous().transpose(0, 1)
    for momentum in (0.1, None):  # None: cumulative average (MSCLIP._fit_batchnorm_stats)
        for n in norms + twins:
            n.momentum = momentum
        out = batch_norm_group(y_cm, norms)
        expected = torch.cat([twins[0](y[:, :3]), twins[1](y[:, 3:])], 1)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        for n, t in zip(norms, twins):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(n, name), getattr(t, name), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [3, 40])  # fewer and more rows than channels
def test_mlp_is_quickgelu_for_any_number_of_rows(rows, one_thread):
    mlp = Mlp(16)
    with torch.no_grad():
        mlp.c_fc.bias.normal_()
        mlp.c_proj.bias.normal_()
    x = torch.randn(rows, 16, requires_grad=True)
    out = mlp(x)
    ref = _mlp(mlp, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    g, g_ref = torch.autograd.grad(out.sum(), (x, mlp.c_fc.weight)), torch.autograd.grad(ref.sum(), (x, mlp.c_fc.weight))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_mlp_exports_with_a_symbolic_row_count(one_thread):
    """A full-width MLP under torch.export with a dynamic batch: nothing in it branches on the row count
    (a test such as `x.numel() < width ** 2` cannot be decided for a symbolic batch at width 768)."""
    mlp = Mlp(768).eval()
    x = torch.randn(4, 50, 768)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(mlp, (x,), dynamic_shapes=({0: batch},))
    y = torch.randn(20, 50, 768)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(y), _mlp(mlp, y), atol=1e-5, rtol=0)
