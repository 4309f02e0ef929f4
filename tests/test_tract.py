"""Tests for layerlab.tract (TrAct, Petersen et al. 2024) against an independent float64 computation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerlab.errors import LayerlabError
from layerlab.tract import TrAct, apply, remove, tract_gradient

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# -- independent reference -----------------------------------------------------------------------------


def ref_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patch rows [N*Ho*Wo, C*kh*kw] by explicit padding and one slice per (channel, kernel offset)."""
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        lrtb = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    elif conv.padding == "valid":
        lrtb = (0, 0, 0, 0)
    else:
        ph, pw = conv.padding
        lrtb = (pw, pw, ph, ph)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, lrtb, mode=mode)
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = []
    for c in range(x.shape[1]):
        for i in range(kh):
            for j in range(kw):
                top, left = i * dh, j * dw
                win = xp[:, c, top: top + sh * (out_h - 1) + 1: sh, left: left + sw * (out_w - 1) + 1: sw]
                cols.append(win.reshape(-1))
    return torch.stack(cols, dim=1)


def ref_tract(rows: torch.Tensor, grad_rows: torch.Tensor, lam: float) -> torch.Tensor:
    """grad_z^T x (x^T x / b + lam I)^-1 with an explicit inverse."""
    b, n = rows.shape
    return grad_rows.T @ rows @ torch.linalg.inv(rows.T @ rows / b + lam * torch.eye(n, dtype=rows.dtype))


def conv_grads(conv: nn.Conv2d, x: torch.Tensor, lam: float, seed: int = 1):
    """Run TrAct(conv) and the plain conv on x with the same upstream gradient; return both sets of grads."""
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    x_plain = x.detach().clone().requires_grad_(True)
    out_plain = conv(x_plain)
    g = torch.randn(out_plain.shape, generator=torch.Generator().manual_seed(seed), dtype=out_plain.dtype)
    plain = torch.autograd.grad(out_plain, [x_plain] + params, g)
    gx_plain, w_plain, b_plain = plain[0], plain[1], plain[2] if len(plain) > 2 else None
    tr = TrAct(conv, lam=lam)
    x_tr = x.detach().clone().requires_grad_(True)
    out_tr = tr(x_tr)
    grads = torch.autograd.grad(out_tr, [x_tr] + params, g)
    return dict(out_plain=out_plain, out_tr=out_tr, g=g, gx_plain=gx_plain, gw_plain=w_plain,
                gb_plain=b_plain, gx=grads[0], gw=grads[1], gb=grads[2] if len(grads) > 2 else None)


def make_conv(**kw) -> nn.Conv2d:
    torch.manual_seed(0)
    args = dict(in_channels=3, out_channels=5, kernel_size=3)
    args.update(kw)
    return nn.Conv2d(**args).to(DT)


# -- the formula ---------------------------------------------------------------------------------------


CONV_CASES = {
    "plain": dict(),
    "stride2": dict(stride=2),
    "stride_tuple": dict(stride=(2, 1), kernel_size=(3, 2)),
    "pad_int": dict(padding=2),
    "pad_tuple": dict(padding=(1, 2), kernel_size=(3, 5)),
    "same_odd": dict(padding="same", kernel_size=5),
    "same_even_asymmetric": dict(padding="same", kernel_size=4, dilation=1),
    "same_dilated": dict(padding="same", kernel_size=(2, 3), dilation=(3, 2)),
    "valid": dict(padding="valid"),
    "dilation": dict(dilation=2, padding=1),
    "dilation_tuple_stride": dict(dilation=(2, 1), stride=(1, 2), padding=(2, 1)),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "replicate": dict(padding=(2, 1), padding_mode="replicate"),
    "circular": dict(padding=1, padding_mode="circular", stride=2),
    "reflect_same_even": dict(padding="same", kernel_size=2, padding_mode="reflect"),
    "no_bias": dict(bias=False, stride=2, padding=3, kernel_size=7),
}


