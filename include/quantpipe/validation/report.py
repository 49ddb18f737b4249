"""Stage 4b: one validation report, as JSON for machines and an HTML page for people."""

from __future__ import annotations

import base64
import html
import io
import json
import time

from .checks import Check

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "top1"}


def build_report(*, run_id: str, model: dict, quantization: dict, baseline: dict, quantized: dict,
                 checks: list[Check], consistency: dict, tolerances: dict) -> dict:
    return {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "passed": all(c.passed for c in checks),
        "failed_checks": [c.name for c in checks if not c.passed],
        "model": model,
        "quantization": quantization,
        "checks": [c.model_dump() for c in checks],
        "tolerances": tolerances,
        "perplexity": {"baseline": _strip(baseline["perplexity"]), "quantized": _strip(quantized["perplexity"])},
        "consistency": consistency,
        "generations": {"baseline": baseline["generations"], "quantized": quantized["generations"]},
        "eval_settings": quantized.get("settings"),
    }


def _plot_png(report: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    p = report["perplexity"]
    a.bar(["baseline", "quantized"], [p["baseline"]["perplexity"], p["quantized"]["perplexity"]],
          color=["#888", "#2a7"])
    a.set_title("Held-out perplexity")
    per = report["consistency"]["per_prompt"]
    n_tok = report["eval_settings"]["max_new_tokens"] if report.get("eval_settings") else 0
    vals = [n_tok if x["exact"] else x["first_divergence"] for x in per]
    b.bar(range(len(vals)), vals, color=["#2a7" if x["exact"] else "#d62" for x in per])
    b.set_title("Greedy tokens matching the baseline, per prompt")
    b.set_xlabel("prompt")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_html(report: dict) -> str:
    e = html.escape
    verdict = "PASSED" if report["passed"] else "FAILED: " + ", ".join(report["failed_checks"])
    color = "#2a7" if report["passed"] else "#c33"
    rows = "".join(
        f"<tr><td>{e(c['name'])}</td><td>{e(c['description'])}</td><td>{c['baseline']:.4g}</td>"
        f"<td>{c['quantized']:.4g}</td><td>{c['delta']:+.4g}</td><td>{e(c['threshold'])}</td>"
        f"<td style='color:{'#2a7' if c['passed'] else '#c33'}'>{'pass' if c['passed'] else 'FAIL'}</td></tr>"
        for c in report["checks"])
    gens = "".join(
        f"<tr><td><code>{e(x['prompt'])}</code></td><td>{e(x['baseline'])}</td><td>{e(x['quantized'])}</td>"
        f"<td>{'same' if x['exact'] else 'token ' + str(x['first_divergence'])}</td></tr>"
        for x in report["consistency"]["per_prompt"])
    q = report["quantization"]
    m = report["model"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Validation report {e(report['run_id'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}}table{{border-collapse:collapse}}.v{{font-size:1.6em;color:{color}}}</style></head><body>
<h1>Validation report</h1><p class="v" id="verdict">{e(verdict)}</p>
<p>Run <code>{e(report['run_id'])}</code>, model <code>{e(m.get('path', ''))}</code>
({m.get('num_parameters', 0) / 1e6:.1f}M parameters), method <b>{e(q.get('method', ''))}</b>
scheme <b>{e(q.get('scheme', ''))}</b>; size {m.get('size_bytes', 0) / 1e6:.1f} MB -> {q.get('size_bytes', 0) / 1e6:.1f} MB;
quantization {q.get('seconds', 0):.1f} s.</p>
<h2>Checks</h2><table><tr><th>check</th><th>what</th><th>baseline</th><th>quantized</th><th>delta</th>
<th>threshold</th><th>result</th></tr>{rows}</table>
<h2>Plots</h2><img alt="plots" src="data:image/png;base64,{_plot_png(report)}">
<h2>Greedy outputs</h2><p>top-1 agreement on held-out text {report['consistency'].get('top1_agreement', 0):.3f};
greedy exact-match rate {report['consistency']['exact_match_rate']:.2f},
token agreement {report['consistency']['token_agreement']:.3f}</p>
<table><tr><th>prompt</th><th>baseline</th><th>quantized</th><th>divergence</th></tr>{gens}</table>
<h2>Provenance</h2><pre>{e(json.dumps(q.get('provenance', {}), indent=1))}</pre>
</body></html>"""
