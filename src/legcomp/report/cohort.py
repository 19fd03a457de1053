"""``index.html`` of a cohort: one self-contained page beside ``cohort_volumes.csv``.

One row per study with its flags (:func:`legcomp.report.flags.study_flags`, the same as in its
report) and a link to its ``report.html``; the studies that failed, with their reason; and per
region the plots a reviewer expects: per structure, volume and mean fat fraction across the
cohort (each study a point per leg, outliers beyond Tukey's fences marked and named), and left
against right (each study and structure a point; beyond the asymmetry ratio marked). Plots are
matplotlib PNGs embedded as base64; the page needs no server and no network.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from legcomp import __version__, anatomy  # noqa: E402
from legcomp.report import flags as qc  # noqa: E402
from legcomp.report.html import CSS, ENV, fmt_number  # noqa: E402

TUKEY_K = 1.5
"""Outliers lie more than this many interquartile ranges below the first or above the third quartile."""

MIN_FOR_OUTLIERS = 4
"""Fewer studies than this: no outliers are marked (quartiles of three points mean little)."""

MEASURES: dict[str, tuple[str, float]] = {"volume_ml": ("volume (mL)", 1.0),
                                          "mean_fat_fraction": ("mean fat fraction (%)", 100.0)}
"""Plotted measures: axis label and scale from the table's unit."""


def tukey_outliers(values: np.ndarray, k: float = TUKEY_K) -> np.ndarray:
    """Boolean mask of the values beyond Tukey's fences (Q1 - k IQR, Q3 + k IQR); none when fewer than
    :data:`MIN_FOR_OUTLIERS` values are finite. NaN is never an outlier."""
    v = np.asarray(values, float)
    ok = np.isfinite(v)
    out = np.zeros(v.shape, bool)
    if ok.sum() < MIN_FOR_OUTLIERS:
        return out
    q1, q3 = np.percentile(v[ok], [25, 75])
    iqr = q3 - q1
    out[ok] = (v[ok] < q1 - k * iqr) | (v[ok] > q3 + k * iqr)
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _structures(region: str, present: set[str]) -> list:
    return [lab for lab in (*anatomy.STAGE1, *anatomy.MUSCLES[region]) if lab.name in present]


