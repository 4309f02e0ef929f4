from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import layerlab
from layerlab.errors import LayerlabError
from layerlab.layers import display_label, resolve_layers, residual_blocks
from layerlab.models import ModelSpec, Normalized, fresh_model, load_model, read_checkpoint_meta, save_checkpoint


def test_spec_parsing_roundtrip():
    s = ModelSpec.parse("timm:resnet18?channels=8,16,32,64&drop_rate=0.1&num_classes=10&global_pool=avg")
    assert s.source == "timm" and s.name == "resnet18"
    assert s.kwargs == {"channels": (8, 16, 32, 64), "drop_rate": 0.1, "num_classes": 10, "global_pool": "avg"}
    assert ModelSpec.parse(str(s)) == s
    tv = ModelSpec.parse("torchvision:resnet50:IMAGENET1K_V2")
    assert (tv.name, tv.weights) == ("resnet50", "IMAGENET1K_V2")


def test_timm_spec_builds_with_kwargs(tiny_arch):
    m = load_model(tiny_arch)
    assert m.layer1[0].conv1.out_channels == 8 and m.fc.out_features == 10
    assert not m.training
    assert m.layerlab_arch == "timm:resnet18?channels=8,16,32,64&num_classes=10"


def test_torchvision_spec_and_num_classes_override():
    m = load_model("torchvision:resnet18", num_classes=7)
    assert m.fc.out_features == 7
    assert "num_classes=7" in m.layerlab_arch


def test_torchvision_weights_from_local_cache_only(tmp_path):
    import torchvision

    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(LayerlabError, match="not in the local torch hub cache"):
        load_model("torchvision:resnet18:IMAGENET1K_V1")
    # Put a state dict in the cache under the official file name: it loads, with normalisation wrapped in.
    ref = torchvision.models.resnet18()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), cached)
    m = load_model("torchvision:resnet18:IMAGENET1K_V1")
    assert isinstance(m, Normalized)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref.eval()
    torch.testing.assert_close(m(x), ref((x - mean) / std))
    # a fresh instance keeps the wrapper so parameter names line up
    f = fresh_model(m, seed=0)
    assert isinstance(f, Normalized) and set(dict(f.named_parameters())) == set(dict(m.named_parameters()))


def test_timm_pretrained_tag_without_cache_says_how():
    with pytest.raises(LayerlabError, match="never downloads"):
        load_model("timm:resnet18.a1_in1k")


@pytest.mark.parametrize("bad, match", [
    ("resnet18", "has no source"),
    ("keras:resnet18", "unknown model source"),
    ("timm:resnet_nope", "timm has no model"),
    ("torchvision:resnet18:NOPE", "has no weights"),
    ("torchvision:nonet", "torchvision has no model"),
    ("file:/does/not/exist.pt", "does not exist"),
])
def test_bad_model_specs(bad, match):
    with pytest.raises(LayerlabError, match=match) as info:
        load_model(bad)
    assert "\n" not in str(info.value)  # one line


def test_checkpoint_roundtrip_and_fresh_instance(tmp_path, tiny_arch):
    m = load_model(tiny_arch)
    with torch.no_grad():
        m.fc.weight.add_(1.0)
    p = save_checkpoint(m, tmp_path / "ckpt.pt", epoch=3, note="x")
    assert read_checkpoint_meta(p)["epoch"] == 3
    back = load_model(f"file:{p}")
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(back(x), m(x))
    assert back.layerlab_arch == m.layerlab_arch
    f0, f0b, f1 = fresh_model(back, 0), fresh_model(back, 0), fresh_model(back, 1)
    assert torch.equal(f0.conv1.weight, f0b.conv1.weight)
    assert not torch.equal(f0.conv1.weight, f1.conv1.weight)
    assert not torch.equal(f0.fc.weight, back.fc.weight)


def test_file_whole_module_and_bare_state_dict(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(1, 3, 8, 8))
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(LayerlabError, match=r"pickled Python objects .*trust_pickle=True"):
        load_model(f"file:{tmp_path / 'whole.pt'}")  # unpickling runs code from the file: only when asked
    m = load_model(f"file:{tmp_path / 'whole.pt'}", trust_pickle=True)
    assert isinstance(m, nn.Sequential)
    with pytest.raises(LayerlabError, match="no architecture spec"):
        fresh_model(m, 0)  # never silently "fresh" = the saved weights
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(LayerlabError, match="bare state_dict"):
        load_model(f"file:{tmp_path / 'sd.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LayerlabError, match="cannot read checkpoint"):
        load_model(f"file:{tmp_path / 'junk.pt'}")
    with pytest.raises(LayerlabError, match="fresh instance"):
        fresh_model(nn.Linear(2, 2), 0)


def test_layers_listing_excludes_norms_and_labels(tiny_arch):
    m = load_model(tiny_arch)
    infos = layerlab.list_layers(m)
    assert infos[0].name == "conv1" and infos[-1].name == "fc"
    assert all(i.kind in ("Conv2d", "Linear") for i in infos)
    assert not any("bn" in i.name for i in infos)
    n_convs = sum(isinstance(mod, nn.Conv2d) for mod in m.modules())
    assert len(infos) == n_convs + 1
    labels = {i.name: i.label for i in infos}
    assert labels["layer3.1.conv2"] == "[3.1] conv2"
    assert labels["layer2.0.downsample.0"] == "[2.0] downsample.0"
    assert display_label("net.layer4.1.conv1") == "[4.1] conv1"
    assert display_label("blocks.3.attn.qkv") == "[3] attn.qkv"
    # forward-ordered listing agrees with registration order for a ResNet
    assert [i.name for i in layerlab.list_layers(m, sample=torch.rand(1, 3, 32, 32))] == [i.name for i in infos]


def test_resolve_layers_by_name_or_label_and_unknown(tiny_arch):
    m = load_model(tiny_arch)
    got = resolve_layers(m, ["conv1", "[4.1] conv2"])
    assert [g.name for g in got] == ["conv1", "layer4.1.conv2"]
    with pytest.raises(LayerlabError, match="did you mean"):
        resolve_layers(m, ["layer4.1.conv3"])
    with pytest.raises(LayerlabError, match="not a learnable"):
        resolve_layers(m, ["bn1"])


def test_residual_blocks(tiny_arch):
    blocks = residual_blocks(load_model(tiny_arch))
    assert blocks["conv1"] == ["conv1"] and blocks["fc"] == ["fc"]
    assert blocks["layer2.0"] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert len(blocks) == 2 + 8
