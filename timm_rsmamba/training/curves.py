"""Training curves (loss, top-1, macro F1 per epoch) drawn from the run's summary.csv."""
import csv
import os

__all__ = ['plot_training_curves']


def _read_summary(summary_csv: str):
    columns = {}
    with open(summary_csv, newline='') as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                try:
                    columns.setdefault(k, []).append(float(v))
                except (TypeError, ValueError):
                    columns.setdefault(k, []).append(float('nan'))
    return columns


def plot_training_curves(summary_csv: str, out_png: str) -> str:
    """Write ``out_png`` (replaced atomically so a viewer never sees half a file) and return its path."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cols = _read_summary(summary_csv)
    epochs = cols.get('epoch', [])
    panels = [
        ('Loss', [('train_loss', 'train'), ('eval_loss', 'val')]),
        ('Top-1 accuracy (%)', [('eval_top1', 'val')]),
        ('Macro F1', [('eval_f1', 'val')]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            if key in cols:
                ax.plot(epochs, cols[key], marker='o', markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    tmp = out_png + '.partial.png'
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
