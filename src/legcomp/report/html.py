"""``report.html``: one self-contained quality-control page per study.

Everything is inside the one file (images as base64 PNG, plain inline JavaScript and CSS), so it
opens from disk in any browser, with no server and no network. It shows:

* the flags (:mod:`legcomp.report.flags`), each with its reason, and run.json's notes;
* every axial slice, chosen with a slider, at the image's native in-plane resolution (one image
  pixel per voxel, cropped to the legs): water, fat and the fat-fraction map F/(W+F) (perceptual
  colour map, colour bar 0-100 %), each with switchable stage-1 and stage-2 outlines, and a legend
  of the full structure names and colours from :mod:`legcomp.anatomy`;
* per leg and in total: volume, mean fat fraction, fat volume by the run's fat rule and
  partial-volume aware, network confidence and the row's flags;
* provenance from run.json: legcomp version, weights and their hashes, region and how it was
  decided, fat rule, timings (and the full run.json, folded).

Arrays are canonical (x, y, z) RAS+ as in :class:`legcomp.io.DixonStudy`; slices are drawn in
radiological view (subject's right on the image's left, anterior up), as in ``overlay.png``.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
import pandas as pd
from PIL import Image

from legcomp import anatomy
from legcomp.report import flags as qc
from legcomp.report.overlay import crop_box

FF_COLORMAP = "viridis"
"""Perceptually uniform colour map of the fat-fraction panel (0 % dark purple to 100 % yellow)."""

BODY_FRACTION = 0.1
"""Voxels with W+F below this fraction of its 99th percentile are background (black in the fat-fraction map)."""

PNG_COMPRESS_LEVEL = 3
"""zlib level of the embedded PNGs (3: nearly the size of 9 in a fraction of the time)."""

# --------------------------------------------------------------------------- images

def png_base64(image: np.ndarray) -> str:
    """Base64 PNG of a uint8 image (rows, columns) grey, or (rows, columns, 3 | 4) RGB(A)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def radiological(slice_xy: np.ndarray) -> np.ndarray:
    """An axial slice (x, y, ...) as displayed image rows and columns: anterior up, subject's right on the left."""
    return np.swapaxes(slice_xy, 0, 1)[::-1, ::-1]