@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv_options_match_independent_computation(case: str) -> None:
    conv = make_conv(**CONV_CASES[case])
    x = torch.randn(3, 3, 13, 16, dtype=DT)
    r = conv_grads(conv, x, lam=0.1)
    rows = ref_patches(x, conv)
    grad_rows = r["g"].permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    assert rows.shape[0] >= rows.shape[1]  # the n x n path
    expected = ref_tract(rows, grad_rows, 0.1).reshape(conv.weight.shape)
    torch.testing.assert_close(r["gw"], expected, rtol=0, atol=1e-10)
    assert not torch.allclose(r["gw"], r["gw_plain"], atol=1e-3)  # TrAct really changed the gradient
    # forward, input gradient and bias gradient are those of the plain layer
    torch.testing.assert_close(r["out_tr"], r["out_plain"], rtol=0, atol=1e-12)
    torch.testing.assert_close(r["gx"], r["gx_plain"], rtol=0, atol=1e-12)
    if conv.bias is not None:
        torch.testing.assert_close(r["gb"], r["gb_plain"], rtol=0, atol=1e-12)


def test_forward_is_bitwise_identical_to_plain_layer() -> None:
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Linear(12, 7)
    x, v = torch.randn(4, 3, 16, 16), torch.randn(2, 5, 12)
    assert torch.equal(TrAct(conv)(x), conv(x))
    assert torch.equal(TrAct(lin)(v), lin(v))


def test_small_batch_uses_b_by_b_form_and_matches_n_by_n(monkeypatch: pytest.MonkeyPatch) -> None:
    import layerlab.tract.gradient as tract_mod

    solved: list[int] = []
    real_solve = tract_mod._solve_spd
    monkeypatch.setattr(tract_mod, "_solve_spd", lambda a, rhs: solved.append(a.shape[0]) or real_solve(a, rhs))
    torch.manual_seed(0)
    conv = make_conv(kernel_size=4, stride=4, out_channels=6)  # n = 48
    x = torch.randn(1, 3, 12, 8, dtype=DT)  # b = 3 * 2 = 6 < n
    r = conv_grads(conv, x, lam=0.1)
    rows = ref_patches(x, conv)
    assert rows.shape[0] < rows.shape[1] and solved == [rows.shape[0]]  # a 6 x 6 system, not 48 x 48
    grad_rows = r["g"].permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    expected = ref_tract(rows, grad_rows, 0.1).reshape(conv.weight.shape)
    torch.testing.assert_close(r["gw"], expected, rtol=0, atol=1e-10)
    # the pure function on both sides of b = n agrees with the n x n inverse formula
    for b in (5, 30, 31, 90):
        xr, gr = torch.randn(b, 30, dtype=DT), torch.randn(b, 4, dtype=DT)
        torch.testing.assert_close(tract_gradient(xr, gr, 0.3), ref_tract(xr, gr, 0.3), rtol=0, atol=1e-10)


def test_large_lambda_recovers_vanilla_gradient() -> None:
    conv = make_conv(padding=1)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    lam = 1e8
    r = conv_grads(conv, x, lam=lam)
    scale = r["gw_plain"].abs().max().item()
    torch.testing.assert_close(lam * r["gw"], r["gw_plain"], rtol=1e-6, atol=1e-6 * scale)
    r_small = conv_grads(conv, x, lam=1.0)
    assert not torch.allclose(1.0 * r_small["gw"], r_small["gw_plain"], rtol=1e-2, atol=1e-3)


def test_conv_equals_linear_on_unfolded_rows() -> None:
    conv = make_conv(stride=2, padding=1, dilation=2)
    x = torch.randn(2, 3, 11, 9, dtype=DT)
    r = conv_grads(conv, x, lam=0.2)
    rows = ref_patches(x, conv)
    lin = nn.Linear(rows.shape[1], conv.out_channels).to(DT)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
        lin.bias.copy_(conv.bias)
    out = TrAct(lin, lam=0.2)(rows)
    grad_rows = r["g"].permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    out_rows = r["out_tr"].permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    torch.testing.assert_close(out, out_rows, rtol=0, atol=1e-12)
    out.backward(grad_rows)
    torch.testing.assert_close(lin.weight.grad.reshape(conv.weight.shape), r["gw"], rtol=0, atol=1e-10)
    torch.testing.assert_close(lin.bias.grad, r["gb"], rtol=0, atol=1e-12)


