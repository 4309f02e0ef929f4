"""The demo's block-removal step (issue 17): three models of the demo zoo, every criterion, a quarter and half of
the blocks removed, no healing (``layerlab prune --finetune-epochs 1`` heals; benchmarks/prune.py runs the full
comparison with seeds and healing). The ``demo`` of the prune contract (layerlab/analyses/prune.py)."""
from __future__ import annotations

from ..demo import DemoContext

__all__ = ["DEMO_MODELS", "demo_prune"]

#: the reference recipe, another optimiser and adversarial training: three different criticality profiles
DEMO_MODELS = ("baseline", "adam", "pgd-linf-8")


def demo_prune(ctx: DemoContext) -> None:
    """Remove 25 % and 50 % of the residual blocks of three zoo models by each criterion; table, figures, summary."""
    from ..plots.prune import figures
    from ..prune import prune, summarize

    models = {m: f"file:{ctx.zoo_dir / m / 'final.pt'}" for m in DEMO_MODELS if (ctx.zoo_dir / m / "final.pt").exists()}
    table = prune(models, "digits", budgets=(0.25, 0.5), seeds=0, device=ctx.device, store=ctx.store,
                  progress=ctx.progress)
    table.to_csv(ctx.out / "prune.csv", index=False)
    figures({"prune": table}, ctx.out / "figures" / "prune")
    s = summarize(table)
    cols = [c for c in ("criterion", "budget", "accuracy", "agreement", "params_removed", "flops_ratio") if c in s.columns]
    print(s[cols].round(3).to_string(index=False), flush=True)
