"""Bring your own model and data (issue 12): layer criticality of any nn.Module on any image data.

The reference side of every number here is independent of layerlab's pipeline: a deep copy of the model whose
layer weights are replaced in place, a plain ``model(x)``, and the softmax cosine computed with numpy in float64.
Models are tiny and the images few, so the file runs in well under a minute on one thread.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import layerlab.criticality as crit
from layerlab import load_data
from layerlab.criticality.engine import _Traces
from layerlab.errors import DataError, LayerlabError, ShapeError
from layerlab.models import fresh_model, fresh_source, load_model, save_checkpoint
from layerlab.runtime import eval_mode
from layerlab.seeds import derive_seed, global_seed

DATA = "digits?size=16"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return load_data(DATA, "test", images=24, seed=0)


class Net(nn.Module):
    """A hand-written classifier: no spec, no timm/torchvision constructor."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


# ------------------------------------------------------------------------------------- the reference side
def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def reference_criticality(model: nn.Module, layer: str, weights: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """100 (1 - mean cos(softmax f(x), softmax f_{layer <- weights}(x))): a deep copy with the layer's weight and
    bias replaced in place, a plain forward, numpy float64."""
    swapped = copy.deepcopy(model).eval()
    with torch.no_grad():
        module = swapped.get_submodule(layer)
        for p in ("weight", "bias"):
            if getattr(module, p, None) is not None:
                getattr(module, p).copy_(weights[f"{layer}.{p}"])
        original = copy.deepcopy(model).eval()(x).double().numpy()
        out = swapped(x).double().numpy()
    p, q = _softmax(original), _softmax(out)
    cos = (p * q).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(q, axis=1)
    return float(100 * (1 - cos.mean()))


def _snapshot(model: nn.Module):
    return [m.training for m in model.modules()], {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_restored(model: nn.Module, snap) -> None:
    flags, state = snap
    assert [m.training for m in model.modules()] == flags
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())


def _state_of(build, seed: int = 0, trial: int = 0) -> dict[str, torch.Tensor]:
    """What trial ``trial`` must draw: ``build()`` under the documented stream, parameters only."""
    with global_seed("criticality/fresh", seed, trial):
        return {k: v.detach().clone() for k, v in build().named_parameters()}


# ------------------------------------------------------------------------------------------ 2. any model
def test_fresh_callable_is_used_and_drawn_on_the_trial_stream(data):
    torch.manual_seed(0)
    model = Net().train()  # a mode the run must give back
    snap = _snapshot(model)
    seen: list[int] = []

    def fresh() -> Net:
        seen.append(torch.initial_seed())  # the seed torch's global RNG was last seeded with
        return Net()

    table = crit.criticality(model, data, trials=2, seed=5, fresh=fresh)
    assert seen == [derive_seed("criticality/fresh", 5, t) for t in (0, 1)]  # once per trial, on its stream
    assert set(table["fresh_source"]) == {"callable"} and table.attrs["fresh"]["model0"].startswith("callable")
    assert list(table["draw_seed"].unique()) == [derive_seed("criticality/fresh", 5, t) for t in (0, 1)]
    x = data.float()
    for _, row in table.iterrows():
        want = reference_criticality(model, row["layer"], _state_of(Net, 5, int(row["trial"])), x)
        assert row["criticality"] == pytest.approx(want, abs=1e-4), (row["layer"], row["trial"])
    _assert_restored(model, snap)


def test_a_bare_timm_model_is_rebuilt_exactly(data):
    import timm

    kw = dict(num_classes=10, img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **kw)  # no layerlab_arch: a user's own object
    assert getattr(model, "layerlab_arch", None) is None
    source = fresh_source(model)
    assert source.kind == "timm" and source.detail.startswith("timm:vit_tiny_patch16_224?num_classes=10")
    seed = derive_seed("criticality/fresh", 0, 0)
    drawn = fresh_model(model, seed)
    torch.manual_seed(seed)
    want = timm.create_model("vit_tiny_patch16_224", **kw)
    assert all(torch.equal(a, b) for a, b in zip(drawn.state_dict().values(), want.state_dict().values()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact rebuild needs no warning
        table = crit.criticality(model, data, trials=1, layers=["patch_embed.proj", "blocks.1.mlp.fc2", "head"])
    assert set(table["fresh_source"]) == {"timm"}
    x = data.float()
    fresh = _state_of(lambda: timm.create_model("vit_tiny_patch16_224", **kw))
    for _, row in table.iterrows():
        assert row["criticality"] == pytest.approx(reference_criticality(model, row["layer"], fresh, x), abs=1e-4)


def test_a_timm_model_with_unrecoverable_kwargs_falls_through():
    import timm

    model = timm.create_model("resnet18", num_classes=10, layers=(1, 1, 1, 1))  # not resnet18's (2, 2, 2, 2)
    assert fresh_source(model).kind == "reset_parameters"
    with pytest.raises(LayerlabError, match="fresh="):
        fresh_model(model, 0)  # fresh_model never falls back to the model's own layers


def test_a_hand_written_module_falls_back_to_reset_parameters_with_a_warning(data):
    torch.manual_seed(0)
    model = Net()
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match=r"reset_parameters\(\).*pass fresh=lambda: Net\(\.\.\.\)") as caught:
        table = crit.criticality(model, data, trials=2)
    assert len([w for w in caught if "reset_parameters" in str(w.message)]) == 1
    assert "\n" not in str(caught[0].message)
    assert set(table["fresh_source"]) == {"reset_parameters"}
    x = data.float()
    for _, row in table.iterrows():
        with global_seed("criticality/fresh", 0, int(row["trial"])):
            redrawn = copy.deepcopy(model)
            for m in redrawn.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.reset_parameters()
        weights = dict(redrawn.named_parameters())
        assert row["criticality"] == pytest.approx(reference_criticality(model, row["layer"], weights, x), abs=1e-4)
    _assert_restored(model, snap)


def test_pickled_whole_modules_need_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERLAB_TRUST_PICKLE", raising=False)
    torch.manual_seed(0)
    torch.save(Net(), tmp_path / "whole.pt")
    with pytest.raises(LayerlabError, match=r"pickled Python objects.*trust_pickle=True.*LAYERLAB_TRUST_PICKLE=1"):
        load_model(f"file:{tmp_path / 'whole.pt'}")
    assert isinstance(load_model(f"file:{tmp_path / 'whole.pt'}", trust_pickle=True), Net)
    monkeypatch.setenv("LAYERLAB_TRUST_PICKLE", "1")
    assert isinstance(load_model(f"file:{tmp_path / 'whole.pt'}"), Net)
    # a layerlab checkpoint holds tensors and strings only: it loads with weights_only=True, no opt-in
    monkeypatch.delenv("LAYERLAB_TRUST_PICKLE")
    spec = "timm:resnet18?channels=8,16,32,64&num_classes=10"
    path = save_checkpoint(load_model(spec), tmp_path / "ckpt.pt")
    assert load_model(f"file:{path}").layerlab_arch == spec


def test_the_spec_a_model_was_loaded_from_comes_before_its_timm_class(data):
    spec = "timm:resnet18?channels=8,16,32,64&num_classes=10"
    model = load_model(spec)
    assert fresh_source(model).kind == "spec"
    table = crit.criticality(model, data, trials=1, layers=["fc"])
    assert list(table["fresh_source"]) == ["spec"]
    explicit = crit.criticality(model, data, trials=1, layers=["fc"], fresh=lambda: load_model(spec))
    assert list(explicit["fresh_source"]) == ["callable"]
    assert explicit["criticality"].iloc[0] == pytest.approx(table["criticality"].iloc[0], abs=1e-9)  # same draws


# ------------------------------------------------------------------------------------------- 3. any data
class _Items(torch.utils.data.Dataset):
    """A map-style dataset of (image, label) or bare images; counts the reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.x, self.y, self.reads = x, y, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i] if self.y is None else (self.x[i], int(self.y[i]))


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(2)
    return Net()


def _crit(model, data, **kw):
    kw = {"trials": 1, "fresh": Net, **kw}
    return crit.criticality(model, data, **kw).set_index(["layer", "trial"])


def test_every_kind_of_data_gives_the_numbers_of_the_equivalent_image_data(net, data):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data.float(), data.labels  # float images in [0, 1]: fed as they are either way
    want = _crit(net, data, batch_size=10)
    same = {
        "tensor pair": (x, y),
        "numpy pair": (x.numpy(), y.numpy()),
        "TensorDataset": TensorDataset(x, y),
        "Dataset": _Items(x, y),
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=10),
        "chunked DataLoader": DataLoader(_Items(x, y), batch_size=7),
    }
    for kind, source in same.items():
        got = _crit(net, source, batch_size=10, cache_mb=0 if kind.startswith("chunked") else 2048)
        for col in ("criticality", "agreement", "accuracy", "kl", "base_accuracy"):
            np.testing.assert_allclose(got[col], want[col], atol=1e-9, err_msg=f"{kind}: {col}")
        assert got.reset_index()["images"].tolist() == [24] * len(got)
    # unlabelled images: the same similarity numbers, accuracy NaN
    bare = _crit(net, x)
    np.testing.assert_allclose(bare["criticality"], want["criticality"], atol=1e-9)
    assert bare["accuracy"].isna().all() and bare["base_accuracy"].isna().all()
    # uint8 is divided by 255, like the ImageData it came from
    u8 = _crit(net, (data.images, data.labels))
    np.testing.assert_allclose(u8["criticality"], want["criticality"], atol=1e-6)


def test_the_users_preprocessing_is_kept(net, data):
    """Normalised images (outside [0, 1]) are fed as given: no range error, no division by 255."""
    x = (data.float() - 0.5) / 0.25
    table = crit.criticality(net, (x, data.labels), trials=1, fresh=Net)
    fresh = _state_of(Net)
    for _, row in table.iterrows():
        assert row["criticality"] == pytest.approx(reference_criticality(net, row["layer"], fresh, x), abs=1e-4)


def test_subsets_of_indexable_data_and_of_a_data_loader(net, data):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data.float(), data.labels
    picked = _crit(net, (x, y), images=9, seed=4)
    rows = data.sample(9, 4).indices  # the same seeded choice as ImageData and load_data
    want = _crit(net, data.sample(9, 4), seed=4)  # seed also names the trial stream
    np.testing.assert_allclose(picked["criticality"], want["criticality"], atol=1e-9)
    table = crit.criticality(net, (x, y), images=9, seed=4, trials=1, fresh=Net)
    positions = [int(torch.nonzero(data.indices == i)) for i in rows]
    assert table.attrs["indices"] == positions  # positions in the data passed in
    assert crit.criticality(net, _Items(x, y), images=9, seed=4, trials=1, fresh=Net).attrs["indices"] == positions
    first = crit.criticality(net, DataLoader(TensorDataset(x, y), batch_size=4), images=10, trials=1, fresh=Net)
    assert first.attrs["indices"] == list(range(10)) and (first["images"] == 10).all()  # the first 10 it yields
    head = _crit(net, (x[:10], y[:10]))
    np.testing.assert_allclose(first.set_index(["layer", "trial"])["criticality"], head["criticality"], atol=1e-9)


def test_a_data_loader_that_changes_between_passes_is_an_error(net, data):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data.float(), data.labels
    with pytest.raises(DataError, match="shuffle=False"):
        crit.criticality(net, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), fresh=Net)

    class Jitter(_Items):
        def __getitem__(self, i):
            img, label = super().__getitem__(i)
            return img + 0.01 * torch.rand(()), label  # random augmentation

    for naive in (False, True):
        with pytest.raises(DataError, match="different images on another pass"):
            crit.criticality(net, DataLoader(Jitter(x, y), batch_size=8), fresh=Net, cache_mb=0, naive=naive)


def test_a_streamed_data_loader_is_read_chunk_by_chunk(net, data, monkeypatch):
    """With a cache smaller than the data, the traces hold one chunk at a time and the loader is read once per
    use; the numbers are those of the held cache."""
    from torch.utils.data import DataLoader

    x, y = data.float(), data.labels
    held = _crit(net, DataLoader(_Items(x, y), batch_size=4))
    sizes: list[int] = []
    original = _Traces.chunks

    def spy(self):
        for chunk, last in original(self):
            sizes.append(len(chunk))
            yield chunk, last

    monkeypatch.setattr(_Traces, "chunks", spy)
    items = _Items(x, y)
    streamed = _crit(net, DataLoader(items, batch_size=4), cache_mb=0)
    assert max(sizes) == 1 and len(sizes) == 6  # one batch per chunk, 6 batches, one pass over all units
    assert items.reads == 4 + 24  # the first batch (validating the stage chain), then one pass over all images
    np.testing.assert_allclose(streamed["criticality"], held["criticality"], atol=1e-9)


def test_a_store_keys_user_data_by_its_content(net, data, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data.float(), data.labels
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    first = crit.criticality(net, loader, trials=1, fresh=Net, store=tmp_path, layers=["fc"])
    again = crit.criticality(net, DataLoader(TensorDataset(x.clone(), y), batch_size=8), trials=1, fresh=Net,
                             store=tmp_path, layers=["fc"])
    assert len(list((tmp_path / "shards" / crit.ANALYSIS).glob("*.parquet"))) == 1  # read back, not recomputed
    assert again["criticality"].tolist() == first["criticality"].tolist()
    crit.criticality(net, DataLoader(TensorDataset(x.flip(0), y.flip(0)), batch_size=8), trials=1, fresh=Net,
                     store=tmp_path, layers=["fc"])
    assert len(list((tmp_path / "shards" / crit.ANALYSIS).glob("*.parquet"))) == 2  # other images: a new job


def test_data_that_cannot_be_read_fails_clearly(net, data):
    from layerlab.data import as_batches

    x, y = data.float(), data.labels
    with pytest.raises(DataError, match="generator can be read only once"):
        as_batches((b for b in [(x, y)]))
    with pytest.raises(ShapeError, match=r"images \[N, C, H, W\].*unsqueeze"):
        as_batches((x[0], y[:1]))
    with pytest.raises(ShapeError, match="integer class labels.*argmax"):
        as_batches((x, torch.nn.functional.one_hot(y, 10)))
    with pytest.raises(DataError, match=r"asked for 25 images but the data passed in \(24 images\) holds 24"):
        as_batches((x, y), images=25)
    with pytest.raises(DataError, match="expected a data spec"):
        crit.criticality(net, {"x": x}, fresh=Net)


# ------------------------------------------------------------------ 4./5. any architecture, and its fast path
class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def handwritten() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Residual(8),
                         Residual(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _timm(name: str, **kw):
    import timm

    return lambda: timm.create_model(name, num_classes=10, **kw)


def _tv(name: str, **kw):
    import torchvision

    return lambda: getattr(torchvision.models, name)(num_classes=10, **kw)


_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))
_MOBILENET_V2 = dict(width_mult=0.25, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2],
                                                                 [6, 64, 1, 2]])

MATRIX = {  # name: (constructor, a block, a stage the chain must split off, layers naive=True re-checks)
    "timm-resnet18": (_timm("resnet18", channels=(8, 16, 32, 64)), "layer1.0", "layer3.1",
                      ["conv1", "layer3.0.downsample.0", "fc"]),
    "timm-vit-6": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=6, embed_dim=32, num_heads=2),
                   "blocks.0", "blocks.4", ["patch_embed.proj", "blocks.2.attn.qkv", "blocks.5.mlp.fc2", "head"]),
    "timm-convnext_atto": (_timm("convnext_atto", dims=(8, 16, 32, 64)), "stages.0.blocks.0", "stages.2.blocks.1",
                           ["stem.0", "stages.2.downsample.1", "stages.3.blocks.1.mlp.fc1", "head.fc"]),
    "timm-efficientnet_b0": (_timm("efficientnet_b0"), "blocks.0.0", "blocks.5.1",
                             ["conv_stem", "blocks.3.1.conv_dw", "blocks.6.0.se.conv_reduce", "classifier"]),
    "timm-swin": (_timm("swin_tiny_patch4_window7_224", **_SWIN), "layers.1.blocks.0", "layers.2.blocks.1",
                  ["patch_embed.proj", "layers.2.downsample.reduction", "layers.2.blocks.1.attn.qkv", "head.fc"]),
    "timm-regnetx_002": (_timm("regnetx_002"), "s2.b1", "s3.b2", ["stem.conv", "s2.b1.downsample.conv", "head.fc"]),
    "tv-resnet18": (_tv("resnet18"), "layer1.0", "layer4.0", ["conv1", "layer2.0.downsample.0", "fc"]),
    "tv-vit": (_tv("VisionTransformer", image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16,
                   mlp_dim=32), "encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_2",
               ["conv_proj", "encoder.layers.encoder_layer_1.self_attention", "heads.head"]),
    "tv-mobilenet_v2": (_tv("MobileNetV2", **_MOBILENET_V2), "features.2", "features.5",
                        ["features.0.0", "features.4.conv.1.0", "classifier.1"]),
    "tv-densenet": (_tv("DenseNet", growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16),
                    "features.denseblock2", "features.denseblock3.denselayer2",
                    ["features.conv0", "features.transition2.conv", "features.denseblock3.denselayer2.conv1",
                     "classifier"]),
    "handwritten": (handwritten, "3", "4", ["0", "4.conv2", "7"]),
}
LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)  # what the paper (and torchvision's ViT qkv) swaps


def _trained_like(build, x: torch.Tensor) -> nn.Module:
    """An untrained model made to answer like a trained one: norms at scale 1, layer scales at 1, logits with a
    spread of about 3 (a fresh model's near-uniform softmax would make every criticality ~0)."""
    torch.manual_seed(11)
    model = build().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        if float(model(x).std()) == 0:  # a zero-initialised head (torchvision's ViT)
            head.weight.normal_(0.0, 0.02)
        head.weight.mul_(3.0 / float(model(x).std()))
    return model


def _reference_all(model: nn.Module, fresh: dict[str, torch.Tensor], layers: list[str], x: torch.Tensor) -> dict:
    """Every layer's criticality the plain way: one deep copy, the layer's weights replaced in place, model(x),
    the weights put back; softmax cosine in numpy float64."""
    return _reference_units(model, fresh, {layer: [layer] for layer in layers}, x)


def _reference_units(model: nn.Module, fresh: dict[str, torch.Tensor], units: dict[str, list[str]],
                     x: torch.Tensor) -> dict:
    """:func:`_reference_all` for units of several modules, swapped together: each module's own parameters
    (weight and bias; a norm's running statistics are buffers and stay)."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        p = _softmax(ref(x).double().numpy())
        out = {}
        for unit, members in units.items():
            params = {(m, n): t for m in members for n, t in ref.get_submodule(m).named_parameters(recurse=False)
                      if t is not None}
            saved = {k: t.detach().clone() for k, t in params.items()}
            for (m, n), t in params.items():
                t.copy_(fresh[f"{m}.{n}"])
            q = _softmax(ref(x).double().numpy())
            for k, t in params.items():
                t.copy_(saved[k])
            cos = (p * q).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(q, axis=1)
            out[unit] = float(100 * (1 - cos.mean()))
    return out


@pytest.fixture(scope="module")
def images32():
    d = load_data("digits?size=32", "test", images=16, seed=0)
    return d.float(), d.labels


@pytest.mark.parametrize("arch", list(MATRIX))
def test_criticality_of_any_architecture_equals_the_plain_reference(arch, images32):
    from torch.utils.data import DataLoader, TensorDataset

    build, block, split_off, recheck = MATRIX[arch]
    x, y = images32
    model = _trained_like(build, x).train()  # handed over in training mode: the flags must come back
    snap = _snapshot(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to full forwards, no reset_parameters warning
        table = crit.criticality(model, loader, trials=1, fresh=build)
        _assert_restored(model, snap)
        pipe = crit.Pipeline(model, torch.device("cpu"), amp=False, channels_last=False)
        with eval_mode(model):
            pipe.validate(x[:8], arch)
    assert len(pipe.stages) > 2 and split_off in [s.path for s in pipe.stages], arch  # split at blocks, not run whole
    layers = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    assert table["layer"].tolist() == layers  # every Conv2d/Linear (and attention in_proj), in module order
    want = _reference_all(model, _state_of(build), layers, x)
    got = table.set_index("layer")["criticality"]
    diff = max(abs(got[n] - want[n]) for n in layers)
    assert diff < 1e-4, (arch, diff)
    assert max(want.values()) > 1  # the comparison is not between numbers that are all ~0
    naive = crit.criticality(model, loader, trials=1, fresh=build, naive=True, layers=recheck)
    assert np.allclose(naive["criticality"], got[recheck].to_numpy(), atol=1e-5), arch
    _assert_restored(model, snap)
    blocks = crit.criticality(model, loader, trials=1, fresh=build, units="blocks", layers=[block])
    assert blocks["kind"].tolist() == ["block"] and blocks["label"].iloc[0].startswith("[")


# ------------------------------------------------------------------- normalisation layers, an opt-in extension
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
NORM_CASES = {  # arch of MATRIX: (norm layers measured with one conv, the label of the first norm, a block)
    "timm-resnet18": (["bn1", "layer1.0.bn1", "layer3.1.bn2", "layer3.1.conv2"], "bn1", "layer2.0"),
    "timm-vit-6": (["blocks.0.norm1", "blocks.5.norm2", "norm", "blocks.5.mlp.fc1"], "[0] norm1", "blocks.1"),
    "timm-convnext_atto": (["stem.1", "stages.2.blocks.0.norm", "head.norm", "stages.2.blocks.0.conv_dw"], "stem.1",
                           "stages.1.blocks.0"),
    "tv-densenet": (["features.norm0", "features.denseblock2.denselayer1.norm2", "features.norm5", "classifier"],
                    "features.norm0", "features.denseblock2"),
}


def _trained_norms(build, x: torch.Tensor) -> nn.Module:
    """:func:`_trained_like`, with every norm's affine parameters moved off their init (else a fresh instance's
    1 and 0 would be the norm's own weights) and BatchNorm statistics from the images (else they would equal a
    fresh instance's 0 and 1, and a swap of the statistics would go unseen); the head rescaled after."""
    model = _trained_like(build, x)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS) and m.weight is not None:
                m.weight.copy_(1 + 0.4 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        model(x)
        model.eval()
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        head.weight.mul_(3.0 / float(model(x).std()))
    return model


@pytest.mark.parametrize("arch", list(NORM_CASES))
def test_normalisation_layers_are_units_on_request(arch, images32):
    build = MATRIX[arch][0]
    names, first_label, block = NORM_CASES[arch]
    x, y = images32
    model = _trained_norms(build, x)
    snap = _snapshot(model)
    with pytest.raises(LayerlabError, match=r"normalisation layer.*pass norm=True \(CLI: --norm\)"):
        crit.criticality(model, (x, y), trials=1, fresh=build, layers=names[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the chain holds with norms as units: no fallback
        table = crit.criticality(model, (x, y), trials=2, fresh=build, norm=True, layers=names)
    _assert_restored(model, snap)  # running statistics included
    modules = dict(model.named_modules())
    rows = table[table["trial"] == 0].set_index("layer")
    assert sorted(rows.index) == sorted(names)
    assert rows["kind"].to_dict() == {n: type(modules[n]).__name__ for n in names}
    assert rows.loc[names[0], "label"] == first_label
    for t in (0, 1):
        want = _reference_all(model, _state_of(build, 0, t), names, x)
        got = table[table["trial"] == t].set_index("layer")["criticality"]
        assert max(abs(got[n] - want[n]) for n in names) < 1e-4, (arch, t, got.to_dict(), want)
        assert min(want[n] for n in names[:3]) > 0.01  # every norm measured moves the output
    naive = crit.criticality(model, (x, y), trials=2, fresh=build, norm=True, layers=names[:1], naive=True)
    assert np.allclose(naive["criticality"], table[table["layer"] == names[0]]["criticality"], atol=1e-5)
    # every norm with affine parameters is a unit; Zhang et al.'s block units take their norms along
    units = crit.units_of(model, norm=True)
    assert [u.name for u in units] == [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)
                                       or (isinstance(m, NORMS) and m.weight is not None)]
    members = next(u for u in crit.units_of(model, "blocks", norm=True) if u.name == block).layers
    assert any(isinstance(modules[m], NORMS) for m in members)
    assert any(isinstance(modules[m], LAYER_TYPES) for m in members)
    blocks = crit.criticality(model, (x, y), trials=1, fresh=build, units="blocks", norm=True, layers=[block])
    want = _reference_units(model, _state_of(build), {block: list(members)}, x)
    assert abs(blocks["criticality"].iloc[0] - want[block]) < 1e-4


def test_norm_layers_of_a_hand_written_module_are_reset_to_their_init(data):
    """The last-resort source (each layer's reset_parameters) resets norms too: 'fresh' affine parameters are
    the norm's own init (1 and 0), not the trained ones (which would measure 0 %)."""
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-1.0, 1.0)
    with pytest.warns(UserWarning, match="reset_parameters"):
        table = crit.criticality(model, data, trials=1, norm=True, layers=["bn"])
    init = {"bn.weight": torch.ones(8), "bn.bias": torch.zeros(8)}
    want = reference_criticality(model, "bn", init, data.float())
    assert want > 0.01 and table["criticality"].iloc[0] == pytest.approx(want, abs=1e-4)


def _on_meta(build):
    with torch.device("meta"):  # the structure needs the module tree only: nothing allocated, nothing drawn
        return build()


def test_structure_reads_layers_and_blocks_off_any_model():
    import timm
    import torchvision

    from layerlab import structure

    def labels(model):
        return {i.name: i.label for i in structure.learnable_layers(model)}

    vit = _on_meta(_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=6, embed_dim=32, num_heads=2))
    assert structure.find_blocks(vit) == [f"blocks.{i}" for i in range(6)]
    assert labels(vit)["blocks.2.attn.qkv"] == "[2] attn.qkv" and labels(vit)["patch_embed.proj"] == "patch_embed.proj"
    convnext = _on_meta(_timm("convnext_atto", dims=(8, 16, 32, 64)))
    assert labels(convnext)["stages.1.blocks.0.conv_dw"] == "[1.0] conv_dw"
    assert structure.block_units(convnext)["stages.1.downsample.1"] == ["stages.1.downsample.1"]  # between stages
    eff = _on_meta(_timm("efficientnet_b0"))
    assert structure.block_units(eff)["blocks.3.1"] == [f"blocks.3.1.{n}" for n in
                                                         ("conv_pw", "conv_dw", "se.conv_reduce", "se.conv_expand", "conv_pwl")]
    # torchvision's MBConv holds its squeeze-excite inside a Sequential of layers: it stays part of the block
    tv_eff = _on_meta(lambda: torchvision.models.efficientnet_b0(num_classes=10))
    assert "features.1.0" in structure.find_blocks(tv_eff)
    assert labels(tv_eff)["features.2.0.block.2.fc1"] == "[2.0] block.2.fc1"
    assert "features.2" in structure.find_blocks(_on_meta(lambda: torchvision.models.mobilenet_v3_small(num_classes=10)))
    tv_vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10)
    assert structure.find_blocks(tv_vit) == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert labels(tv_vit)["encoder.layers.encoder_layer_1.self_attention"] == "[1] self_attention (in_proj)"
    swin = _on_meta(lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=32, window_size=2,
                                              embed_dim=24, depths=(1, 2, 1, 1), num_heads=(1, 1, 1, 1)))
    assert structure.find_blocks(swin)[:3] == ["layers.0.blocks.0", "layers.1.blocks.0", "layers.1.blocks.1"]
    regnet = _timm("regnetx_002")()  # on the CPU: torch < 2.14 has no meta kernel for the unique() its constructor calls
    assert structure.find_blocks(regnet)[0] == "s1.b1" and labels(regnet)["s2.b1.conv2.conv"] == "[2.1] conv2.conv"
    hand = handwritten()
    assert structure.find_blocks(hand) == ["3", "4"] and labels(hand)["4.conv2"] == "[4] conv2"
    assert structure.find_blocks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))) == []


