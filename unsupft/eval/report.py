"""The evaluation report: `report.json`, its pictures and a one-page `report.html`.

The page answers "how good is my model" in sections, each a function here:
- `card_html`: per model, what it is (architecture, input size, what was loaded) and where it came
  from: its init chain with each stage's training length, data sizes and unsupft version
  (`unsupft.eval.cards`);
- `table_html`: every metric per model, the best value of each column marked, and with a baseline
  (`evaluate --baseline NAME`) each model's difference against it (`differences`);
- `confusion_html`: for models with their own classifier (transfer/label outputs), its confusion
  matrix on the test set with each class's count and accuracy;
- pictures: `feature_map.png`, the test features of each model in 2-D (t-SNE; PCA for tiny sets,
  and the page says which), coloured by class; `fewshot_curves.png`, few-shot top-1 against labels
  per class with the spread over trials; `label_curves.png`, a label stage's test top-1 per round
  against the labels spent (`evaluate --label NAME=URI`), with the points as a table beside it.
Pictures are embedded, so the file works on its own.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from unsupft import store

FEATURE_MAP = "feature_map.png"
CURVES = "fewshot_curves.png"
LABEL_CURVES = "label_curves.png"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
# t-SNE is quadratic-ish and the picture gains nothing from more points.
MAX_MAP_POINTS = 2000
# Below this, t-SNE's perplexity has too few neighbours to be meaningful: use PCA.
MIN_TSNE_POINTS = 60


@dataclass(frozen=True)
class Column:
    """One metric column of the table: where its value sits in a model's result and which way is better."""

    key: str
    title: str
    value: Callable[[dict[str, Any]], float | None]
    higher_is_better: bool = True


def _at(*path: str) -> Callable[[dict[str, Any]], float | None]:
    """Reads the value at `path` in a model's result (None when a level is missing)."""
    def value(result: dict[str, Any]) -> float | None:
        for key in path[:-1]:
            result = result.get(key) or {}
        return result.get(path[-1])
    return value


# (result key, column title, higher is better) of the per-model scalar metrics, in table order.
SCALAR_COLUMNS = [
    ("retrieval_top5", "retrieval top-5", True),
    ("cluster_bcubed_precision", "clustering BCubed P", True),
    ("cluster_bcubed_recall", "clustering BCubed R", True),
    ("cluster_bcubed_f", "clustering BCubed F", True),
    ("sdbw", "S_Dbw (lower better)", False),
    ("linear_top1", "linear probe top-1", True),
]


def columns(models: dict[str, dict[str, Any]]) -> list[Column]:
    """The table's columns that at least one model has a value for."""
    shots = sorted({k for r in models.values() for k in (r.get("fewshot") or {})}, key=int)
    every = [Column("classifier_top1", "own classifier top-1", _at("classifier", "top1")),
             Column("classifier_mean_class", "own classifier mean-class", _at("classifier", "mean_class"))]
    every += [Column(f"fewshot_{k}_top1", f"{k}-shot top-1", _at("fewshot", k, "top1_mean")) for k in shots]
    every += [Column(f"fewshot_{k}_mean_class", f"{k}-shot mean-class", _at("fewshot", k, "mean_class_mean"))
              for k in shots]
    every += [Column(key, title, _at(key), higher) for key, title, higher in SCALAR_COLUMNS]
    return [c for c in every if any(c.value(r) is not None for r in models.values())]


def best_per_column(models: dict[str, dict[str, Any]], table: list[Column]) -> dict[str, list[str]]:
    """The model(s) with the best value of each column (ties all marked)."""
    best: dict[str, list[str]] = {}
    for column in table:
        values = {name: column.value(r) for name, r in models.items() if column.value(r) is not None}
        top = max(values.values()) if column.higher_is_better else min(values.values())
        best[column.key] = [name for name, v in values.items() if v == top]
    return best


def differences(models: dict[str, dict[str, Any]], table: list[Column], baseline: str) -> dict[str, dict[str, float]]:
    """Each model's value minus the baseline model's, per column both have."""
    base = models[baseline]
    shared = [c for c in table if c.value(base) is not None]
    return {name: {c.key: float(c.value(result) - c.value(base)) for c in shared if c.value(result) is not None}
            for name, result in models.items()}


