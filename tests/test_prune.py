"""Block removal (issue 17): a removed block is exactly its shortcut, every criterion is deterministic under a seed,
FLOPs fall as an independent count says, a pruned model saves, loads and runs the other analyses, jobs resume, healing
keeps magnitude pruning's zeros, and bad input is one clear line."""
from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from helpers import run_cli
from torch import nn

import layerlab as ll
from layerlab.errors import LayerlabError
from layerlab.models import load_model
from layerlab.prune import (
    CRITERIA,
    RemovedBlock,
    ScoreContext,
    angular_distance,
    choose,
    compare,
    count_flops,
    count_params,
    driver,
    parse_budget,
    prune,
    prune_model,
    pruned_arch,
    removable_blocks,
    remove_blocks,
    sparsity,
    split_arch,
    summarize,
    token_cosine,
)
from layerlab.prune.surgery import Block

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "timm:resnet18?channels=8,16,32,64&stem_width=8&num_classes=10"
BOTTLENECK = "timm:resnet26?channels=8,16,32,64&stem_width=8&num_classes=10"
TV_RESNET = "torchvision:resnet18?num_classes=10"
VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&embed_dim=32&depth=3&num_heads=2&num_classes=10"
FAST = {"images": 48, "eval_images": 48, "trials": 1, "batch_size": 48}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A tiny ResNet trained for one epoch on 300 digits: its predictions differ from image to image."""
    from layerlab.train import recipe, train

    run = train("timm:resnet18?channels=8,16,32,64&stem_width=8", "digits", recipe("baseline", epochs=1),
                tmp_path_factory.mktemp("run"), train_n=300, checkpoints="final", progress=False)
    return f"file:{run / 'final.pt'}"


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _branch_end(block: nn.Module) -> list[torch.Tensor]:
    """The parameters that end a block's residual branch: its last norm (ResNets) or its last projections (ViT)."""
    last = [getattr(block, n) for n in ("bn3", "bn2") if hasattr(block, n)]
    return [last[0].weight, last[0].bias] if last else [block.attn.proj.weight, block.attn.proj.bias,
                                                        block.mlp.fc2.weight, block.mlp.fc2.bias]


