"""A real browser against a real Airflow: log in, trigger llm_quantization from the form with
method w8a8 and small params (W8A8 int8 is deployed fast on every CPU of this kind; FP8 runs
on vLLM's CPU build through a slow fallback), wait for success, open the validation report
through the task's extra link (the reports plugin), and save screenshots under test-artifacts/ui/.

Needs Debian's chromium (scripts/setup_browser.sh) and the playwright Python package; no
browser download. A few minutes on a quiet 2-core machine (`make demo` with W8A8 and larger
settings took 3 min 54 s end to end); W8A8's calibrated quantization is the longest stage, and
beside another CPU-heavy job (load average 6-7) the run took 16.5 min (quantize 8 min), hence
the generous deadline.

    .venv/bin/python -m pytest -m slow tests/ui/test_browser.py
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from .conftest import wait_for_dag

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DAG = "llm_quantization"
SMALL = {"calibration_samples": 16, "max_seq_length": 128, "ppl_max_tokens": 1024, "num_prompts": 2,
         "max_new_tokens": 8, "task_limit": 0, "sensitivity_layers": 0}
RUN_TIMEOUT_S = 1800

pytestmark = pytest.mark.slow


def _fill_section(dialog, section: str, values: dict) -> None:
    """Open a form section (an accordion item) and type into the fields present there."""
    dialog.get_by_role("button", name=section, exact=True).click()
    for name, value in values.items():
        field = dialog.locator(f"input[name=element_{name}]")
        if field.count() == 0:  # a field this DAG version does not have
            continue
        field.first.wait_for(state="visible", timeout=10_000)
        field.first.fill(str(value))
        field.first.press("Tab")


def _pick(page, dialog, field: str, value: str, open_section: bool = True) -> None:
    """Choose ``value`` in the dropdown of enum param ``field`` (section Quantization)."""
    if open_section:
        dialog.get_by_role("button", name="Quantization", exact=True).click()
    hidden = dialog.locator(f"input[name=element_{field}]")
    combo = hidden.locator("xpath=..").get_by_role("combobox")
    assert combo.count() > 0, f"no dropdown for {field}"
    combo.first.click()
    page.get_by_role("option", name=value, exact=True).click()
    assert hidden.input_value() == value, (field, hidden.input_value())


def _pick_method(page, dialog, method: str) -> None:
    _pick(page, dialog, "method", method)


def _extra_links(af, token: str, run_id: str, task_id: str) -> dict:
    """The task's extra links as the REST API gives them (what the UI's page renders)."""
    status, body = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
                                   f"{task_id}/links", token=token)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("extra_links"), dict):
        return body["extra_links"]
    return {"status": status, "body": body}


def _open_report(page, af, run_url: str, shot, out: dict, token: str) -> None:
    # 5. the validate task's extra link -> the plugin's report page. The API must name it first
    # (the page renders what the API gives); then the page, reloaded once if its links came late.
    deadline, links = time.time() + 60, {}
    while time.time() < deadline and not links.get("Validation report"):
        links = _extra_links(af, token, out["run_id"], "validate")
        time.sleep(0 if links.get("Validation report") else 2)
    assert links.get("Validation report"), f"the validate task's extra links from the API: {links}"
    # Airflow's UI renders an extra link as a link or a button: whichever comes
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    link = page.get_by_role("link", name="Validation report").or_(
        page.get_by_role("button", name="Validation report"))
    for attempt in range(2):
        page.goto(f"{run_url}/tasks/validate/details", wait_until="networkidle")
        try:
            link.first.wait_for(timeout=60_000)
            break
        except PlaywrightTimeout:
            shot(page, f"05-validate-task-no-extra-link-{attempt}.png")
            if attempt:
                raise
    shot(page, "05-validate-task-extra-link.png")
    href = link.first.get_attribute("href")
    if not href:  # rendered as a button: follow the popup it opens
        with page.expect_popup() as pop:
            link.first.click()
        href = pop.value.url
        pop.value.close()
    out["report_url"] = href
    assert re.search(rf"/quantpipe/reports/{DAG}/", href), href
    page.goto(href, wait_until="networkidle")
    verdict = page.locator("#verdict").inner_text()
    out["verdict"] = verdict
    assert verdict.startswith(("PASSED", "FAILED")), verdict
    shot(page, "06-report.png", full=True)

    # 6. the same report as a tab of the run page, and the reports index in the nav
    page.goto(f"{run_url}/plugin/quantpipe-run-report", wait_until="networkidle")
    frame = page.frame_locator("iframe").first
    frame.locator("#verdict").wait_for()
    shot(page, "07-run-report-tab.png")
    page.goto(f"{af.BASE}/plugin/quantpipe-reports", wait_until="networkidle")
    page.frame_locator("iframe").first.get_by_text("Quantization reports").first.wait_for()
    shot(page, "08-reports-index.png")


def _no_secret_rendered(page, af, run_url: str, shot, out: dict) -> None:
    """7. The vLLM API key the deploy task used appears on none of the pages a user can open."""
    key = (Path(af.HOME) / "vllm_api_key").read_text().strip()
    assert len(key) >= 16
    pages = {"deploy-log": (f"{run_url}/tasks/deploy", "endpoint"),
             "deploy-xcom": (f"{run_url}/tasks/deploy/xcom", "endpoint_url"),
             "deploy-rendered": (f"{run_url}/tasks/deploy/rendered_templates", "settings"),
             "run": (run_url, "deploy"),
             "report": (out["report_url"], "verdict")}
    out["secret_checked_pages"] = []
    for name, (url, marker) in pages.items():
        page.goto(url, wait_until="networkidle")
        page.wait_for_timeout(1500)
        html_text = page.content()
        for frame in page.frames:
            html_text += frame.content()
        assert marker in html_text, f"{name}: page did not render ({marker!r} missing)"
        assert key not in html_text, f"the vLLM API key is rendered on {url}"
        out["secret_checked_pages"].append(name)
    page.goto(f"{run_url}/tasks/deploy/xcom", wait_until="networkidle")
    page.wait_for_timeout(1000)
    shot(page, "09-deploy-xcom.png")


def browser_flow(af, shots: Path) -> dict:
    """The whole UI journey against instance ``af`` (scripts/airflow_local module)."""
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    token = af.token("admin")
    wait_for_dag(af, DAG, token)
    status, body = af._http("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False}, token)  # the instance is shared
    assert status == 200 and not body["is_paused"], body
    _, before = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns?limit=100", token=token)
    known = {r["dag_run_id"] for r in before.get("dag_runs", [])}
    profile = Path(tempfile.mkdtemp(prefix="quantpipe-chromium-"))
    out: dict = {"screenshots": []}

    def shot(page, name: str, full: bool = False) -> None:
        path = shots / name
        page.screenshot(path=str(path), full_page=full)
        out["screenshots"].append(str(path))

    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": 1400, "height": 1000})
            ctx.set_default_timeout(60_000)
            page = ctx.new_page()

            # 1. log in
            page.goto(af.BASE + "/", wait_until="networkidle")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", "admin")
            shot(page, "01-login.png")
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_function("document.cookie !== undefined")
            page.wait_for_load_state("networkidle")
            assert any(c["name"] == "_token" for c in ctx.cookies()), "no session cookie after login"

            # 2. the DAG
            page.goto(f"{af.BASE}/dags/{DAG}", wait_until="networkidle")
            page.get_by_text("Validate params").first.wait_for()
            shot(page, "02-dag.png")

            # 3. the trigger form: method w8a8 and small params
            page.get_by_test_id("trigger-dag-button").first.click()
            dialog = page.locator("[role=dialog][data-state=open]")
            dialog.get_by_text("Trigger Dag").first.wait_for()
            _pick_method(page, dialog, "fp8")
            # an inconsistent combination first: fp8 with 4-bit weights is refused at submit, no run
            _pick(page, dialog, "bits", "4", open_section=False)
            dialog.get_by_role("button", name="Trigger", exact=True).click()
            dialog.get_by_text("does not support 4-bit").first.wait_for(timeout=20_000)
            shot(page, "03a-trigger-form-refused.png")
            _, runs = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns?limit=100", token=token)
            assert {r["dag_run_id"] for r in runs.get("dag_runs", [])} == known, "a refused trigger created a run"
            _pick(page, dialog, "bits", "8", open_section=False)
            _pick(page, dialog, "method", "w8a8", open_section=False)
            _fill_section(dialog, "Calibration", {k: SMALL[k] for k in ("calibration_samples", "max_seq_length")})
            _fill_section(dialog, "Evaluation", {k: SMALL[k] for k in
                                                 ("ppl_max_tokens", "num_prompts", "max_new_tokens", "task_limit",
                                                  "sensitivity_layers")})
            shot(page, "03-trigger-form.png")
            dialog.get_by_role("button", name="Trigger", exact=True).click()

            # 4. the new run, followed through the REST API
            run_id, deadline = None, time.time() + 60
            while run_id is None and time.time() < deadline:
                _, runs = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns?limit=100", token=token)
                new = [r for r in runs.get("dag_runs", []) if r["dag_run_id"] not in known]
                run_id = new[0]["dag_run_id"] if new else None
                time.sleep(1)
            assert run_id, "submitting the form created no run"
            _, run = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}", token=token)
            out["run_id"], out["conf"] = run_id, run.get("conf")
            for k, v in SMALL.items():
                if k in (run.get("conf") or {}):
                    assert run["conf"][k] == v, (k, run["conf"])
            assert run["conf"]["method"] == "w8a8" and int(run["conf"]["bits"]) == 8
            t0, state = time.time(), None
            while time.time() - t0 < RUN_TIMEOUT_S:
                _, run = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}", token=token)
                state = run.get("state")
                if state in ("success", "failed"):
                    break
                time.sleep(5)
                if time.time() - t0 > 600:
                    token = af.token("admin")
            out["run_state"], out["run_seconds"] = state, round(time.time() - t0)
            run_url = f"{af.BASE}/dags/{DAG}/runs/{quote(run_id, safe='')}"
            page.goto(run_url, wait_until="networkidle")
            page.wait_for_timeout(1500)
            shot(page, "04-run.png")
            if state != "success":
                _, tis = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances",
                                  token=token)
                raise AssertionError(f"run {run_id} ended {state}: "
                                     f"{ {t['task_id']: t['state'] for t in tis.get('task_instances', [])} }")

            _open_report(page, af, run_url, shot, out, af.token("admin"))
            _no_secret_rendered(page, af, run_url, shot, out)
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return out


def test_trigger_from_the_form_and_read_the_report(airflow_instance):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: run scripts/setup_browser.sh")
    result = browser_flow(airflow_instance, SHOTS)
    (SHOTS / "result.json").write_text(json.dumps(result, indent=1))
    assert result["run_state"] == "success"
    assert result["verdict"].startswith(("PASSED", "FAILED"))


def test_viewer_cannot_trigger(airflow_instance):
    af = airflow_instance
    viewer = af.token("viewer")
    wait_for_dag(af, DAG, viewer)
    status, body = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns", {"logical_date": None, "conf": {}}, viewer)
    assert status == 403, body