def map_method(n: int) -> str:
    """The method that draws the feature map of n points (the page names it)."""
    return "t-SNE" if n >= MIN_TSNE_POINTS else "PCA"


def embed_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D coordinates [N, 2] of `features` for the feature map (`map_method`: t-SNE, or PCA when N is tiny)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    if map_method(len(x)) == "PCA":
        return PCA(n_components=2, random_state=seed).fit_transform(x) if len(x) > 2 else np.zeros((len(x), 2))
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def subsample(n: int, seed: int = 0) -> np.ndarray:
    """Indices of at most MAX_MAP_POINTS of n items (all of them when fewer), seeded."""
    if n <= MAX_MAP_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_MAP_POINTS, replace=False))


def _pyplot():
    """matplotlib's pyplot drawing off-screen (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_bytes(plt, fig, fmt: str = "png") -> bytes:
    """The figure as PNG (or `fmt`) bytes; the figure is closed (pyplot keeps every open one in memory)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def feature_map_png(maps: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], method: str) -> bytes:
    """One scatter panel per model: `maps[name] = (coords [N, 2], labels [N])`, drawn by `method`."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 4.4), squeeze=False)
    for ax, (name, (coords, labels)) in zip(axes[0], maps.items()):
        for c in np.unique(labels):
            pts = coords[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(int(c) % cmap.N), label=classes[int(c)])
        ax.set(title=name, xticks=[], yticks=[])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", markerscale=2.5, fontsize=8, title="class")
    fig.suptitle(f"test features, 2-D {method} map, coloured by class")
    fig.subplots_adjust(right=0.88)
    return figure_bytes(plt, fig)


def label_plot(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Finish a plot of lines: axis labels, grid, legend, title."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()


def curves_png(models: dict[str, dict[str, Any]]) -> bytes:
    """Few-shot top-1 (mean +- std over trials) against labels per class, all models on one plot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, result in models.items():
        fewshot = result.get("fewshot") or {}
        shots = sorted(fewshot, key=int)
        if shots:
            ax.errorbar([int(k) for k in shots], [fewshot[k]["top1_mean"] for k in shots],
                        yerr=[fewshot[k]["top1_std"] for k in shots], marker="o", capsize=3, label=name)
    all_shots = sorted({int(k) for r in models.values() for k in (r.get("fewshot") or {})})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_shots, [str(k) for k in all_shots])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    label_plot(ax, "labeled images per class", "top-1 accuracy", "few-shot transfer")
    return figure_bytes(plt, fig)


def label_curves_png(curves: dict[str, list[dict[str, Any]]]) -> bytes:
    """Test top-1 after each label round against the labels spent so far, one line per label run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    spent: set[int] = set()
    for name, rounds in curves.items():
        ax.plot([r["labels"] for r in rounds], [r["test_top1"] for r in rounds], marker="o", label=name)
        spent.update(r["labels"] for r in rounds)
    ax.set(xticks=sorted(spent), ylim=(0, 1))
    label_plot(ax, "labels spent (all rounds so far)", "test top-1 accuracy",
               "progressive labeling: accuracy per round")
    return figure_bytes(plt, fig)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def _esc(value: Any) -> str:
    return html.escape(str(value))


def card_html(name: str, card: dict[str, Any]) -> str:
    """A model's card: what it is and the chain of stages (newest first) that made it."""
    size = card.get("image_size")
    shape = f"{card.get('in_channels')} channel(s), {'x'.join(map(str, size))} input" if size else \
        f"{card.get('in_channels')} channel(s)"
    links = []
    for link in card.get("chain", []):
        settings = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in link.items()
                             if k not in ("stage", "uri", "data", "unsupft"))
        data = ", ".join(f"{k} {v} images" for k, v in (link.get("data") or {}).items())
        parts = [p for p in (settings, f"data: {data}" if data else "") if p]
        links.append(f'<li><b>{_esc(link["stage"])}</b> {_esc("; ".join(parts))} '
                     f'<span class="uri">{_esc(link["uri"])}</span></li>')
    return (f'<div class="card" data-model="{_esc(name)}"><h3>{_esc(name)}</h3><dl>'
            f"<dt>architecture</dt><dd>{_esc(card.get('architecture'))}, {_esc(shape)}</dd>"
            f"<dt>loaded</dt><dd>{_esc(card.get('loaded'))}</dd>"
            f"<dt>unsupft</dt><dd>{_esc(card.get('unsupft') or 'unknown (no manifest)')}</dd></dl>"
            f'<p>init chain, newest first:</p><ol class="chain">{"".join(links)}</ol></div>')


