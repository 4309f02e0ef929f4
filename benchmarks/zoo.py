"""The trained checkpoints benchmarks run on: the demo zoo's, trained into the folder first when it has none."""
from __future__ import annotations

from pathlib import Path


def demo_zoo(path: Path) -> dict[str, str]:
    """``{model: file:spec}`` of a zoo folder (``<model>/final.pt``), training the demo zoo there if it is empty."""
    found = [d for d in path.iterdir() if (d / "final.pt").exists()] if path.is_dir() else []
    if not found:
        from layerlab.train import load_zoo, train_zoo

        print(f"training the demo zoo into {path} (about 90 s on 2 cores) ...", flush=True)
        train_zoo(load_zoo("demo"), path, progress=False)
    return {d.name: f"file:{d / 'final.pt'}" for d in sorted(path.iterdir()) if (d / "final.pt").exists()}
