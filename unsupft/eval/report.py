"""The evaluation report: `report.json`, two pictures and a one-page `report.html`.

A person compares models by looking, so besides the numbers the report draws
- `feature_map.png`: the test features of each model in 2-D (t-SNE; PCA for tiny sets), coloured
  by class, one panel per model;
- `fewshot_curves.png`: few-shot top-1 accuracy against labels per class, every model on one plot,
  with the spread over trials as error bars;
and `report.html` shows the table and both pictures (embedded, so the file works on its own).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from unsupft import store

FEATURE_MAP = "feature_map.png"
CURVES = "fewshot_curves.png"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
# t-SNE is quadratic-ish and the picture gains nothing from more points.
MAX_MAP_POINTS = 2000
# Below this, t-SNE's perplexity has too few neighbours to be meaningful: use PCA.
MIN_TSNE_POINTS = 60

# (report key, column title) of the per-model scalar metrics, in table order.
SCALAR_COLUMNS = [
    ("retrieval_top5", "retrieval top-5"),
    ("cluster_bcubed_precision", "clustering BCubed P"),
    ("sdbw", "S_Dbw (lower better)"),
    ("linear_top1", "linear probe top-1"),
]


def embed_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D coordinates [N, 2] of `features` for the feature map (t-SNE, or PCA when N is tiny)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    if len(x) < MIN_TSNE_POINTS:
        return PCA(n_components=2, random_state=seed).fit_transform(x) if len(x) > 2 else np.zeros((len(x), 2))
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def subsample(n: int, seed: int = 0) -> np.ndarray:
    """Indices of at most MAX_MAP_POINTS of n items (all of them when fewer), seeded."""
    if n <= MAX_MAP_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_MAP_POINTS, replace=False))


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def feature_map_png(maps: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]) -> bytes:
    """One scatter panel per model: `maps[name] = (coords [N, 2], labels [N])`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 4.4), squeeze=False)
    for ax, (name, (coords, labels)) in zip(axes[0], maps.items()):
        for c in np.unique(labels):
            pts = coords[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(int(c) % cmap.N), label=classes[int(c)])
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", markerscale=2.5, fontsize=8, title="class")
    fig.suptitle("test features (2-D map), coloured by class")
    fig.subplots_adjust(right=0.88)
    data = _figure_png(fig)
    plt.close(fig)
    return data


def curves_png(models: dict[str, dict[str, Any]]) -> bytes:
    """Few-shot top-1 (mean +- std over trials) against labels per class, all models on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    all_shots: set[int] = set()
    for name, result in models.items():
        fewshot = result.get("fewshot") or {}
        shots = sorted(fewshot, key=int)
        if not shots:
            continue
        means = [fewshot[k]["top1_mean"] for k in shots]
        stds = [fewshot[k]["top1_std"] for k in shots]
        all_shots.update(int(k) for k in shots)
        ax.errorbar([int(k) for k in shots], means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_shots), [str(k) for k in sorted(all_shots)])
    ax.minorticks_off()
    ax.set_xlabel("labeled images per class")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("few-shot transfer")
    data = _figure_png(fig)
    plt.close(fig)
    return data


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def render_html(report: dict[str, Any], pictures: dict[str, bytes]) -> str:
    """The one-page report: a table of every metric per model and the pictures (inline PNGs)."""
    models = report["models"]
    shots = sorted({k for r in models.values() for k in (r.get("fewshot") or {})}, key=int)
    head = ["model"] + [f"{k}-shot top-1" for k in shots] + [f"{k}-shot mean-class" for k in shots]
    head += [title for key, title in SCALAR_COLUMNS]
    rows = []
    for name, r in models.items():
        fs = r.get("fewshot") or {}
        cells = [html.escape(name)]
        cells += [f"{_fmt(fs[k]['top1_mean'])} ± {_fmt(fs[k]['top1_std'])}" if k in fs else "–" for k in shots]
        cells += [f"{_fmt(fs[k]['mean_class_mean'])} ± {_fmt(fs[k]['mean_class_std'])}" if k in fs else "–" for k in shots]
        cells += [_fmt(r.get(key)) for key, _ in SCALAR_COLUMNS]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, data in pictures.items()
    )
    inputs = html.escape(", ".join(f"{k}={v}" for k, v in report.get("inputs", {}).items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>unsupft evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
th{{background:#eee}}img{{max-width:100%}}figure{{display:inline-block;margin:1em 1em 0 0}}
.small{{color:#666;font-size:90%}}</style></head><body>
<h1>unsupft evaluation</h1>
<p class="small">{inputs}<br>few-shot method: {html.escape(str(report.get("config", {}).get("method", "")))};
trials per K: {html.escape(str(report.get("config", {}).get("trials", "")))} (mean ± std)</p>
<table><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr>{"".join(rows)}</table>
{images}
</body></html>
"""


def write_report(
    out: str,
    report: dict[str, Any],
    maps: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
) -> list[str]:
    """Write report.json, the pictures that have data and report.html under `out`; returns their names."""
    pictures: dict[str, bytes] = {}
    if maps:
        pictures[FEATURE_MAP] = feature_map_png(maps, classes)
    if any(r.get("fewshot") for r in report["models"].values()):
        pictures[CURVES] = curves_png(report["models"])
    store.write_json(store.join(out, REPORT_JSON), report)
    for name, data in pictures.items():
        store.write_bytes(store.join(out, name), data)
    store.write_text(store.join(out, REPORT_HTML), render_html(report, pictures))
    return [REPORT_JSON, REPORT_HTML, *pictures]
