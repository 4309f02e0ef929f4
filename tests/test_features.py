"""Activation capture: names, shapes, hook hygiene, early stop with gradients, streaming in inference mode."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layerlab.errors import LayerlabError
from layerlab.features import Extractor, forward_until, iter_features
from layerlab.similarity import CKAAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens(nn.Module):
    """[N, C, H, W] -> [N, T=H*W, C] tokens, like a ViT patch sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.tokens = Tokens()
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(self.tokens(self.block(self.act(self.bn(self.stem(x))))))
        return self.head(t.mean(dim=1))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_unknown_layer_names_the_layer_the_closest_names_and_how_to_list():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    model.add_module("classifier", nn.Linear(4, 2))
    with pytest.raises(LayerlabError) as err:
        Extractor(model, ["features.0", "feature.0"])
    msg = str(err.value)
    assert "'feature.0'" in msg and "'features.0'" in msg and "layerlab.list_layers(model)" in msg
    with pytest.raises(LayerlabError, match="unknown layer 'nope'"):
        forward_until(model, "nope", torch.randn(1, 3, 8, 8))


def test_shapes_flatten_pool_tokens_and_output(net):
    x = torch.randn(2, 3, 8, 8)
    names = ["stem", "block.0", "tokens", "head"]
    with Extractor(net, names, include_output=True) as ex:
        feats = ex(x)
    assert list(feats) == names + ["output"]
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "stem": (2, 4 * 8 * 8), "block.0": (2, 6 * 4 * 4), "tokens": (2, 16 * 6), "head": (2, 3), "output": (2, 3)
    }
    assert torch.equal(feats["output"], net(x).detach())
    pooled = Extractor(net, ["stem", "tokens"], pool=True)(x)
    assert tuple(pooled["stem"].shape) == (2, 4) and tuple(pooled["tokens"].shape) == (2, 6)
    full = Extractor(net, ["stem"], flatten=False)(x)["stem"]
    assert torch.allclose(pooled["stem"], full.mean(dim=(2, 3)))
    assert not feats["stem"].requires_grad
    assert Extractor(net, ["head"], detach=False)(x)["head"].requires_grad


def test_hooks_removed_after_exceptions(net):
    ex = Extractor(net, ["stem", "proj"])
    with pytest.raises(RuntimeError):
        with ex:
            assert hook_count(net) == 2
            ex(torch.randn(2, 5, 8, 8))  # wrong channel count: the forward raises
    assert hook_count(net) == 0 and not ex.active
    with pytest.raises(RuntimeError):
        ex(torch.randn(2, 5, 8, 8))  # call without a with block
    assert hook_count(net) == 0
    with pytest.raises(RuntimeError):
        forward_until(net, "proj", torch.randn(2, 5, 8, 8))
    assert hook_count(net) == 0


def test_module_that_runs_twice_is_refused(net):
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    with pytest.raises(LayerlabError, match="ran twice"):
        Extractor(model, ["1"])(torch.randn(3, 4))
    assert hook_count(model) == 0


def test_forward_until_stops_early_and_gradients_flow(net):
    later_calls = []
    net.head.register_forward_hook(lambda *a: later_calls.append(1))
    net.proj.register_forward_pre_hook(lambda *a: later_calls.append(1))
    net.eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    act = forward_until(net, "block.0", x)
    assert later_calls == []  # proj and head never ran
    with torch.no_grad():
        assert torch.equal(act, Extractor(net, ["block.0"], flatten=False)(x)["block.0"])
    assert later_calls == [1, 1]  # the full forward did run them: the check above can fail
    act.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert hook_count(net) == 2  # only the test's own two hooks remain


