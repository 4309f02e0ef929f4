"""The demo's side of invariances under finetuning (Merlin et al. 2023, arXiv 2307.06006): train a pretrained,
a finetuned and a scratch model on the digits, run the STIR grid and draw its figures, in one step, the ``demo`` of
its contract (layerlab/analyses/invariance.py). Imports the analysis and its figures; the analysis imports neither."""
from __future__ import annotations


from .. import runtime
from ..demo import DemoContext
from ..invariance import InversionCache, example_inversions, grid_images, invariance_grid

__all__ = ["DEMO_ARCH", "DEMO_DATA", "DEMO_LAYERS", "demo_invariance"]

DEMO_ARCH = "timm:resnet18?channels=16,32,64,128&stem_width=8&stem_type=deep&in_chans=1"
DEMO_DATA = "digits?size=16&channels=1"
DEMO_LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]


def demo_invariance(ctx: DemoContext) -> None:
    """Pretrain on digits 0-4, finetune on 5-9, train a scratch control on 5-9, and run the STIR grid."""
    # Tiny convolutions gain nothing from intra-op threads, and on an oversubscribed CPU two OpenMP threads made
    # this step ~10x slower (measured); one thread for the step, the caller's setting restored afterwards.
    with runtime.threads(1):
        _demo(ctx)


def _demo(ctx: DemoContext) -> None:
    from ..plots.invariance import save_all
    from ..train import recipe, train

    root = ctx.out / "invariance"
    kw = {"checkpoints": "final", "device": ctx.device, "progress": ctx.progress}
    pt = train(DEMO_ARCH, f"{DEMO_DATA}&classes=0-4", recipe("baseline", epochs=6), root / "pretrained", **kw)
    ft = train(DEMO_ARCH, f"{DEMO_DATA}&classes=5-9", recipe("baseline", epochs=5, lr=0.02), root / "finetuned",
               init=str(pt / "final.pt"), **kw)
    # the control gets more epochs than the finetuning, so it is a trained model, not a weak straw man
    sc = train(DEMO_ARCH, f"{DEMO_DATA}&classes=5-9", recipe("baseline", epochs=10), root / "scratch", **kw)
    data = f"{DEMO_DATA}&classes=5-9"
    cache = InversionCache(ctx.out / "cache" / "inversions")
    res = invariance_grid(pt / "final.pt", ft / "final.pt", sc / "final.pt", data, layers=DEMO_LAYERS, images=128,
                          steps=100, cache=cache, store=ctx.store, device=ctx.device, progress=ctx.progress)
    save_all(res, ctx.out / "figures" / "invariance", originals=grid_images(data, 128)[:6],
             examples=example_inversions(cache, res["inversions"], k=6))
    s = res["summary"]
    cols = ["label", "retention", "scratch", "transfer", "ceiling", "noise", "best_label", "shift_above_noise",
            "scratch_shift_above_noise"]
    print(s[cols].round(3).to_string(index=False), flush=True)