def _percentile(a: np.ndarray, q: float) -> float:
    """``q``-th percentile of an array, from at most about 2 million evenly spaced voxels (fast on large images)."""
    return float(np.percentile(a.ravel()[:: max(1, a.size // 2_000_000)], q))


def grey_volume(image: np.ndarray) -> np.ndarray:
    """uint8 (x, y, z) of an image windowed from 0 to its 99.5th percentile (one window for all slices)."""
    img = np.asarray(image, np.float32)
    hi = _percentile(img, 99.5) or 1.0
    return (np.clip(img / hi, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colormap_lut(name: str = FF_COLORMAP) -> np.ndarray:
    """(256, 3) uint8 RGB lookup table of a matplotlib colour map."""
    return (matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def ff_volume(water: np.ndarray, fat: np.ndarray, name: str = FF_COLORMAP) -> np.ndarray:
    """uint8 RGB (x, y, z, 3) of the fat fraction F/(W+F) (0-1 over the colour map), background black."""
    from legcomp.quantification.fat import fat_fraction

    ff = fat_fraction(water, fat)
    total = np.asarray(water, np.float32) + np.asarray(fat, np.float32)
    body = total > BODY_FRACTION * (_percentile(total, 99) or 1.0)
    rgb = colormap_lut(name)[np.rint(ff * 255.0).astype(np.uint8)]
    rgb[~body] = 0
    return rgb


def outline_volume(labels: np.ndarray, stage: int, region: str) -> np.ndarray:
    """uint8 RGBA (x, y, z, 4): the in-plane border pixels of each label in its anatomy colour, transparent elsewhere.

    A border pixel is a labelled pixel with a 4-neighbour (same slice) of another label.
    """
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    for ax in (0, 1):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        diff = lab[tuple(lo)] != lab[tuple(hi)]
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    edge &= lab > 0
    lut = np.zeros((256, 4), np.uint8)
    for label in anatomy.stage_labels(stage, region):
        lut[label.id] = (*label.color, 255)
    rgba = lut[lab.astype(np.uint8)]
    rgba[~edge] = 0
    return rgba


def slice_layers(water: np.ndarray, fat: np.ndarray, stage1: np.ndarray, stage2: np.ndarray | None,
                 region: str) -> tuple[dict[str, list[str]], tuple[int, int]]:
    """Base64 PNGs of every slice per layer, cropped to the legs (all slices one box): ``water``, ``fat`` (grey),
    ``ff`` (RGB), outlines ``s1`` and ``s2`` (RGBA, transparent off the outlines; no ``s2`` without ``stage2``).

    Returns the layers and the displayed image size (rows, columns) in pixels, one pixel per voxel.
    """
    bx, by = crop_box(np.asarray(stage1) > 0)
    crop = (bx, by, slice(None))
    w, f = np.asarray(water)[crop], np.asarray(fat)[crop]
    vols = {"water": grey_volume(w), "fat": grey_volume(f), "ff": ff_volume(w, f),
            "s1": outline_volume(np.asarray(stage1)[crop], 1, region)}
    if stage2 is not None:
        vols["s2"] = outline_volume(np.asarray(stage2)[crop], 2, region)
    nz = w.shape[2]
    layers = {k: [png_base64(radiological(v[:, :, z])) for z in range(nz)] for k, v in vols.items()}
    rows, cols = radiological(w[:, :, 0]).shape
    return layers, (rows, cols)


def colorbar_base64(name: str = FF_COLORMAP) -> str:
    """Base64 PNG of a horizontal colour bar, fat fraction 0-100 %."""
    import matplotlib.pyplot as plt
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import Normalize

    fig = plt.figure(figsize=(3.4, 0.62), dpi=100)
    ax = fig.add_axes((0.04, 0.55, 0.92, 0.3))
    ColorbarBase(ax, cmap=matplotlib.colormaps[name], norm=Normalize(0, 100), orientation="horizontal",
                 ticks=[0, 25, 50, 75, 100])
    ax.tick_params(labelsize=8)
    ax.set_xticklabels([f"{t} %" for t in (0, 25, 50, 75, 100)])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- page content

def slice_captions(run: dict, nz: int) -> list[str]:
    """One caption per canonical slice (inferior to superior): input slice index, position (mm) and
    level from run.json's ``slice_coverage`` when present (with 'left out' for slices out of the volumes)."""
    cov = run.get("slice_coverage") or []
    if len(cov) != nz:
        return [f"slice {z}" for z in range(nz)]
    out = []
    for row in cov:
        text = f"slice {row.get('slice')}, z = {row.get('z_mm')} mm"
        if row.get("level"):
            text += f", {row['level']}"
        if row.get("in_volumes") is False:
            text += " (left out of the volumes)"
        out.append(text)
    return out


def legend(region: str, with_stage2: bool) -> list[dict]:
    """Legend groups: ``{"title", "items": [{"name", "color"}]}``: full names (with the abbreviation of the
    overlay figure) and colours from :mod:`legcomp.anatomy`."""
    def items(labels):
        return [{"name": lab.display if f"({lab.abbrev})" in lab.display else f"{lab.display} ({lab.abbrev})",
                 "color": "#%02x%02x%02x" % lab.color} for lab in labels]
    groups = [{"title": "Stage 1", "items": items(anatomy.STAGE1)}]
    if with_stage2:
        groups.append({"title": f"Stage 2 ({region} muscles)", "items": items(anatomy.MUSCLES[region])})
    return groups


def fmt_number(value: float, digits: int, scale: float = 1.0) -> str:
    """``value x scale`` with ``digits`` decimals; an en dash for NaN or None."""
    return "–" if value is None or not np.isfinite(value) else f"{value * scale:.{digits}f}"


def leg_tables(table: pd.DataFrame, region: str) -> list[dict]:
    """Per leg (left, right, total; a leg without whole muscle is left out): rows of the report's tables."""
    w = qc.wide(table)
    if w.empty:
        return []
    tags = qc.row_flags(table)
    colors = {lab.name: "#%02x%02x%02x" % lab.color for lab in (*anatomy.STAGE1, *anatomy.MUSCLES.get(region, ()))}
    order = [s for s in (*colors, *qc.FAT_MEASURES_NAMES) if s in set(w.index.get_level_values(0))]
    out = []
    for leg in ("left", "right", "total"):
        if leg != "total" and not (qc.cell(w, anatomy.WHOLE_MUSCLE.name, leg, "volume_ml") > 0):
            continue
        rows = []
        for s in order:
            val = {m: qc.cell(w, s, leg, m) for m in ("volume_ml", "mean_fat_fraction", "fat_volume_ml",
                                                       "pv_fat_volume_ml", "confidence")}
            rows.append({"name": qc.display_name(s, region), "color": colors.get(s), "fat": s in qc.FAT_MEASURES_NAMES,
                         "volume": fmt_number(val["volume_ml"], 1), "ff": fmt_number(val["mean_fat_fraction"], 1, 100.0),
                         "fat_seed": fmt_number(val["fat_volume_ml"], 1), "fat_pv": fmt_number(val["pv_fat_volume_ml"], 1),
                         "confidence": fmt_number(val["confidence"], 3), "flags": tags.get((s, leg), [])})
        out.append({"leg": leg, "title": leg.capitalize() if leg != "total" else "Total (both legs)", "rows": rows})
    return out


def provenance(run: dict) -> list[tuple[str, str]]:
    """(field, text) pairs of the provenance section, from run.json."""
    from legcomp.quantification.fat import describe_fat_rule

    items = [("legcomp version", str(run.get("legcomp_version", "?"))), ("study", str(run.get("study", ""))),
             ("source", str(run.get("source", ""))),
             ("region", f"{run.get('region', '?')} ({run.get('region_decided_by') or 'how: not recorded'})")]
    for stage, w in (run.get("weights") or {}).items():
        items.append((f"weights, {stage}", f"{w.get('file')} (SHA-256 {w.get('sha256_16')}…)"))
    for stage, t in (run.get("weights_trained_on") or {}).items():
        text = t.get("trained_on") if isinstance(t, dict) and "trained_on" in t else json.dumps(t)[:300]
        items.append((f"trained on, {stage}", str(text)))
    rule = run.get("fat_rule")
    if rule:
        try:
            items.append(("fat rule", f"{rule}: {describe_fat_rule(rule)}"))
        except Exception:  # noqa: BLE001 - an unknown rule in an old run.json is shown as it is
            items.append(("fat rule", str(rule)))
    secs = run.get("seconds") or {}
    if secs:
        items.append(("timings", ", ".join(f"{k} {v:.1f} s" for k, v in secs.items() if isinstance(v, (int, float)))))
    items += [("device", str(run.get("device", ""))),
              ("image", f"{' x '.join(str(n) for n in run.get('shape', []))} voxels of "
                        f"{' x '.join(f'{s:.3g}' for s in run.get('spacing_mm', []))} mm, "
                        f"orientation {run.get('orientation', '?')}"),
              ("contrasts derived", ", ".join(run.get("contrasts_derived") or []) or "none (all read)")]
    return items


# --------------------------------------------------------------------------- the page

ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .5em;border-bottom:1px solid #ccc}
.sub{color:#666;font-size:.9em}
.flags{list-style:none;padding:0;margin:.5em 0}
.flags li{background:#fff4e5;border-left:5px solid #e8a33d;margin:.3em 0;padding:.4em .7em}
.flags li.fat_water_swap,.flags li.low_confidence{background:#fdecea;border-color:#d9534f}
.flags li.ok{background:#eaf6ea;border-color:#5cb85c}
.notes{color:#555;font-size:.9em}
.controls{display:flex;flex-wrap:wrap;gap:1.2em;align-items:center;margin:.4em 0 .8em}
.controls input[type=range]{width:22em}
.panels{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0}figcaption{font-size:.85em;text-align:center;color:#444}
.stack{position:relative;background:#000}
.stack img{display:block;image-rendering:pixelated;image-rendering:crisp-edges}
.stack img.ov{position:absolute;left:0;top:0;width:100%;height:100%}
.hide-s1 img.ov.s1,.hide-s2 img.ov.s2{display:none}
.legend{display:flex;flex-wrap:wrap;gap:2em;margin:.8em 0;font-size:.85em}
.legend ul{list-style:none;padding:0;margin:.2em 0;columns:2}
.sw{display:inline-block;width:.9em;height:.9em;border:1px solid #555;vertical-align:middle;margin-right:.35em}
table{border-collapse:collapse;font-size:.85em;margin:.3em 0 1em;background:#fff}
th,td{border:1px solid #ddd;padding:.25em .55em}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fatrow td{background:#f7f7fb}tr.flagged td.tags{color:#b03a2e}
dl.prov{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;font-size:.88em}
dl.prov dt{font-weight:600}dl.prov dd{margin:0;word-break:break-all}
pre{font-size:.75em;background:#fff;border:1px solid #ddd;padding:.6em;overflow:auto;max-height:30em}
"""

STUDY_TEMPLATE = ENV.from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>legcomp report: {{ name }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{{ css }}</style></head>
<body>
<h1>{{ name }} <span class="sub">{{ region }}</span></h1>
<div class="sub">legcomp {{ version }} quality-control report · {{ n_slices }} slices · radiological view (subject's right on the image's left, anterior up)</div>

<h2 id="flags">Flags</h2>
<ul class="flags">
{% for f in flags %}
<li class="{{ f.kind }}"><b>{{ f.title }}</b>: {{ f.reason }}</li>
{% else %}
<li class="ok"><b>No flags</b>: nothing needs a second look by the checks of this report.</li>
{% endfor %}
</ul>
{% if notes %}<div class="notes">Notes from the run:<ul>{% for n in notes %}<li>{{ n }}</li>{% endfor %}</ul></div>{% endif %}

<h2 id="slices">Slices</h2>
<div class="controls">
<label>Slice <input type="range" id="slice" min="0" max="{{ n_slices - 1 }}" value="{{ start }}" step="1"></label>
<span id="slice-label">{{ captions[start] }}</span>
<label><input type="checkbox" id="show-s1" checked> stage-1 outlines</label>
{% if has_s2 %}<label><input type="checkbox" id="show-s2" checked> stage-2 outlines</label>{% endif %}
<label>Zoom <select id="zoom">{% for z in (1, 2, 3, 4) %}<option value="{{ z }}"{% if z == zoom %} selected{% endif %}>{{ z }}x</option>{% endfor %}</select></label>
</div>
<div class="panels" id="viewer" style="--zoom:{{ zoom }}">
{% for key, title in panels %}
<figure><div class="stack"><img class="base" data-layer="{{ key }}" alt="{{ title }}" width="{{ cols }}" height="{{ rows }}"
 style="width:calc(var(--zoom) * {{ width_px }}px);height:calc(var(--zoom) * {{ height_px }}px)" src="data:image/png;base64,{{ first[key] }}">
<img class="ov s1" data-layer="s1" alt="" src="data:image/png;base64,{{ first.s1 }}">
{% if has_s2 %}<img class="ov s2" data-layer="s2" alt="" src="data:image/png;base64,{{ first.s2 }}">{% endif %}
</div><figcaption>{{ title }}{% if key == 'ff' %}<br><img class="colorbar" alt="fat fraction colour bar, 0 to 100 %" src="data:image/png;base64,{{ colorbar }}">{% endif %}</figcaption></figure>
{% endfor %}
</div>
<div class="legend">
{% for g in legend %}
<div><b>{{ g.title }}</b><ul>{% for it in g['items'] %}<li><span class="sw" style="background:{{ it.color }}"></span>{{ it.name }}</li>{% endfor %}</ul></div>
{% endfor %}
</div>

<h2 id="volumes">Volumes and fat</h2>
<div class="sub">Fat by the fat rule <code>{{ fat_rule }}</code> (whole voxels) and partial-volume aware (sum of F/(W+F) x voxel volume); confidence: mean network probability of the chosen label over the structure (0-1).</div>
{% for t in tables %}
<h3>{{ t.title }}</h3>
<table class="volumes" data-leg="{{ t.leg }}">
<thead><tr><th>Structure</th><th>Volume (mL)</th><th>Mean fat fraction (%)</th><th>Fat, {{ fat_rule }} rule (mL)</th><th>Fat, partial-volume (mL)</th><th>Confidence</th><th>Flags</th></tr></thead>
<tbody>
{% for r in t.rows %}
<tr{% if r.fat or r.flags %} class="{{ ['fatrow' if r.fat else '', 'flagged' if r.flags else ''] | select | join(' ') }}"{% endif %}><td>{% if r.color %}<span class="sw" style="background:{{ r.color }}"></span>{% endif %}{{ r.name }}</td>
<td class="num">{{ r.volume }}</td><td class="num">{{ r.ff }}</td><td class="num">{{ r.fat_seed }}</td><td class="num">{{ r.fat_pv }}</td><td class="num">{{ r.confidence }}</td><td class="tags">{{ r.flags | join(', ') }}</td></tr>
{% endfor %}
</tbody></table>
{% endfor %}

<h2 id="provenance">Provenance</h2>
<dl class="prov">
{% for k, v in provenance %}<dt>{{ k }}</dt><dd>{{ v }}</dd>
{% endfor %}
</dl>
<details><summary>run.json</summary><pre>{{ run_json }}</pre></details>

<script type="application/json" id="slice-data">{{ data | safe }}</script>
<script>
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("slice-data").textContent);
  var slider = document.getElementById("slice"), label = document.getElementById("slice-label");
  var viewer = document.getElementById("viewer");
  function show(k) {
    var imgs = viewer.querySelectorAll("img[data-layer]");
    for (var i = 0; i < imgs.length; i++) {
      var layer = imgs[i].getAttribute("data-layer");
      if (D.layers[layer]) { imgs[i].src = "data:image/png;base64," + D.layers[layer][k]; }
    }
    label.textContent = D.captions[k];
  }
  slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
  ["s1", "s2"].forEach(function (s) {
    var box = document.getElementById("show-" + s);
    if (box) { box.addEventListener("change", function () { viewer.classList.toggle("hide-" + s, !box.checked); }); }
  });
  document.getElementById("zoom").addEventListener("change", function (e) { viewer.style.setProperty("--zoom", e.target.value); });
  document.addEventListener("keydown", function (e) {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") { return; }
    var d = {ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1}[e.key];
    if (d) { slider.value = Math.min(Math.max(parseInt(slider.value, 10) + d, 0), D.captions.length - 1); show(parseInt(slider.value, 10)); e.preventDefault(); }
  });
})();
</script>
</body></html>
""")


def _script_json(obj: object) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` to end it early)."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def render_study_report(study, stage1: np.ndarray, stage2: np.ndarray | None, region: str, table: pd.DataFrame,
                        run: dict, flags: list[qc.Flag] | None = None) -> str:
    """The report page of one study as HTML text.

    Args:
        study: the :class:`legcomp.io.DixonStudy` (canonical water and fat, spacing).
        stage1, stage2: label maps (x, y, z) on the study's grid; ``stage2`` None or empty: no muscle outlines.
        region: ``thigh`` or ``calf``.
        table: the tidy quantification table (``volumes.csv``).
        run: run.json's content (provenance, notes, ``slice_coverage``, ``hip``, ``fat_water_swap``...).
        flags: the study's flags (default :func:`legcomp.report.flags.study_flags`).
    """
    has_s2 = stage2 is not None and bool(np.any(stage2))
    layers, (rows, cols) = slice_layers(study.water, study.fat, stage1, stage2 if has_s2 else None, region)
    nz = len(layers["water"])
    sx, sy = float(study.spacing[0]), float(study.spacing[1])
    # displayed columns run along x, rows along y; one image pixel per voxel of the finer axis
    width_px, height_px = round(cols * sx / min(sx, sy)), round(rows * sy / min(sx, sy))
    zoom = 3 if width_px <= 200 else 2 if width_px <= 400 else 1
    levels = np.flatnonzero(np.asarray(stage1).any(axis=(0, 1)))
    start = int(levels[len(levels) // 2]) if len(levels) else nz // 2
    captions = slice_captions(run, nz)
    flags = qc.study_flags(table, run) if flags is None else flags
    run_shown = {k: v for k, v in run.items() if k != "slice_coverage"}
    return STUDY_TEMPLATE.render(
        css=CSS, name=run.get("study") or study.name, region=region, version=run.get("legcomp_version", ""),
        n_slices=nz, start=start, captions=captions, has_s2=has_s2, zoom=zoom, rows=rows, cols=cols,
        width_px=width_px, height_px=height_px,
        panels=[("water", "Water"), ("fat", "Fat"), ("ff", "Fat fraction F/(W+F)")],
        first={k: v[start] for k, v in layers.items()}, colorbar=colorbar_base64(),
        legend=legend(region, has_s2), flags=flags, notes=run.get("notes") or [],
        tables=leg_tables(table, region),
        fat_rule=str(run.get("fat_rule") or ""), provenance=provenance(run),
        run_json=json.dumps(run_shown, indent=2, default=str),
        data=_script_json({"layers": layers, "captions": captions}))


def write_study_report(path: str | Path, study, stage1: np.ndarray, stage2: np.ndarray | None, region: str,
                       table: pd.DataFrame, run: dict, flags: list[qc.Flag] | None = None) -> Path:
    """Write ``report.html`` (see :func:`render_study_report`); returns its path."""
    path = Path(path)
    path.write_text(render_study_report(study, stage1, stage2, region, table, run, flags), encoding="utf-8")
    return path