def test_iter_features_streams_batches_in_inference_mode_and_restores_modes(net):
    net.train()
    net.bn.eval()  # a mixed state that model.train(True) would not restore
    running = net.bn.running_mean.clone()
    x, y = torch.rand(10, 3, 8, 8), torch.arange(10)
    batches = list(iter_features(net, ["stem", "proj"], (x, y), batch_size=4, include_output=True))
    assert [b["stem"].shape[0] for b in batches] == [4, 4, 2]
    assert all(t.is_inference() for b in batches for t in b.values())
    assert net.training and not net.bn.training and net.block.training
    assert torch.equal(net.bn.running_mean, running)
    net.eval()
    with torch.no_grad():
        whole = Extractor(net, ["proj"])(x)["proj"]
    assert torch.allclose(torch.cat([b["proj"] for b in batches]), whole, atol=1e-6)
    assert hook_count(net) == 0


def test_iter_features_channels_last_input_same_values_and_model_untouched(net):
    net.eval()
    x = torch.rand(12, 3, 8, 8)
    before = {k: (v.clone(), v.stride()) for k, v in net.state_dict().items()}
    fast = list(iter_features(net, ["stem", "block.0"], x, batch_size=6, flatten=False))
    plain = list(iter_features(net, ["stem", "block.0"], x, batch_size=6, flatten=False, channels_last=False))
    assert fast[0]["stem"].is_contiguous(memory_format=torch.channels_last)  # the layout did change
    assert plain[0]["stem"].is_contiguous()
    for a, b in zip(fast, plain):
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6)
    flat = list(iter_features(net, ["stem"], x, batch_size=6))  # flatten=True: NCHW order whatever the layout
    assert torch.allclose(flat[0]["stem"], plain[0]["stem"].reshape(6, -1), atol=1e-6)
    for k, v in net.state_dict().items():  # weights neither converted nor changed
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1]


def test_iter_features_closed_early_restores_train_mode(net):
    net.train()
    gen = iter_features(net, ["stem"], torch.rand(8, 3, 8, 8), batch_size=2)
    next(gen)
    assert not net.training
    gen.close()
    assert net.training and net.bn.training


def test_gram_transform_in_hook_feeds_the_accumulator(net):
    x = torch.rand(32, 3, 8, 8)
    names = ["stem", "block.0", "proj"]
    plain, hooked = CKAAccumulator(3, names_a=names), CKAAccumulator(3, names_a=names)
    for feats in iter_features(net, names, x, batch_size=16):
        plain.update(feats)
    for grams in iter_features(net, names, x, batch_size=16, transform=hooked.gram):
        assert all(g.shape == (16, 16) and g.dtype == torch.float64 for g in grams.values())
        hooked.update_grams(grams)
    assert torch.allclose(plain.compute(), hooked.compute(), atol=1e-12)
    assert torch.allclose(plain.compute().diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------------------------------- layer selection
RESNET = "timm:resnet18?channels=4,8,8,8&stem_width=4&in_chans=1&num_classes=3"
RESNET_BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    from layerlab import load_model

    return load_model(RESNET)


def test_select_layers_by_path_label_blocks_layers_and_kind(resnet):
    from layerlab.features import select_layers

    assert select_layers(resnet, "blocks") == RESNET_BLOCKS
    want_convs = ["conv1"]  # written out: every stage's first block has a downsample conv here
    for stage in (1, 2, 3, 4):
        want_convs += [f"layer{stage}.0.conv1", f"layer{stage}.0.conv2", f"layer{stage}.0.downsample.0",
                       f"layer{stage}.1.conv1", f"layer{stage}.1.conv2"]
    assert select_layers(resnet, "kind:Conv2d") == want_convs
    assert select_layers(resnet, "layers") == want_convs + ["fc"]
    assert select_layers(resnet, ["kind:BasicBlock"]) == RESNET_BLOCKS  # any class name, not only layers
    # a path, a learnable layer's label, a block's label; asked order kept, duplicates dropped
    assert select_layers(resnet, ["layer3.1", "[2.0] conv1", "[4.1]", "layer3.1", "fc"]) == [
        "layer3.1", "layer2.0.conv1", "layer4.1", "fc"]
    assert select_layers(resnet, ["layer2", "blocks"])[:3] == ["layer2", "layer1.0", "layer1.1"]


def test_select_layers_errors_are_one_line_with_close_matches(resnet):
    from layerlab.features import select_layers

    cases = [
        ("layer3.7", r"unknown layer 'layer3.7' in ResNet \(did you mean 'layer3.1', 'layer3.0'.*layerlab layers SPEC"),
        ("[3.1] conv3", r"unknown layer '\[3.1\] conv3'.*did you mean '\[3.1\] conv2', '\[3.1\] conv1'"),
        ("block", r"did you mean 'blocks'"),
        ("kind:conv2d", r"no module of class 'conv2d' in ResNet \(did you mean 'kind:Conv2d'\?\); its module classes"),
    ]
    for item, pattern in cases:
        with pytest.raises(LayerlabError, match=pattern) as err:
            select_layers(resnet, [item])
        assert "\n" not in str(err.value)
    with pytest.raises(LayerlabError, match="'blocks' selects nothing in Sequential"):
        select_layers(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), "blocks")
    with pytest.raises(LayerlabError, match="expected names"):
        select_layers(resnet, [3])
    with pytest.raises(LayerlabError, match="list is empty"):
        select_layers(resnet, [])