def _zero_branch(block: nn.Module, scale: float = 0.0) -> None:
    """Make the block's residual branch output zero (``scale`` 0), or give it a random output of that scale (timm
    zero-initialises the last norm of every ResNet block, so a fresh block already is its shortcut)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in _branch_end(block):
            t.copy_(scale * torch.randn(t.shape, generator=g))


# ================================================================================ a removed block is its shortcut
@pytest.mark.parametrize("spec, names", [
    (TINY, ["layer1.1", "layer2.0", "layer4.0"]),        # timm BasicBlock: act2 after the add, downsample paths
    (BOTTLENECK, ["layer1.0", "layer3.0", "layer3.1"]),  # timm Bottleneck: act3 after the add
    (TV_RESNET, ["layer2.0", "layer3.1"]),               # torchvision: relu after the add
    (VIT, ["blocks.1"]),                                 # x + attn(...) + mlp(...): identity
])
def test_removing_a_block_whose_residual_branch_is_zero_leaves_the_logits_unchanged(spec, names):
    model, x = load_model(spec), _images()
    for block in removable_blocks(model):
        _zero_branch(model.get_submodule(block.name), 0.5)
    with torch.no_grad():
        assert not torch.allclose(model(x), remove_blocks(model, names)(x), atol=1e-4)  # removal does something
        for name in names:
            _zero_branch(model.get_submodule(name))
        torch.testing.assert_close(remove_blocks(model, names)(x), model(x), atol=1e-5, rtol=1e-5)


def test_the_zero_branch_check_catches_a_missing_activation_or_downsample():
    """The test above can fail: the same block replaced without its final activation, or without its downsample
    path, does not reproduce the block whose branch is zero."""
    model, x = load_model(TINY), _images()
    for block in removable_blocks(model):
        _zero_branch(model.get_submodule(block.name), 0.5)
    _zero_branch(model.layer2[0])
    block = model.layer2[0]
    no_act = copy.deepcopy(model)
    no_act.layer2[0] = RemovedBlock("downsample", copy.deepcopy(block.downsample), None)
    no_downsample = copy.deepcopy(model)
    no_downsample.layer2[0] = RemovedBlock(None, None, nn.ReLU())
    with torch.no_grad():
        assert not torch.allclose(no_act(x), model(x), atol=1e-3)
        with pytest.raises(RuntimeError):
            no_downsample(x)  # the identity cannot even take the stage's new shape
        torch.testing.assert_close(remove_blocks(model, ["layer2.0"])(x), model(x), atol=1e-5, rtol=1e-5)


def test_removable_blocks_come_from_the_model_and_the_shortcut_rules():
    blocks = removable_blocks(load_model(TINY))
    assert [b.name for b in blocks] == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert blocks[1].params > 0 and blocks[2].params < count_params(load_model(TINY).layer2[0])  # downsample stays
    effnet = load_model("timm:efficientnet_b0?num_classes=10")
    names = [b.name for b in removable_blocks(effnet)]
    assert names and all(effnet.get_submodule(n).has_skip for n in names)
    assert "blocks.1.0" not in names  # a stage's first block changes shape and has no skip
    with pytest.raises(LayerlabError, match="no removable blocks.*shortcut_rule"):
        removable_blocks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)))


def test_a_removed_model_leaves_the_original_alone():
    model, x = load_model(TINY), _images()
    before = model(x).detach()
    remove_blocks(model, ["layer2.0"])
    assert type(model.layer2[0]).__name__ == "BasicBlock" and torch.equal(model(x).detach(), before)
    with pytest.raises(LayerlabError, match="cannot be removed.*layer1.0"):
        remove_blocks(model, ["layer9.9"])


# ================================================================================ criteria
def test_token_cosine_and_angular_distance():
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(token_cosine(x, 2 * x), torch.ones(3))
    torch.testing.assert_close(angular_distance(x, 3 * x), torch.zeros(3, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(angular_distance(x, -x), torch.ones(3, dtype=torch.float64))
    t = torch.randn(2, 5, 6)
    assert token_cosine(t, t).shape == (2,) and angular_distance(t, -t).allclose(torch.ones(2, dtype=torch.float64))


def _context(spec: str, seed: int) -> ScoreContext:
    model = load_model(spec)
    data = ll.load_data("digits", "train", images=48, seed=seed)
    return ScoreContext(model, removable_blocks(model), data, seed, torch.device("cpu"), trials=1, batch_size=24)


@pytest.mark.parametrize("criterion", ["criticality", "block-influence", "angular", "random"])
def test_every_block_criterion_is_deterministic_under_a_seed(trained, criterion):
    score = CRITERIA.get(criterion).score
    first, again, other = score(_context(trained, 0)), score(_context(trained, 0)), score(_context(trained, 1))
    pd.testing.assert_frame_equal(first, again)
    assert not first["score"].equals(other["score"])  # the seed reaches the draws (fresh weights, images, order)
    assert set(first["block"]) == {b.name for b in removable_blocks(load_model(trained))}


def test_the_whole_table_is_deterministic_under_a_seed(trained):
    """All five criteria, magnitude included, twice under one seed: the same blocks, weights and numbers."""
    one = prune(trained, "digits", budgets=[0.25], seeds=3, **FAST).drop(columns=["seconds"])
    two = prune(trained, "digits", budgets=[0.25], seeds=3, **FAST).drop(columns=["seconds"])
    pd.testing.assert_frame_equal(one, two)
    assert list(one["criterion"]) == ["criticality", "block-influence", "angular", "random", "magnitude"]
    a, b = prune_model(trained, "magnitude", 0.25), prune_model(trained, "magnitude", 0.25)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_angular_removes_the_run_with_the_smallest_distance(trained):
    table = CRITERIA.get("angular").score(_context(trained, 0))
    assert table["n"].max() == 8  # every block of a ResNet feeds the next directly: runs up to all eight
    blocks = removable_blocks(load_model(trained))
    picked = choose(table, blocks, parse_budget(3), count_params(load_model(trained)), runs=True)
    best = table[table["n"] == 3].sort_values("score").iloc[0]["block"]
    start = [b.name for b in blocks].index(best)
    assert picked == [b.name for b in blocks[start:start + 3]]


def test_choose_takes_the_lowest_scores_until_the_budget():
    blocks = [Block(f"b{i}", f"[{i}]", i, "B", p) for i, p in enumerate([10, 20, 30, 40])]
    scores = pd.DataFrame({"block": ["b0", "b1", "b2", "b3"], "n": 1, "score": [0.4, 0.1, 0.3, 0.2]})
    assert choose(scores, blocks, parse_budget(2), 200) == ["b1", "b3"]
    assert choose(scores, blocks, parse_budget(0.5), 200) == ["b1", "b3"]
    assert choose(scores, blocks, parse_budget("params:0.25"), 200) == ["b1", "b3"]  # 20 + 40 >= 50
    with pytest.raises(LayerlabError, match="cannot be met"):
        choose(scores, blocks, parse_budget("params:0.9"), 200)
    runs = pd.DataFrame({"block": ["b0", "b1", "b2"], "n": [1, 1, 1], "score": [0.3, 0.2, 0.1]})
    with pytest.raises(LayerlabError, match="no run of 2 chained blocks"):
        choose(runs, blocks, parse_budget(2), 200, runs=True)


@pytest.mark.parametrize("text, kind, value", [("0.25", "blocks", 0.25), (2, "blocks", 2), ("params:0.3", "params", 0.3),
                                                (0.5, "blocks", 0.5), ("blocks:3", "blocks", 3)])
def test_budgets_parse(text, kind, value):
    b = parse_budget(text)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize("text", ["1.5", "0", "params:2", "half", "flops:0.2", 1.0, "-1"])
def test_bad_budgets_say_the_three_forms(text):
    with pytest.raises(LayerlabError, match=r"0\.25.*params:0\.25"):
        parse_budget(text)


def test_bad_input_fails_before_any_work(trained):
    with pytest.raises(LayerlabError, match="did you mean 'criticality'"):
        prune(trained, criteria=["criticallity"])
    with pytest.raises(LayerlabError, match="asks for 9 blocks but the model has 8"):
        prune(trained, budgets=[9], **FAST)
    with pytest.raises(LayerlabError, match="data must be a data spec"):
        prune(trained, torch.rand(4, 3, 32, 32))


# ================================================================================ costs
def _hook_flops(model: nn.Module, x: torch.Tensor, keep=lambda name: True) -> int:
    """An independent count: 2 x multiply-adds of every Conv2d and Linear (those whose name ``keep`` accepts), from
    their output shapes."""
    total = [0]

    def conv(m, args, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, args, out):
        total[0] += 2 * out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and keep(n)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return total[0]


def test_flops_fall_as_an_independent_count_says():
    model, x = load_model(TINY), _images(1)
    removed = ("layer1.1", "layer3.0")
    pruned = remove_blocks(model, list(removed))
    assert count_flops(model, x) == _hook_flops(model, x)
    assert count_flops(pruned, x) == _hook_flops(pruned, x) < count_flops(model, x)
    branches = _hook_flops(model, x, lambda n: n.startswith(tuple(r + "." for r in removed)) and "downsample" not in n)
    assert count_flops(model, x) - count_flops(pruned, x) == branches > 0  # exactly the residual branches' convs
    assert count_params(pruned) == count_params(model) - sum(b.params for b in removable_blocks(model)
                                                             if b.name in removed)


# ================================================================================ checkpoints and other analyses
def test_a_pruned_model_saves_loads_and_runs_every_other_analysis(trained, tmp_path):
    table = prune(trained, "digits", criteria=["block-influence", "magnitude"], budgets=[2], store=tmp_path, **FAST)
    row = table[table["criterion"] == "block-influence"].iloc[0]
    removed = row["removed"].split(",")
    spec = f"file:{row['checkpoint']}"
    loaded = ll.load_model(spec)
    assert split_arch(loaded.layerlab_arch)[1] == removed and count_params(loaded) == row["params"]
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), remove_blocks(load_model(trained), removed)(x))
    assert row["flops_ratio"] < 1 and 0 < row["params_removed"] < 1

    # a fresh process that never imported layerlab.prune loads it too (the `pruned:` source is found on demand)
    import subprocess
    import sys

    code = ("import sys, layerlab as ll; m = ll.load_model(sys.argv[1]); "
            "assert 'layerlab.prune' in sys.modules; print(sum(p.numel() for p in m.parameters()))")
    done = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == row["params"]

    crit = ll.criticality(spec, "digits", images=16, trials=1)
    assert not any(layer.startswith(tuple(f"{r}.conv" for r in removed)) for layer in crit["layer"])
    assert set(crit["fresh_source"]) == {"spec"}  # fresh instances of the pruned architecture
    by_block = ll.criticality(spec, "digits", images=16, trials=1, units="blocks")
    assert not set(removed) & set(by_block["layer"]) and by_block["criticality"].notna().all()
    cka = ll.compare(spec, trained, "digits", images=32, layers_a=["layer4"], layers_b=["layer4"])
    assert 0 < float(cka["cka"].iloc[0]) <= 1.0001
    inverted, _ = ll.invert(loaded, "layer3", x, steps=2)
    assert inverted.shape == x.shape

    magnitude = table[table["criterion"] == "magnitude"].iloc[0]
    dense = ll.load_model(f"file:{magnitude['checkpoint']}")
    assert not dense.layerlab_arch.startswith("pruned:") and sparsity(dense) == pytest.approx(magnitude["sparsity"])
    assert magnitude["flops_ratio"] == 1 and magnitude["flops_dense"]
    blocks = removable_blocks(load_model(trained))  # magnitude zeroes what two average blocks hold
    mean_two = 2 * sum(b.params for b in blocks) / len(blocks) / magnitude["params_base"]
    assert magnitude["params_removed"] == pytest.approx(mean_two, abs=1e-5)


def test_a_rerun_reads_finished_jobs_and_scores(trained, tmp_path, monkeypatch, caplog):
    first = prune(trained, "digits", criteria=["criticality", "random"], budgets=[1], store=tmp_path, **FAST)
    monkeypatch.setattr(driver, "_measure_scores", lambda *a, **k: pytest.fail("scores were measured again"))
    again = prune(trained, "digits", criteria=["criticality", "random"], budgets=[1], store=tmp_path, **FAST)
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    with caplog.at_level("INFO", logger="layerlab"):
        more = prune(trained, "digits", criteria=["criticality", "random"], budgets=[1, 3], store=tmp_path, **FAST)
    assert f"2 of 4 prune jobs already done (in {tmp_path}); running 2" in caplog.text  # finished + pending
    assert len(more) == 4 and set(more["blocks_removed"]) == {1, 3}  # new budgets reuse the stored scores
    assert len(ll.Store(tmp_path).read("prune-scores")) == 16  # 8 blocks x 2 criteria, written once


def test_healing_fine_tunes_and_magnitude_keeps_its_zeros(trained, tmp_path):
    table = prune(trained, "digits", criteria=["random", "magnitude"], budgets=[0.5], finetune_epochs=1,
                  heal_images=96, store=tmp_path, **FAST)
    assert table["accuracy_healed"].notna().all() and table["agreement_healed"].between(0, 1).all()
    mag = table[table["criterion"] == "magnitude"].iloc[0]
    before, after = (ll.load_model(f"file:{mag[c]}") for c in ("checkpoint", "checkpoint_healed"))
    zeros = {n: p == 0 for n, p in before.named_parameters() if n.endswith("weight") and p.ndim > 1}
    changed = False
    for name, p in after.named_parameters():
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), name  # pruned weights stay pruned
            changed |= not torch.equal(p, dict(before.named_parameters())[name])
    assert changed  # and the others were trained
    rnd = table[table["criterion"] == "random"].iloc[0]
    healed = ll.load_model(f"file:{rnd['checkpoint_healed']}")
    assert split_arch(healed.layerlab_arch)[1] == rnd["removed"].split(",")


# ================================================================================ tables, figure, specs, CLI
def _synthetic() -> pd.DataFrame:
    rows = []
    for model in ("a", "b"):
        for seed in (0, 1, 2):
            for crit, acc in (("criticality", 0.8), ("random", 0.6), ("angular", 0.85)):
                for budget, frac in (("0.25", 0.25), ("0.5", 0.5)):
                    rows.append({"model": model, "criterion": crit, "budget": budget, "budget_kind": "blocks",
                                 "budget_fraction": frac, "seed": seed, "accuracy": acc - frac / 10 + seed / 100,
                                 "agreement": acc, "accuracy_healed": acc + 0.05, "agreement_healed": acc,
                                 "accuracy_base": 0.9, "params_removed": frac, "flops_ratio": 1 - frac})
    return pd.DataFrame(rows)


def test_summarize_and_compare_report_the_seed_spread():
    table = _synthetic()
    summary = summarize(table)
    row = summary[(summary.criterion == "criticality") & (summary.budget == "0.25") & (summary.stage == "pruned")]
    assert row["accuracy"].item() == pytest.approx(0.8 - 0.025 + 0.01) and row["seeds"].item() == 3
    assert row["accuracy_std"].item() == pytest.approx(0.01)
    verdicts = compare(table).set_index(["other", "budget", "stage"])["verdict"]
    assert verdicts[("random", "0.25", "pruned")] == "beats" and verdicts[("angular", "0.5", "healed")] == "loses"
    with pytest.raises(LayerlabError, match="reference criterion 'magnitude'"):
        compare(table, reference="magnitude")


def test_plot_prune_draws_one_series_per_criterion_and_stage(tmp_path):
    from layerlab.plots.prune import figures, plot_prune

    fig = plot_prune(_synthetic())
    axes = fig.get_axes()
    assert [ax.get_title().split(" (")[0] for ax in axes] == ["after removal", "after healing"]
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert [lab.split(" (")[0] for lab in labels] == ["criticality", "random", "angular", "unpruned"]
    paths = figures({"prune": _synthetic()}, tmp_path)
    assert {p.name for p in paths} == {"prune_accuracy.png", "prune_accuracy.svg", "prune_agreement.png",
                                       "prune_agreement.svg"}


def test_the_pruned_spec_round_trips():
    arch = pruned_arch("timm:resnet18?num_classes=10", ["layer1.1", "layer3.0"])
    assert split_arch(arch) == ("timm:resnet18?num_classes=10", ["layer1.1", "layer3.0"], False)
    assert split_arch(pruned_arch(arch, ["layer4.1"], masked=True))[1:] == (["layer1.1", "layer3.0", "layer4.1"], True)
    model = load_model(arch, num_classes=7)
    assert type(model.layer3[0]).__name__ == "RemovedBlock" and model.fc.out_features == 7


def test_the_api_exports_prune():
    assert ll.prune.prune is prune and callable(ll.prune) and "prune" in ll.__all__
    assert math.isfinite(ll.prune.parse_budget("0.1").value)


def test_the_cli_prunes_and_words_bad_input_in_one_line(trained, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "prune", "--help")
    assert code == 0 and "Example" in out and "--finetune-epochs" in out and "params:F" in out
    for args, match in ((["--by", "criticallity"], "did you mean 'criticality'"), (["--budget", "1.5"], "params:0.25"),
                         (["--by", ""], "names no criterion"), (["--budget", " "], "names no budget")):
        code, _, err = run_cli(monkeypatch, capsys, "prune", trained, "--out", str(tmp_path / "bad"), *args)
        assert code == 2 and err.startswith("error: ") and match in err and err.strip().count("\n") == 0
    code, out, err = run_cli(monkeypatch, capsys, "prune", trained, "--budget", "1", "--by", "criticality,random",
                             "--images", "48", "--eval-images", "48", "--trials", "1", "--out", str(tmp_path / "o"),
                             "--no-progress", "--threads", "1")
    assert code == 0, err
    assert "unpruned accuracy: 0." in out
    for name in ("prune.csv", "prune_summary.csv", "prune_compare.csv", "figures/prune/prune_accuracy.png"):
        assert (tmp_path / "o" / name).exists(), name


def test_the_contract_makes_prune_a_sweep_kind_whose_job_writes_the_api_shards(trained, tmp_path):
    from layerlab import analysis as contract
    from layerlab.store import Store

    found = {a.name: a for a in contract.analyses()}["prune"]
    assert found.tables == ("prune", "prune-scores") and found.cli == "layerlab.cli.prune:register"
    options = {"criteria": ["random"], "budgets": [1], "images": 48, "eval_images": 48, "trials": 1}
    contract.run_job(found, {**options, "model": trained, "data": "digits", "device": "cpu", "name": "m",
                             "run": None, "key": "k", "version": 1}, tmp_path, Store(tmp_path))
    direct = prune({"m": trained}, "digits", store=tmp_path, **options)  # the same job: read, not recomputed
    assert len(Store(tmp_path).read("prune")) == 1 and direct["seconds"].item() == Store(tmp_path).read("prune")["seconds"].item()