def test_linear_non_contiguous_3d_input() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).to(DT)
    x = torch.randn(5, 3, 6, dtype=DT).transpose(0, 1)  # [3, 5, 6], not contiguous
    assert not x.is_contiguous()
    x.requires_grad_(True)
    out = TrAct(lin, lam=0.1)(x)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, [x, lin.weight, lin.bias], g)
    expected = ref_tract(x.detach().reshape(-1, 6), g.reshape(-1, 4), 0.1)
    torch.testing.assert_close(gw, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx, g @ lin.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(gb, g.sum((0, 1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, lin(x), rtol=0, atol=1e-12)


def test_non_contiguous_conv_input() -> None:
    conv = make_conv(stride=2, padding=1)
    base = torch.randn(2, 3, 10, 14, dtype=DT).contiguous(memory_format=torch.channels_last)
    x = base[:, :, 1:, 2:12]  # channels_last and offset
    r = conv_grads(conv, x, lam=0.1)
    rows = ref_patches(x, conv)
    grad_rows = r["g"].permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    expected = ref_tract(rows, grad_rows, 0.1).reshape(conv.weight.shape)
    torch.testing.assert_close(r["gw"], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bf16_autocast_matches_float32(kind: str) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 16, 3, padding=1) if kind == "conv" else nn.Linear(24, 16)
    x = torch.rand(8, 3, 12, 12) if kind == "conv" else torch.randn(8, 10, 24)
    tr = TrAct(layer, lam=0.1)
    out = tr(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (gw32,) = torch.autograd.grad(out, [layer.weight], g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = tr(x)
        plain16 = layer(x)
    assert out16.dtype == plain16.dtype == torch.bfloat16
    torch.testing.assert_close(out16, plain16, rtol=0, atol=0)
    (gw16,) = torch.autograd.grad(out16, [layer.weight], g.to(torch.bfloat16))
    assert gw16.dtype == torch.float32
    rel = (gw16 - gw32).norm() / gw32.norm()
    assert rel < 2e-2, rel


# -- module behaviour ----------------------------------------------------------------------------------


def test_wrapper_shares_parameters_and_state_dict_keys() -> None:
    conv = nn.Conv2d(3, 4, 3)
    before = conv.state_dict()
    tr = TrAct(conv)
    assert tr.weight is conv.weight and tr.bias is conv.bias
    assert list(tr.state_dict()) == list(before) == ["weight", "bias"]
    assert tr.kernel_size == (3, 3) and tr.layer is conv
    tr.load_state_dict({k: torch.zeros_like(v) for k, v in before.items()})
    assert conv.weight.abs().sum() == 0
    clone = copy.deepcopy(tr)  # the copy's wrapper and inner layer still share their (new) Parameters
    assert clone.weight is clone.layer.weight and clone.weight is not tr.weight
    assert "lam=0.1" in repr(tr) and "Conv2d(3, 4" in repr(tr)


def test_refuses_grouped_conv_and_bad_inputs() -> None:
    with pytest.raises(LayerlabError, match="groups=3"):
        TrAct(nn.Conv2d(3, 6, 3, groups=3))
    with pytest.raises(LayerlabError, match="lam must be"):
        TrAct(nn.Linear(2, 2), lam=0.0)
    with pytest.raises(LayerlabError, match="expected layer to be"):
        TrAct(nn.BatchNorm2d(3))

    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(LayerlabError, match="overrides forward"):
        TrAct(MyConv(3, 3, 3))
    with pytest.raises(LayerlabError, match="already a TrAct"):
        TrAct(TrAct(nn.Linear(2, 2)))


# -- apply / remove on real models ---------------------------------------------------------------------


def _tiny_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10
    )


def _timm_resnet():
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", num_classes=10)


def _tv_resnet():
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(num_classes=10)


@pytest.mark.parametrize(
    "factory, path", [(_timm_resnet, "conv1"), (_tv_resnet, "conv1"), (_tiny_vit, "patch_embed.proj")],
    ids=["timm_resnet18", "torchvision_resnet18", "timm_vit"],
)
def test_apply_finds_stem_trains_and_remove_restores(factory, path: str) -> None:
    torch.manual_seed(0)
    model = factory()
    vanilla = copy.deepcopy(model)
    original = model.get_submodule(path)
    keys = list(model.state_dict())
    bn_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert apply(model, lam=0.1) is model
    wrapper = model.get_submodule(path)
    assert isinstance(wrapper, TrAct) and wrapper.layer is original
    assert sum(isinstance(m, TrAct) for m in model.modules()) == 1
    assert list(model.state_dict()) == keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bn_stats.items())  # probe left BN alone
    assert model.training

    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))  # the probe's shape: kernels are reused
    w0 = original.weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    F.cross_entropy(vanilla(x), y).backward()
    grad = original.weight.grad.clone()
    for name, p_vanilla in vanilla.named_parameters():  # only the first layer's weight gradient changes
        p_tract = model.get_parameter(name)
        if name == f"{path}.weight":
            assert not torch.allclose(p_tract.grad, p_vanilla.grad, rtol=1e-2, atol=1e-4)
        else:
            torch.testing.assert_close(p_tract.grad, p_vanilla.grad, rtol=1e-5, atol=1e-6)
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(original.weight, w0)
    torch.testing.assert_close(original.weight.detach(), w0 - 0.1 * grad)

    with pytest.raises(LayerlabError, match="already applied"):
        apply(model)
    assert remove(model) is model
    assert model.get_submodule(path) is original and original.weight is wrapper.weight
    assert not any(isinstance(m, TrAct) for m in model.modules())
    assert list(model.state_dict()) == keys
    with pytest.raises(LayerlabError, match="holds no TrAct"):
        remove(model)


def test_apply_by_name_and_errors() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))
    apply(model, name="3")
    assert isinstance(model[3], TrAct) and not isinstance(model[1], TrAct)
    remove(model)
    apply(model, example_input=torch.randn(2, 3, 2, 2))
    assert isinstance(model[1], TrAct)
    with pytest.raises(LayerlabError, match="no submodule"):
        apply(nn.Sequential(nn.Linear(2, 2)), name="conv1")
    with pytest.raises(LayerlabError, match="no learnable nn.Conv2d or nn.Linear ran"):
        apply(nn.Sequential(nn.ReLU()), example_input=torch.randn(1, 3, 4, 4))
    with pytest.raises(LayerlabError, match="groups=3"):
        apply(nn.Sequential(nn.Conv2d(3, 3, 3, groups=3)))