def table_html(report: dict[str, Any]) -> str:
    """Every metric per model; the best of each column bold, differences against the baseline beside."""
    models, best = report["models"], report["best"]
    diffs = report.get("differences") or {}
    table = columns(models)
    head = "<th>model</th>" + "".join(f"<th>{_esc(c.title)}</th>" for c in table)
    rows = []
    for name, result in models.items():
        cells = [f'<td class="name">{_esc(name)}</td>']
        for c in table:
            value = c.value(result)
            text = _fmt(value)
            if c.key.startswith("fewshot_") and value is not None:  # the spread over trials
                shots, kind = c.key.split("_")[1], "top1" if c.key.endswith("top1") else "mean_class"
                text += f" ± {_fmt(result['fewshot'][shots][f'{kind}_std'])}"
            if c.key in diffs.get(name, {}) and name != report.get("baseline"):
                text += f' <span class="diff">({diffs[name][c.key]:+.3f})</span>'
            marked = name in best.get(c.key, [])
            cells.append(f'<td data-column="{c.key}"{" class=best" if marked else ""}>'
                         f'{"<strong>" + text + "</strong>" if marked else text}</td>')
        rows.append(f'<tr data-model="{_esc(name)}">{"".join(cells)}</tr>')
    return f'<table id="metrics"><tr>{head}</tr>{"".join(rows)}</table>'


def confusion_html(name: str, score: dict[str, Any]) -> str:
    """A classifier's confusion matrix (rows: true class, columns: predicted) with each class's
    test count and accuracy; cells shaded by their share of the row."""
    classes, confusion = score["classes"], np.asarray(score["confusion"])
    head = "".join(f"<th>{_esc(c)}</th>" for c in classes)
    rows = []
    for i, true in enumerate(classes):
        total = int(confusion[i].sum())
        cells = "".join(
            f'<td class="n" style="background:rgba(31,119,180,{(n / total if total else 0):.2f})">{int(n)}</td>'
            for n in confusion[i])
        accuracy = _fmt(score["per_class"].get(true))  # none for a class without test images
        rows.append(f'<tr data-class="{_esc(true)}"><th>{_esc(true)}</th>{cells}'
                    f'<td class="count">{total}</td><td class="accuracy">{accuracy}</td></tr>')
    return (f'<figure class="confusion-block"><table class="confusion" data-model="{_esc(name)}">'
            f"<tr><th>true ↓ predicted →</th>{head}<th>count</th><th>accuracy</th></tr>{''.join(rows)}</table>"
            f"<figcaption>{_esc(name)}: top-1 {_fmt(score['top1'])}, mean-class {_fmt(score['mean_class'])} "
            f"on {score['test_samples']} test images</figcaption></figure>")


def label_rounds_html(name: str, rounds: list[dict[str, Any]]) -> str:
    """The points of a label run's curve as a table (round, labels spent, test top-1)."""
    rows = "".join(f"<tr><td>{r['round']}</td><td>{r['labels']}</td><td>{_fmt(r['test_top1'])}</td></tr>"
                   for r in rounds)
    return (f'<table class="label-rounds" data-run="{_esc(name)}"><caption>{_esc(name)}</caption>'
            f"<tr><th>round</th><th>labels</th><th>test top-1</th></tr>{rows}</table>")


