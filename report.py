"""The evaluation report: one self-contained HTML file (no server, no network, images embedded as thumbnails).

    python main.py --task evaluate      -> output/<model-name>/eval_report.html (eval_report_original_model.html)

VLM: headline metrics, per-field accuracy and macro F1 against the majority baseline, calibration (ECE, Brier,
reliability diagram), confusion matrices, and every validation image with truth, prediction and confidence,
errors first. LLM: headline metrics and every question with target and prediction, the differences marked.
Rendered by a Jinja2 template with autoescaping: every value from the data is escaped by construction, and the
results embedded for scripts go through `tojson` (<, >, & and ' as JSON escapes, safe inside <script>).
"""

from __future__ import annotations

import base64
import difflib
import io
import json
import time
from pathlib import Path

import jinja2

from config import Config
from outputs import atomic_write_text

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{background:#fff0f0}.ok{background:#f3fbf3}.muted{color:#777}mark{background:#ffd7d7}
ins{background:#d7f5d7;text-decoration:none}img.thumb{width:96px;height:auto;display:block}
.cm td{text-align:center;min-width:28px}.diag{background:#e3f0ff}code{font-size:12px}
"""

_TEMPLATE = """\
{%- macro cell(v) -%}
{% if v is numeric %}<td class="num">{{ v | fmt }}</td>{% else %}<td>{{ v }}</td>{% endif %}
{%- endmacro -%}
<!doctype html><html><head><meta charset='utf-8'><title>{{ title }}</title><style>{{ css | safe }}</style></head><body>
<h1>{{ title }}</h1>
<p class='muted'>{{ model }} · adapter {{ adapter }} · {{ when }}</p>
<h2>Headline</h2>
<table><tr><th>metric</th><th>value</th></tr>
{%- for key, value in headline %}<tr>{{ cell(key) }}{{ cell(value) }}</tr>{% endfor %}</table>
{% if fields %}
<h2>Fields</h2>
<table><tr><th>field</th><th>accuracy</th><th>majority baseline</th><th>macro F1</th><th>ECE</th><th>Brier</th>
<th>mean confidence</th></tr>
{%- for f in fields %}
<tr class="{{ 'ok' if f.accuracy > f.majority_baseline else 'bad' }}">{{ cell(f.name) }}{{ cell(f.accuracy) }}
{{- cell(f.majority_baseline) }}{{ cell(f.macro_f1) }}{{ cell(f.ece) }}{{ cell(f.brier) }}
{{- cell(f.mean_confidence) }}</tr>
{%- endfor %}</table>
<h2>Calibration</h2><p class='muted'>Confidence is the model's probability of the value it chose, normalised over
the values the field allows. On the diagonal, confidence equals accuracy.</p>
{% if reliability %}<img alt="{{ reliability.name }}" src="data:image/png;base64,{{ reliability.data }}">{% endif %}
<h2>Review thresholds</h2><p class='muted'>Answers whose confidence is at or above a field's threshold (and the
overall one's) are accepted without review; the threshold is the lowest at which the accepted validation answers
still reach the target accuracy {{ review_target }}. Few samples behind a threshold make it noisy: the last column
says how many.</p>
<table><tr><th>confidence</th><th>threshold</th><th>coverage</th><th>accuracy accepted</th><th>accepted / samples</th>
</tr>
{%- for name, t in review %}<tr class="{{ 'ok' if t.threshold is not none else 'bad' }}">{{ cell(name) }}
{%- if t.threshold is none %}<td colspan="2">target not reached: every answer goes to review</td><td>-</td>
{%- else %}{{ cell(t.threshold) }}{{ cell(t.coverage) }}{{ cell(t.accuracy) }}{% endif %}
<td class="num">{{ t.accepted }} / {{ t.n }}</td></tr>
{%- endfor %}</table>
{% if risk_coverage -%}
<img alt="{{ risk_coverage.name }}" src="data:image/png;base64,{{ risk_coverage.data }}">{% endif %}
<h2>Confusion matrices</h2><p class='muted'>Rows: truth; columns: prediction.</p>
{%- for f in fields %}
<h3>{{ f.name }}</h3><table class='cm'><tr><th></th>{% for lab in f.labels %}<th>{{ lab }}</th>{% endfor %}</tr>
{%- for lab, row in f.matrix %}<tr><th>{{ lab }}</th>
{%- for v, diag in row %}<td class="{{ 'diag' if diag else '' }}">{{ v }}</td>
{%- endfor %}</tr>{% endfor %}</table>
{%- endfor %}
<h2>Validation images ({{ images | length }}, errors first)</h2>
<table><tr><th>image</th><th>file</th>{% for f in fields %}<th>{{ f.name }}</th>{% endfor %}<th>confidence</th>
<th>review</th></tr>
{%- for r in images %}
<tr class="{{ 'bad' if r.wrong else '' }}"><td>
{%- if r.thumbnail %}<img class="thumb" alt="{{ r.name }}" src="data:image/jpeg;base64,{{ r.thumbnail }}">
{%- else %}<span class="muted">(image unavailable)</span>{% endif %}</td><td>{{ r.name }}</td>
{%- for c in r.cells %}<td>
{%- if c.invalid %}<span class='muted'>invalid</span>{% elif c.right %}{{ c.shown | fmt }}
{%- else %}<mark>{{ c.shown | fmt }}</mark>{% endif %}
{%- if c.confidence is not none %} <span class='muted'>({{ '%.2f' | format(c.confidence) }})</span>{% endif %}
{%- if not c.right %}<br><span class='muted'>truth: {{ c.truth | fmt }}</span>{% endif %}</td>
{%- endfor %}{{ cell(r.confidence) }}<td>{{ r.review }}</td></tr>
{%- endfor %}</table>
{% else %}
<h2>Validation samples ({{ samples | length }}, errors first)</h2>
<p class='muted'>In the target, <ins>green</ins> is what the prediction lacks; in the prediction, <mark>red</mark>
is what differs.</p>
<table><tr><th>question</th><th>target</th><th>prediction</th></tr>
{%- for s in samples %}
<tr class="{{ 'ok' if s.same else 'bad' }}"><td>{{ s.text }}</td><td>
{%- for op, t in s.target %}{% if op == 'equal' %}{{ t }}{% else %}<ins>{{ t }}</ins>{% endif %}{% endfor %}</td><td>
{%- for op, p in s.prediction %}{% if op == 'equal' %}{{ p }}{% else %}<mark>{{ p }}</mark>{% endif %}{% endfor -%}
</td></tr>
{%- endfor %}</table>
{% endif %}
<script type='application/json' id='results'>{{ results | tojson }}</script>
<script>addEventListener('load',()=>{const imgs=[...document.images];document.body.dataset.images=imgs.length;
document.body.dataset.imagesLoaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;
document.body.dataset.rows=document.querySelectorAll('tr').length;});</script>
</body></html>
"""


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_ENV.filters["fmt"] = _fmt
_ENV.tests["numeric"] = _numeric
# Non-ASCII stays readable in the file; values JSON cannot hold (paths, numpy scalars) become strings.
_ENV.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "default": str}
_PAGE = _ENV.from_string(_TEMPLATE)


def _thumbnail(path: str, size: int = 96) -> str | None:
    """A JPEG thumbnail as base64, or None when the image cannot be read (it must not cost the whole report)."""
    try:
        from data_loading import load_image

        image = load_image(path)
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=80)
        return base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001
        return None


def _diff(target: str, prediction: str) -> tuple[list, list]:
    """Both texts as (op, text) spans: what the prediction lacks / what it has instead are the non-equal ones."""
    t_out, p_out = [], []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, target, prediction, autojunk=False).get_opcodes():
        if target[a0:a1]:
            t_out.append((op, target[a0:a1]))
        if prediction[b0:b1]:
            p_out.append((op, prediction[b0:b1]))
    return t_out, p_out


def _vlm_context(results: dict, rows: list[dict], reliability: Path) -> dict:
    calib = results.get("calibration", {})
    fields = [{"name": f, "accuracy": m["accuracy"], "majority_baseline": m["majority_baseline"],
               "macro_f1": m["macro_f1"], **{k: calib.get(f, {}).get(k, "-") for k in ("ece", "brier",
                                                                                       "mean_confidence")},
               "labels": m["labels"],
               "matrix": [(lab, [(v, i == j) for j, v in enumerate(row)])
                          for i, (lab, row) in enumerate(zip(m["labels"], m["confusion_matrix"]))]}
              for f, m in results["fields"].items()]
    names = list(results["fields"])

    def wrong(r):
        p = r.get("prediction") or {}
        return sum(str(p.get(f)) != str(r["target"].get(f)) for f in names) if p else len(names) + 1

    images = []
    for r in sorted(rows, key=wrong, reverse=True):
        p, conf = r.get("prediction") or {}, r.get("field_confidence") or {}
        cells = [{"invalid": not p, "right": bool(p) and str(p.get(f)) == str(r["target"].get(f)),
                  "shown": p.get(f), "truth": r["target"].get(f), "confidence": conf.get(f)} for f in names]
        overall = r.get("confidence")
        images.append({"name": Path(r["file"]).name, "thumbnail": _thumbnail(r["file"]), "cells": cells,
                       "wrong": bool(wrong(r)), "confidence": overall if isinstance(overall, float) else "-",
                       "review": ", ".join(r.get("review_fields") or []) if r.get("needs_review") else "accepted"})
    return {"fields": fields, "images": images, "reliability": _png(reliability),
            "risk_coverage": _png(reliability.with_name(reliability.name.replace("reliability", "risk_coverage"))),
            "review": list(results.get("review", {}).items())}


def _png(path: Path) -> dict | None:
    return {"name": path.name, "data": base64.b64encode(path.read_bytes()).decode()} if path.is_file() else None


def _llm_context(rows: list[dict]) -> dict:
    samples = []
    for r in sorted(rows, key=lambda r: r["prediction"].strip() == r["target"].strip()):
        target, prediction = _diff(r["target"], r["prediction"])
        samples.append({"text": r["text"], "target": target, "prediction": prediction,
                        "same": r["prediction"].strip() == r["target"].strip()})
    return {"fields": None, "samples": samples}


def write_report(path: Path, cfg: Config, results: dict, rows: list[dict]) -> None:
    headline_keys = ["num_samples", "json_valid_rate", "schema_valid_rate", "json_valid_rate_unconstrained",
                     "exact_match", "review_rate", "rouge_l", "bleu", "eval_loss", "perplexity", "empty_predictions",
                     "samples_per_second"]
    suffix = "_original_model" if cfg.use_original_model else ""
    context = _vlm_context(results, rows, path.parent / f"reliability{suffix}.png") if "fields" in results \
        else _llm_context(rows)
    # A round trip through JSON: what the page embeds is exactly what eval_results.json holds.
    embedded = json.loads(json.dumps(results, default=str))
    atomic_write_text(path, _PAGE.render(
        title=f"Evaluation: {cfg.model_name}" + (" (base model)" if cfg.use_original_model else ""),
        css=_CSS, review_target=cfg.review_target_accuracy, model=str(results.get("model")),
        adapter=str(results.get("adapter")),
        when=time.strftime("%Y-%m-%d %H:%M"),
        headline=[(k, results[k]) for k in headline_keys if results.get(k) is not None],
        results=embedded, **context))
