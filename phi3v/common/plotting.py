"""Training curves: loss, learning rate and evaluation metrics against optimizer steps, as a PNG (and its data)."""

from __future__ import annotations

import json
from pathlib import Path

SKIP = ("_runtime", "_samples", "_samples_per_second", "_steps_per_second")


def curve_data(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, value), ...], "learning_rate": [...], "eval_accuracy": [...], ...} from Trainer logs; the
    evaluations before, during and after training form one curve per metric."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step", 0)
        for key, value in entry.items():
            wanted = key in ("loss", "learning_rate", "grad_norm") or (
                key.startswith(("eval", "test")) and not key.endswith(SKIP))
            if wanted and isinstance(value, (int, float)):
                key = key.replace("eval_before_", "eval_").replace("eval_after_", "eval_")
                curves.setdefault(key, []).append((step, float(value)))
    return curves


def save_training_curves(log_history: list[dict], directory: str | Path) -> Path | None:
    """Write training_curves.png (a panel per quantity) and .json (the points) to `directory`; None if none logged."""
    curves = curve_data(log_history)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "training_curves.json").write_text(json.dumps(curves, indent=1))
    evaluation_losses = [k for k in curves if k.startswith(("eval", "test")) and k.endswith("_loss")]
    panels = [("loss", ["loss", *evaluation_losses]), ("learning rate", ["learning_rate"]),
              ("evaluation", [k for k in curves if k.startswith(("eval", "test")) and k not in evaluation_losses])]
    panels = [(title, [k for k in keys if k in curves]) for title, keys in panels]
    panels = [p for p in panels if p[1]]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*curves[key])
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(keys) > 1 or title == "evaluation":
            axis.legend(fontsize=8)
    figure.tight_layout()
    path = directory / "training_curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