def _picture(name: str, data: bytes, caption: str) -> str:
    return (f'<figure><img alt="{_esc(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def render_html(report: dict[str, Any], pictures: dict[str, bytes]) -> str:
    """The one-page report: cards, the metric table, confusion matrices, label curves, pictures."""
    models, config = report["models"], report.get("config", {})
    cards = "".join(card_html(name, card) for name, card in (report.get("cards") or {}).items())
    baseline = report.get("baseline")
    note = "bold: the best value of each column"
    if baseline:
        note += f"; (±x): difference against the baseline model {_esc(baseline)}"
    sections = [f'<h2>Models</h2><div class="cards">{cards}</div>',
                f'<h2>Metrics</h2><p class="small">{note}</p>{table_html(report)}']
    scored = {name: r["classifier"] for name, r in models.items() if r.get("classifier")}
    if scored:
        sections.append('<h2 id="classifiers">Own classifiers on the test set</h2>'
                        + "".join(confusion_html(name, score) for name, score in scored.items()))
    if LABEL_CURVES in pictures:
        sections.append('<h2 id="labeling">Progressive labeling</h2>'
                        + _picture(LABEL_CURVES, pictures[LABEL_CURVES], "test top-1 after each round")
                        + "".join(label_rounds_html(n, r) for n, r in report["label_curves"].items()))
    if FEATURE_MAP in pictures:
        method = report.get("map_method", "t-SNE")
        sections.append(f'<h2 id="map">Feature map ({_esc(method)})</h2>'
                        + _picture(FEATURE_MAP, pictures[FEATURE_MAP],
                                   f"test features of each model, embedded in 2-D by {method}, coloured by class"))
    if CURVES in pictures:
        sections.append('<h2 id="fewshot">Few-shot transfer</h2>'
                        + _picture(CURVES, pictures[CURVES], "top-1 against labeled images per class (mean ± std)"))
    inputs = _esc(", ".join(f"{k}={v}" for k, v in report.get("inputs", {}).items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>unsupft evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin:0.5em 1em 0.5em 0}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}td.name{{text-align:left}}
th{{background:#eee}}img{{max-width:100%}}figure{{display:inline-block;margin:1em 1em 0 0;vertical-align:top}}
td.best{{background:#e3f4e1}}.diff{{color:#555;font-size:85%}}.small{{color:#666;font-size:90%}}
.cards{{display:flex;flex-wrap:wrap;gap:1em}}.card{{border:1px solid #ccc;border-radius:6px;padding:0.5em 1em;
max-width:440px}}.card h3{{margin:0.2em 0}}.card dl{{display:grid;grid-template-columns:auto 1fr;gap:2px 8px;margin:0}}
.card dt{{color:#666}}.card dd{{margin:0}}.chain{{margin:0;padding-left:1.4em;font-size:90%}}
.uri{{color:#888;font-size:85%;word-break:break-all}}table.label-rounds{{display:inline-table;vertical-align:top}}</style>
</head><body>
<h1>unsupft evaluation</h1>
<p class="small">{inputs}<br>few-shot method: {_esc(config.get("method", ""))};
trials per K: {_esc(config.get("trials", ""))} (mean ± std)</p>
{"".join(sections)}
</body></html>
"""


def write_report(out: str, report: dict[str, Any], maps: dict[str, tuple[np.ndarray, np.ndarray]],
                 classes: list[str]) -> list[str]:
    """Complete `report` (best per column, differences against `report["baseline"]`, the map method),
    then write report.json, the pictures that have data and report.html under `out`; returns their names."""
    models = report["models"]
    table = columns(models)
    report["best"] = best_per_column(models, table)
    if report.get("baseline"):
        report["differences"] = differences(models, table, report["baseline"])
    pictures: dict[str, bytes] = {}
    if maps:
        report["map_method"] = map_method(len(next(iter(maps.values()))[0]))
        pictures[FEATURE_MAP] = feature_map_png(maps, classes, report["map_method"])
    if any(r.get("fewshot") for r in models.values()):
        pictures[CURVES] = curves_png(models)
    if report.get("label_curves"):
        pictures[LABEL_CURVES] = label_curves_png(report["label_curves"])
    store.write_json(store.join(out, REPORT_JSON), report)
    for name, data in pictures.items():
        store.write_bytes(store.join(out, name), data)
    store.write_text(store.join(out, REPORT_HTML), render_html(report, pictures))
    return [REPORT_JSON, REPORT_HTML, *pictures]