def strip_plots(table: pd.DataFrame, region: str, measure: str) -> str:
    """Base64 PNG: one panel per structure, each study a point per leg (left, right), outliers in red and named."""
    t = table[(table.region == region) & (table.measure == measure) & table.leg.isin(["left", "right"])]
    labels = _structures(region, set(t.structure))
    ncol = 5
    nrow = max(1, -(-len(labels) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.3 * ncol, 2.1 * nrow), squeeze=False)
    name, scale = MEASURES[measure]
    rng = np.random.default_rng(0)
    for ax, lab in zip(axes.ravel(), labels):
        for x, leg in enumerate(("left", "right")):
            d = t[(t.structure == lab.name) & (t.leg == leg)]
            v = d.value.to_numpy(float) * scale
            jit = x + rng.uniform(-0.15, 0.15, len(v))
            out = tukey_outliers(v)
            ax.scatter(jit[~out], v[~out], s=14, color=np.array(lab.color) / 255, edgecolor="k", linewidth=0.4)
            ax.scatter(jit[out], v[out], s=30, color="none", edgecolor="red", linewidth=1.4)
            for xi, vi, subj in zip(jit[out], v[out], d.subject.to_numpy()[out]):
                ax.annotate(str(subj), (xi, vi), fontsize=6, color="red", xytext=(3, 2), textcoords="offset points")
        ax.set_xticks([0, 1], ["left", "right"], fontsize=7)
        ax.set_xlim(-0.6, 1.6)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(lab.display, fontsize=7.5)
    for ax in axes.ravel()[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"{region}: {name} per structure (each study a point; red ring: outlier beyond Tukey's fences)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _png(fig)


def left_right_plot(table: pd.DataFrame, region: str) -> str:
    """Base64 PNG: left against right per study and structure, volume (log axes) and mean fat fraction;
    points beyond :data:`legcomp.report.flags.ASYMMETRY_RATIO` ringed in red."""
    t = table[(table.region == region) & table.leg.isin(["left", "right"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    labels = _structures(region, set(t.structure))
    for ax, measure in zip(axes, MEASURES):
        name, scale = MEASURES[measure]
        w = t[t.measure == measure].pivot_table(index=["subject", "structure"], columns="leg", values="value")
        if not {"left", "right"} <= set(w.columns):
            ax.axis("off")
            continue
        lo, hi = np.inf, -np.inf
        for lab in labels:
            if lab.name not in w.index.get_level_values(1):
                continue
            d = w.xs(lab.name, level="structure")
            x, y = d["left"].to_numpy(float) * scale, d["right"].to_numpy(float) * scale
            ok = np.isfinite(x) & np.isfinite(y) & ((x > 0) & (y > 0) if measure == "volume_ml" else True)
            x, y = x[ok], y[ok]
            ax.scatter(x, y, s=16, color=np.array(lab.color) / 255, edgecolor="k", linewidth=0.4, label=lab.display)
            if measure == "volume_ml":
                far = (np.maximum(x, y) / np.minimum(x, y) > qc.ASYMMETRY_RATIO) & (np.maximum(x, y) >= qc.ASYMMETRY_MIN_ML)
                ax.scatter(x[far], y[far], s=40, color="none", edgecolor="red", linewidth=1.3)
            if len(x):
                lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=0.8, zorder=0)
            if measure == "volume_ml":  # only positive volumes are plotted
                ax.set_xscale("log")
                ax.set_yscale("log")
        ax.set_xlabel(f"left {name}", fontsize=8)
        ax.set_ylabel(f"right {name}", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(f"{region}: left against right (grey: identity; red ring: volume ratio above "
                 f"{qc.ASYMMETRY_RATIO:.2f})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    return _png(fig)


def study_row(folder: Path, out: Path) -> dict | None:
    """One study of the index from its output folder (run.json, volumes.csv); None without them."""
    run_path, csv = folder / "run.json", folder / "volumes.csv"
    if not (run_path.is_file() and csv.is_file()):
        return None
    run = json.loads(run_path.read_text())
    table = pd.read_csv(csv)
    w = qc.wide(table)
    region = str(run.get("region", table["region"].iloc[0] if len(table) else ""))
    conf = table[(table.measure == "confidence") & table.leg.isin(["left", "right"])].value
    report = folder / "report.html"
    return {"name": str(run.get("study") or folder.name), "region": region,
            "link": os.path.relpath(report, out).replace(os.sep, "/") if report.is_file() else None,
            "muscle_ml": qc.cell(w, anatomy.WHOLE_MUSCLE.name, "total", "volume_ml"),
            "sat_ml": qc.cell(w, anatomy.SAT.name, "total", "volume_ml"),
            "muscle_ff": qc.cell(w, anatomy.WHOLE_MUSCLE.name, "total", "mean_fat_fraction"),
            "min_confidence": float(conf.min()) if len(conf) else float("nan"),
            "flags": qc.study_flags(table, run), "table": table}


INDEX_TEMPLATE = ENV.from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>legcomp cohort: {{ title }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{{ css }}
.badge{display:inline-block;background:#fff4e5;border:1px solid #e8a33d;border-radius:3px;padding:0 .35em;margin:.1em;font-size:.9em;cursor:help}
.badge.fat_water_swap,.badge.low_confidence{background:#fdecea;border-color:#d9534f}
img.plot{max-width:100%;border:1px solid #ddd;background:#fff;margin:.4em 0}
</style></head>
<body>
<h1>{{ title }}</h1>
<div class="sub">legcomp {{ version }} cohort index · {{ rows | length }} studies done, {{ failures | length }} failed ·
<a href="cohort_volumes.csv">cohort_volumes.csv</a>{% if failures %} · <a href="failures.csv">failures.csv</a>{% endif %}</div>

<h2 id="studies">Studies</h2>
<table class="studies">
<thead><tr><th>Study</th><th>Region</th><th>Whole muscle (mL)</th><th>SAT (mL)</th><th>Muscle fat fraction (%)</th><th>Lowest confidence</th><th>Flags</th></tr></thead>
<tbody>
{% for r in rows %}
<tr><td>{% if r.link %}<a href="{{ r.link }}">{{ r.name }}</a>{% else %}{{ r.name }}{% endif %}</td><td>{{ r.region }}</td>
<td class="num">{{ fmt(r.muscle_ml, 1) }}</td><td class="num">{{ fmt(r.sat_ml, 1) }}</td><td class="num">{{ fmt(r.muscle_ff, 1, 100) }}</td><td class="num">{{ fmt(r.min_confidence, 3) }}</td>
<td>{% for f in r.flags %}<span class="badge {{ f.kind }}" title="{{ f.reason }}">{{ f.title }}</span>{% else %}–{% endfor %}</td></tr>
{% endfor %}
</tbody></table>

{% if failures %}
<h2 id="failures">Failed studies</h2>
<table class="failures"><thead><tr><th>Study</th><th>Reason</th></tr></thead><tbody>
{% for f in failures %}<tr><td>{{ f.study }}</td><td>{{ f.error }}</td></tr>
{% endfor %}
</tbody></table>
{% endif %}

{% for p in plots %}
<h2 id="plots-{{ p.region }}">{{ p.region | capitalize }}: distributions across the cohort</h2>
{% for title, png in p.images %}<figure><img class="plot" alt="{{ title }}" src="data:image/png;base64,{{ png }}"><figcaption>{{ title }}</figcaption></figure>
{% endfor %}
{% endfor %}
</body></html>
""")


def write_cohort_index(out: str | Path, study_dirs: list[Path], failures: list[dict] | None = None,
                       title: str | None = None) -> Path:
    """Write ``out/index.html`` for the studies in ``study_dirs`` (those with run.json and volumes.csv) and
    the ``failures`` (``{"study", "error"}``, as in ``failures.csv``). Returns its path."""
    out = Path(out)
    rows = [r for r in (study_row(Path(d), out) for d in study_dirs) if r is not None]
    rows.sort(key=lambda r: r["name"])
    plots = []
    if rows:
        table = pd.concat([r["table"] for r in rows], ignore_index=True)
        for region in sorted({r["region"] for r in rows if r["region"] in anatomy.REGIONS}):
            images = [(f"{MEASURES[m][0].capitalize()} per structure", strip_plots(table, region, m)) for m in MEASURES]
            images.append(("Left against right", left_right_plot(table, region)))
            plots.append({"region": region, "images": images})
    html = INDEX_TEMPLATE.render(css=CSS, title=title or out.resolve().name, version=__version__, rows=rows,
                                 failures=failures or [], plots=plots, fmt=fmt_number)
    path = out / "index.html"
    path.write_text(html, encoding="utf-8")
    return path