def test_attention_in_projections_are_layers_too(images32):
    """torchvision's ViT keeps qkv in nn.MultiheadAttention's own parameters: they are a unit of their own."""
    import torchvision

    def build():
        return torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10)

    x, y = images32
    model = _trained_like(build, x)
    layer = "encoder.layers.encoder_layer_1.self_attention"
    table = crit.criticality(model, (x, y), trials=1, fresh=build, layers=["[1] self_attention (in_proj)", "heads.head"])
    assert table["layer"].tolist() == [layer, "heads.head"] and table["kind"].iloc[0] == "MultiheadAttention"
    want = _reference_all(model, _state_of(build), [layer, "heads.head"], x)
    got = table.set_index("layer")["criticality"]
    assert abs(got[layer] - want[layer]) < 1e-4 and want[layer] > 0.1


def test_every_source_is_refused_when_it_equals_the_runs_init(tmp_path, data):
    """The guard against re-installing a run's own initial weights holds whatever the fresh source."""
    import json

    import timm

    spec = "timm:resnet18?channels=8,16,32,64&num_classes=10"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"arch": spec, "data": DATA}))
    start = fresh_model(spec, seed=derive_seed("criticality/fresh", 0, 0))  # initialised on trial 0's stream
    start.layerlab_arch = spec
    save_checkpoint(start, run / "checkpoints" / "epoch_0000.pt", epoch=0)

    def build():
        return timm.create_model("resnet18", channels=(8, 16, 32, 64), num_classes=10)

    bare = build()
    bare.load_state_dict(start.state_dict())  # a user's own object, no spec: rebuilt from timm
    for model, fresh in ((bare, None), (bare, build), (load_model(spec), build)):
        with pytest.raises(LayerlabError, match="reset to init"):
            crit.criticality(model, data, trials=1, layers=["conv1"], run=run, fresh=fresh)
    ok = crit.criticality(bare, data, trials=1, layers=["conv1"], run=run, seed=1)
    assert list(ok["fresh_source"]) == ["timm"] and list(ok["draw_seed"]) == [derive_seed("criticality/fresh", 1, 0)]