def test_remove_keeps_parameters_replaced_by_module_conversion() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    original = model[0]
    apply(model, example_input=torch.randn(1, 3, 5, 5))
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)  # registers new Parameter objects on the wrapper
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)
    new_weight = model[0].weight
    assert new_weight is not original.weight and new_weight.dtype == torch.float64
    remove(model)
    assert model[0] is original and original.weight is new_weight and original.bias.dtype == torch.float64


# -- apply finds the stem of any model from its structure ------------------------------------------------


def _timm(name: str, **kw):
    def make():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, num_classes=10, **kw)
    return make


def _tv_vit():
    tv = pytest.importorskip("torchvision")
    return tv.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


def _relu_then_conv():
    return nn.Sequential(nn.ReLU(), nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 16 * 16, 10))


STEMS = {
    "timm_resnet18": (_timm("resnet18"), "conv1"),
    "timm_vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=32,
                            num_heads=2), "patch_embed.proj"),
    "timm_convnext_atto": (_timm("convnext_atto"), "stem.0"),
    "timm_efficientnet_b0": (_timm("efficientnet_b0"), "conv_stem"),
    "torchvision_resnet18": (_tv_resnet, "conv1"),
    "torchvision_vit": (_tv_vit, "conv_proj"),
    "relu_then_conv": (_relu_then_conv, "1"),
}