def test_layer_labels_keep_the_resnet_labels_and_label_any_module(resnet):
    from layerlab.features import layer_labels

    names = ["conv1", "layer3.1", "layer3.1.conv2", "layer3.1.act1", "layer2.0.downsample.0", "layer2", "fc", "output"]
    # the labels dynamics tables have always carried for a ResNet (layerlab.layers.display_label)
    assert list(layer_labels(resnet, names).values()) == [
        "conv1", "layer3.1", "[3.1] conv2", "[3.1] act1", "[2.0] downsample.0", "layer2", "fc", "output"]


# ------------------------------------------------------------------------------------------------ tokens
class WithClassToken(Net):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 6))


def test_tokens_reduce_token_outputs_and_leave_conv_maps_alone():
    torch.manual_seed(0)
    net = WithClassToken().eval()
    x = torch.randn(3, 3, 8, 8)
    raw = Extractor(net, ["stem", "tokens", "proj"], flatten=False)(x)
    assert raw["tokens"].shape == (3, 16, 6) and raw["stem"].ndim == 4
    want = {"flatten": raw["tokens"].reshape(3, -1), "cls": raw["tokens"][:, 0], "mean": raw["tokens"].mean(dim=1)}
    for tokens, expected in want.items():
        got = Extractor(net, ["stem", "tokens", "proj"], tokens=tokens)(x)
        assert torch.equal(got["tokens"], expected), tokens
        assert torch.equal(got["stem"], raw["stem"].reshape(3, -1))  # conv maps: unaffected
        batches = list(iter_features(net, ["tokens"], x, batch_size=2, tokens=tokens))
        assert torch.allclose(torch.cat([b["tokens"] for b in batches]), expected, atol=1e-6)
    # tokens go first, then pool: the class token is not averaged away
    assert torch.equal(Extractor(net, ["proj"], tokens="cls", pool=True)(x)["proj"], raw["proj"][:, 0])


def test_bad_tokens_and_cls_without_a_class_token_are_one_line_errors(net):
    x = torch.randn(2, 3, 8, 8)
    for bad in ("CLS", "first", None):
        with pytest.raises(LayerlabError, match=r"tokens: expected one of 'flatten', 'cls', 'mean'"):
            Extractor(net, ["tokens"], tokens=bad)
    with pytest.raises(LayerlabError, match=r"tokens='cls': layer 'tokens' outputs tokens \[2, 16, 6\] but Net has no "
                                            r"class token") as err:
        Extractor(net, ["tokens"], tokens="cls")(x)
    assert "\n" not in str(err.value) and hook_count(net) == 0
    assert Extractor(net, ["stem"], tokens="cls")(x)["stem"].shape == (2, 4 * 8 * 8)  # no tokens: nothing refused
