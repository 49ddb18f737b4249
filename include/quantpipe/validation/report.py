"""Stage 4b: one validation report, as JSON for machines and an HTML page for people."""

from __future__ import annotations

import base64
import html
import io
import json
import time

from .checks import Check, overall_verdict
from .stats import CONFIDENCE

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "top1"}


def build_report(*, run_id: str, model: dict, quantization: dict, baseline: dict, quantized: dict,
                 checks: list[Check], consistency: dict, tolerances: dict) -> dict:
    return {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verdict": overall_verdict(checks),
        "passed": overall_verdict(checks) == "PASS",
        "failed_checks": [c.name for c in checks if c.verdict == "FAIL"],
        "inconclusive_checks": [c.name for c in checks if c.verdict == "INCONCLUSIVE"],
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

    fig, axes = plt.subplots(4, 2, figsize=(12, 14))
    (a, b), (c, d), (e1, e2), (f1, f2) = axes
    _slice_panel(e1, report, "kl:", "Mean KL per slice (bar) and its interval; limit dashed")
    _slice_panel(e2, report, "top1:", "Top-1 agreement per slice and its interval; limit dashed")
    ratio = (report.get("tolerances") or {}).get("slice_ratio", "r")
    _slice_panel(f1, report, "kl_excess:", f"Concentration: slice KL minus {ratio}x the other positions' (nats)")
    _slice_panel(f2, report, "disagree_excess:", f"Concentration: slice disagreement minus {ratio}x the others'")
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


def _interval(c: dict) -> str:
    return "" if c.get("low") is None else f"[{c['low']:.4g}, {c['high']:.4g}]"


def _slice_panel(ax, report: dict, prefix: str, title: str) -> None:
    rows = [c for c in report["checks"] if c["name"].startswith(prefix)]
    if not rows:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center")
    for i, c in enumerate(rows):
        colour = {"PASS": "#2a7", "FAIL": "#c33"}.get(c["verdict"], "#e90")
        if c["estimate"] is None:
            ax.text(0, i, " not measured", va="center", color=colour)
            continue
        ax.barh(i, c["estimate"], color=colour, alpha=0.6)
        ax.plot([c["low"], c["high"]], [i, i], color="#333")
        ax.plot([c["limit"]] * 2, [i - 0.4, i + 0.4], "--", color="#333")
    ax.set_yticks(range(len(rows)), [c["name"].removeprefix(prefix) for c in rows])
    ax.invert_yaxis()
    ax.set_title(title)


def _remediation_html(report: dict) -> str:
    r = report.get("remediation")
    if not r:
        return ""
    return (f"<h2>Remediation attempt {r['attempt']}</h2><p>after {html.escape(', '.join(r['after_failed_checks']))} "
            f"failed: {html.escape(json.dumps(r['changes']))}; size {r['size_bytes'] / 1e6:.1f} MB "
            f"({r['size_vs_first_attempt']:.2f}x the first attempt)</p>")


def render_html(report: dict) -> str:
    e = html.escape
    verdict = {"PASS": "PASSED", "FAIL": "FAILED: " + ", ".join(report["failed_checks"]),
               "INCONCLUSIVE": "INCONCLUSIVE (not a pass): " + ", ".join(report.get("inconclusive_checks", []))
               }[report.get("verdict", "PASS" if report["passed"] else "FAIL")]
    color = {"PASSED": "#2a7"}.get(verdict, "#c33")
    num = lambda x: "" if x is None else f"{x:.4g}"  # noqa: E731
    rows = "".join(
        f"<tr class='{c['verdict'].lower()}'><td>{e(c['name'])}</td><td>{e(c['description'])}</td>"
        f"<td>{num(c.get('baseline'))}</td><td>{num(c.get('quantized'))}</td><td>{num(c.get('estimate'))}</td>"
        f"<td>{_interval(c)}</td>"
        f"<td>{e(c['threshold'])}</td><td>{num(c.get('detectable'))}</td><td>{c.get('n', '')}</td>"
        f"<td style='color:{ {'PASS': '#2a7', 'FAIL': '#c33'}.get(c['verdict'], '#e90')}'><b>{c['verdict']}</b>"
        f"{'<br><small>' + e(c['note']) + '</small>' if c.get('note') else ''}</td></tr>"
        for c in report["checks"])
    excluded = "".join(f"<li><b>{e(x['name'])}</b>: {e(x['reason'])}</li>" for x in report.get("excluded_checks") or [])
    st = report.get("suite") or {}
    suite = (f"measured on {e(st.get('engine', '?'))}: {e(', '.join(st.get('measured') or []) or 'none')} "
             f"({st.get('items_per_set', 0)} items a set at most)"
             + "".join(f"<br><b>{e(n)}</b> not measured: {e(why)}" for n, why in (st.get("not_measured") or {}).items()))
    ans = report.get("answers") or {}
    answers = "".join(f"<tr><td><code>{e(r['prompt'])}</code></td><td>{e(str(r.get('expected')))}</td>"
                      f"<td>{e(r['baseline'])}</td><td>{e(r['quantized'])}</td>"
                      f"<td>{'changed' if r['flipped'] else ''}</td></tr>"
                      for r in ans.get("per_prompt", []) if r["flipped"])
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
<h2>Checks</h2><p>Each check: its estimate with a {int(CONFIDENCE * 100)} % interval (paired block bootstrap
over held-out positions, Agresti-Min for paired task items, Wilson for answer flips), decided as a
non-inferiority test: PASS when the whole interval is within the limit, FAIL when it is wholly beyond,
INCONCLUSIVE otherwise (not a pass). Full-precision weights and the files served beside them are
compared exactly: their interval is the count itself. <i>Detectable</i>: the value at which this measurement would
fail the check with 80 % probability, the smallest degradation it could catch.</p>
<table><tr><th>check</th><th>what</th><th>baseline</th><th>quantized</th><th>estimate</th><th>interval</th>
<th>limit</th><th>detectable</th><th>n</th><th>verdict</th></tr>{rows}</table>
<h3>Not checked</h3><ul>{excluded or "<li>none</li>"}</ul>
<h3>Task suite</h3><p>{suite}</p>
<h2>Answer flips</h2><p>{ans.get('flipped', '?')} of {ans.get('n', '?')} short answers changed.</p>
<table><tr><th>prompt (last line)</th><th>expected</th><th>baseline</th><th>quantized</th><th></th></tr>{answers}</table>
<h2>Plots</h2><img alt="plots" src="data:image/png;base64,{_plot_png(report)}">
<h2>Greedy outputs</h2><p>top-1 agreement on held-out text {report['consistency'].get('top1_agreement') or 0:.3f};
greedy exact-match rate {report['consistency']['exact_match_rate']:.2f},
token agreement {report['consistency']['token_agreement']:.3f}</p>
<table><tr><th>prompt</th><th>baseline</th><th>quantized</th><th>divergence</th></tr>{gens}</table>
{_remediation_html(report)}
<h2>Layer sensitivity</h2><table><tr><th>layer</th><th>relative weight error</th><th>NLL increase</th></tr>
{"".join(f"<tr><td>{e(r['layer'])}</td><td>{r['rel_error']:.4f}</td><td>{'' if r.get('loss_delta') is None else format(r['loss_delta'], '+.5f')}</td></tr>" for r in (report.get('sensitivity') or {}).get('layers', [])[:15])}</table>
<h2>Provenance</h2><pre>{e(json.dumps(q.get('provenance', {}), indent=1))}</pre>
</body></html>"""