@pytest.mark.parametrize("case", list(STEMS), ids=list(STEMS))
def test_apply_finds_stem_of_any_model(case: str) -> None:
    factory, path = STEMS[case]
    torch.manual_seed(0)
    model = factory().to(DT).eval()  # float64 for a tight comparison with the reference; eval: no dropout
    stem = model.get_submodule(path)
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    before = model(x).detach()  # grad enabled in both runs: no inference-only fast paths (MHA, SDPA)
    assert apply(model, lam=0.1) is model
    assert [n for n, m in model.named_modules() if isinstance(m, TrAct)] == [path]
    wrapper = model.get_submodule(path)
    assert wrapper.layer is stem and not model.training

    seen: dict[str, torch.Tensor] = {}
    wrapper.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))

    def keep_grad(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:  # None: the output is left as is
        out.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    wrapper.register_forward_hook(keep_grad)
    out = model(x)
    assert torch.equal(out.detach(), before)  # TrAct changes only the gradient: the forward is bit-identical
    out.backward(torch.randn(out.shape, dtype=DT, generator=torch.Generator().manual_seed(2)))
    rows = ref_patches(seen["x"], stem)
    grad_rows = seen["g"].permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    expected = ref_tract(rows, grad_rows, 0.1).reshape(stem.weight.shape)
    scale = expected.abs().max().item()
    torch.testing.assert_close(stem.weight.grad, expected, rtol=1e-9, atol=1e-10 * scale)


def test_apply_refuses_unwrappable_first_layer_naming_candidates() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 4, 1), nn.Flatten())
    with pytest.raises(LayerlabError) as info:
        apply(model)
    msg = str(info.value)
    assert "\n" not in msg and "groups=3" in msg
    assert "'0' (Conv2d, groups=3), '1' (Conv2d)" in msg and "layer='<module path>'" in msg
    assert not any(isinstance(m, TrAct) for m in model.modules())
    apply(model, layer="1")  # an explicit choice is honoured
    assert isinstance(model[1], TrAct)
    remove(model)
    apply(model, layer=model[1])  # ... also as the module itself
    assert isinstance(model[1], TrAct)
    with pytest.raises(LayerlabError, match="groups=3"):
        apply(remove(model), layer="0")
    with pytest.raises(LayerlabError, match="not a submodule"):
        apply(model, layer=nn.Conv2d(3, 4, 1))
    with pytest.raises(LayerlabError, match="not both"):
        apply(model, layer="1", name="0")
    with pytest.raises(LayerlabError, match="expected '0' to be"):  # first layer is a Conv1d
        apply(nn.Sequential(nn.Conv1d(3, 4, 3), nn.Linear(4, 2)), example_input=torch.randn(2, 3, 6))


def test_apply_refuses_timm_same_padding_stem() -> None:
    model = _timm("tf_efficientnet_b0")()  # conv_stem is a Conv2dSame (own forward)
    with pytest.raises(LayerlabError, match=r"'conv_stem' \(Conv2dSame, not wrappable\)") as info:
        apply(model)
    assert "\n" not in str(info.value)


def test_apply_skips_frozen_layers_and_falls_back_on_patch_embed() -> None:
    fixed = nn.Conv2d(3, 3, 1, bias=False).requires_grad_(False)  # e.g. a fixed colour transform
    model = nn.Sequential(fixed, nn.Conv2d(3, 4, 3), nn.Flatten())
    apply(model)
    assert isinstance(model[1], TrAct) and model[0] is fixed

    class NeedsDict(nn.Module):  # the probe forward cannot run; the timm-style attribute decides
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, batch: dict) -> torch.Tensor:
            if not isinstance(batch, dict):
                raise TypeError("expected a dict batch")
            return self.patch_embed.proj(batch["image"])

    net = NeedsDict()
    apply(net)
    assert isinstance(net.patch_embed.proj, TrAct)
