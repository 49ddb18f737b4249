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

    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    (a, b), (c, d) = axes
    acc = report.get("accuracy") or {}
    bt, qt = (acc.get("baseline") or {}).get("tasks", {}), (acc.get("quantized") or {}).get("tasks", {})
    names = [n for n in bt if n in qt]
    if names:
        x = range(len(names))
        a.bar([i - 0.2 for i in x], [bt[n]["score"] for n in names], 0.4, label="baseline", color="#888")
        a.bar([i + 0.2 for i in x], [qt[n]["score"] for n in names], 0.4, label="quantized", color="#2a7")
        a.set_xticks(list(x), [n.removeprefix("qp_") for n in names])
        a.legend()
    else:
        a.text(0.5, 0.5, "not measured in this run (task_limit 0)", ha="center", va="center")
    a.set_title("Task accuracy per category")
    kl = report.get("kl")
    if kl:
        e, cts = kl["histogram"]["edges"], kl["histogram"]["counts"]
        b.bar(e[:-1], cts, width=(e[1] - e[0]), align="edge", color="#57c")
        b.set_yscale("log")
        b.set_xlabel("KL(baseline || quantized), nats per token")
    b.set_title("Next-token KL divergence on held-out text")
    sens = (report.get("sensitivity") or {}).get("layers", [])[:10]
    if sens:
        vals = [r.get("loss_delta", 0) or 0 for r in sens]
        c.barh([r["layer"].removeprefix("model.") for r in sens][::-1], vals[::-1], color="#d62")
        c.set_xlabel("held-out NLL increase with only this layer quantized")
    else:
        c.text(0.5, 0.5, "not measured in this run (sensitivity_layers 0)", ha="center", va="center")
    c.set_title("Most sensitive layers")
    per = report["consistency"]["per_prompt"]
    n_tok = report["eval_settings"]["max_new_tokens"] if report.get("eval_settings") else 0
    vals = [n_tok if x["exact"] else x["first_divergence"] for x in per]
    d.bar(range(len(vals)), vals, color=["#2a7" if x["exact"] else "#d62" for x in per])
    d.set_title("Greedy tokens matching the baseline, per prompt")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _remediation_html(report: dict) -> str:
    r = report.get("remediation")
    if not r:
        return ""
    return (f"<h2>Remediation attempt {r['attempt']}</h2><p>after {html.escape(', '.join(r['after_failed_checks']))} "
            f"failed: {html.escape(json.dumps(r['changes']))}; size {r['size_bytes'] / 1e6:.1f} MB "
            f"({r['size_vs_first_attempt']:.2f}x the first attempt)</p>")


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
{_remediation_html(report)}
<h2>Layer sensitivity</h2><table><tr><th>layer</th><th>relative weight error</th><th>NLL increase</th></tr>
{"".join(f"<tr><td>{e(r['layer'])}</td><td>{r['rel_error']:.4f}</td><td>{'' if r.get('loss_delta') is None else format(r['loss_delta'], '+.5f')}</td></tr>" for r in (report.get('sensitivity') or {}).get('layers', [])[:15])}</table>
<h2>Provenance</h2><pre>{e(json.dumps(q.get('provenance', {}), indent=1))}</pre>
</body></html>"""
