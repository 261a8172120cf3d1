"""The evaluation report: one self-contained HTML file (no server, no network, images embedded as thumbnails).

    python main.py --task evaluate      -> output/<model-name>/eval_report.html (eval_report_original_model.html)

VLM: headline metrics, per-field accuracy and macro F1 against the majority baseline, calibration (ECE, Brier,
reliability diagram), confusion matrices, and every validation image with truth, prediction and confidence,
errors first. LLM: headline metrics and every question with target and prediction, the differences marked.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
import time
from pathlib import Path

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


def _script_json(data) -> str:
    """JSON that is safe inside <script>: <, > and & as JSON escapes, so it parses as written (HTML escaping
    would not be undone inside a script element) and no value can close the element."""
    text = json.dumps(data, default=str, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="num">{_fmt(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                        else f"<td>{c}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _thumbnail(path: str, size: int = 96) -> str:
    try:
        from data_files import load_image

        image = load_image(path)
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=80)
        return f'<img class="thumb" alt="{html.escape(Path(path).name)}" src="data:image/jpeg;base64,' \
               f'{base64.b64encode(buf.getvalue()).decode()}">'
    except Exception:  # noqa: BLE001 - a missing image must not cost the whole report
        return '<span class="muted">(image unavailable)</span>'


def _png(path: Path) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _diff(target: str, prediction: str) -> tuple[str, str]:
    """Both texts with the differing spans marked (what the prediction lacks / what it has instead)."""
    t_out, p_out = [], []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, target, prediction, autojunk=False).get_opcodes():
        t, p = html.escape(target[a0:a1]), html.escape(prediction[b0:b1])
        t_out.append(t if op == "equal" else f"<ins>{t}</ins>" if t else "")
        p_out.append(p if op == "equal" else f"<mark>{p}</mark>" if p else "")
    return "".join(t_out), "".join(p_out)


def _vlm_sections(results: dict, rows: list[dict], reliability: Path) -> list[str]:
    out = ["<h2>Fields</h2>"]
    calib = results.get("calibration", {})
    out.append(_table(["field", "accuracy", "majority baseline", "macro F1", "ECE", "Brier", "mean confidence"],
                      [[html.escape(f), m["accuracy"], m["majority_baseline"], m["macro_f1"],
                        calib.get(f, {}).get("ece", "-"), calib.get(f, {}).get("brier", "-"),
                        calib.get(f, {}).get("mean_confidence", "-")] for f, m in results["fields"].items()],
                      ["ok" if m["accuracy"] > m["majority_baseline"] else "bad" for m in results["fields"].values()]))
    out.append("<h2>Calibration</h2><p class='muted'>Confidence is the model's probability of the value it chose, "
               "normalised over the values the field allows. On the diagonal, confidence equals accuracy.</p>")
    out.append(_png(reliability))
    out.append("<h2>Confusion matrices</h2><p class='muted'>Rows: truth; columns: prediction.</p>")
    for field, m in results["fields"].items():
        labels = m["labels"]
        head = "".join(f"<th>{html.escape(str(lab))}</th>" for lab in labels)
        body = "".join(
            f"<tr><th>{html.escape(str(lab))}</th>" + "".join(
                f'<td class="{"diag" if i == j else ""}">{v}</td>' for j, v in enumerate(row)) + "</tr>"
            for i, (lab, row) in enumerate(zip(labels, m["confusion_matrix"])))
        out.append(f"<h3>{html.escape(field)}</h3><table class='cm'><tr><th></th>{head}</tr>{body}</table>")
    fields = list(results["fields"])

    def wrong(r):
        p = r.get("prediction") or {}
        return sum(str(p.get(f)) != str(r["target"].get(f)) for f in fields) if p else len(fields) + 1

    ordered = sorted(rows, key=wrong, reverse=True)
    table = []
    for r in ordered:
        p = r.get("prediction") or {}
        conf = r.get("field_confidence") or {}
        cells = []
        for f in fields:
            right = p and str(p.get(f)) == str(r["target"].get(f))
            shown = _fmt(p.get(f)) if p else "<span class='muted'>invalid</span>"
            c = f" <span class='muted'>({conf[f]:.2f})</span>" if f in conf else ""
            cells.append(f"{shown}{c}" if right else f"<mark>{shown}</mark>{c}<br><span class='muted'>truth: "
                         f"{_fmt(r['target'].get(f))}</span>")
        overall = r.get("confidence")
        table.append([_thumbnail(r["file"]), html.escape(Path(r["file"]).name), *cells,
                      overall if isinstance(overall, float) else "-"])
    out.append(f"<h2>Validation images ({len(rows)}, errors first)</h2>")
    out.append(_table(["image", "file", *fields, "confidence"], table,
                      ["bad" if wrong(r) else "" for r in ordered]))
    return out


def _llm_sections(rows: list[dict]) -> list[str]:
    ordered = sorted(rows, key=lambda r: r["prediction"].strip() == r["target"].strip())
    table = []
    for r in ordered:
        t, p = _diff(r["target"], r["prediction"])
        table.append([html.escape(r["text"]), t, p])
    return [f"<h2>Validation samples ({len(rows)}, errors first)</h2>",
            "<p class='muted'>In the target, <ins>green</ins> is what the prediction lacks; in the prediction, "
            "<mark>red</mark> is what differs.</p>",
            _table(["question", "target", "prediction"], table,
                   ["ok" if r["prediction"].strip() == r["target"].strip() else "bad" for r in ordered])]


def write_report(path: Path, cfg: Config, results: dict, rows: list[dict]) -> None:
    headline_keys = ["num_samples", "json_valid_rate", "schema_valid_rate", "json_valid_rate_unconstrained",
                     "exact_match", "rouge_l", "bleu", "eval_loss", "perplexity", "empty_predictions",
                     "samples_per_second"]
    headline = [[k, results[k]] for k in headline_keys if k in results and results[k] is not None]
    title = f"Evaluation: {cfg.model_name}" + (" (base model)" if cfg.use_original_model else "")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>{html.escape(str(results.get('model')))} · adapter "
             f"{html.escape(str(results.get('adapter')))} · {time.strftime('%Y-%m-%d %H:%M')}</p>",
             "<h2>Headline</h2>", _table(["metric", "value"], headline)]
    if "fields" in results:
        suffix = "_original_model" if cfg.use_original_model else ""
        parts += _vlm_sections(results, rows, path.parent / f"reliability{suffix}.png")
    else:
        parts += _llm_sections(rows)
    # Lets a headless browser (and the test) confirm what rendered.
    script = ("<script>addEventListener('load',()=>{const imgs=[...document.images];document.body.dataset.images="
              "imgs.length;document.body.dataset.imagesLoaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
              "document.body.dataset.rows=document.querySelectorAll('tr').length;});</script>")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>{''.join(parts)}"
           f"<script type='application/json' id='results'>{_script_json(results)}</script>"
           f"{script}</body></html>")
    atomic_write_text(path, doc)
