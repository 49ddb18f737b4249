"""The reports plugin on a real api-server: auth, path safety, index, extra links, the viewer role.

Reports are planted in the instance's artifact store for a real (queued, paused) DAG run, so
this test needs no quantization; tests/ui/test_browser.py covers a full run."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from quantpipe.pipeline import safe_run_id

from .conftest import wait_for_dag

DAG = "llm_quantization"
NAME = "validation-fp8-20260101T120000"


def _get(af, path: str, token: str | None = None, cookie: str | None = None) -> tuple[int, dict, str]:
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookie:
        headers["Cookie"] = f"_token={cookie}"
    req = urllib.request.Request(af.BASE + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture(scope="module")
def planted_run(airflow_instance, admin_token):
    af = airflow_instance
    wait_for_dag(af, DAG, admin_token)
    # a run of the paused DAG stays queued: it exists for the plugin's DAG/run check, but never
    # writes a report of its own beside the planted one (nor quantizes or deploys)
    status, body = af._http("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": True}, admin_token)
    assert status == 200 and body["is_paused"], body
    status, run = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns",
                           {"logical_date": None, "conf": {"method": "fp8", "bits": 8}}, admin_token)
    assert status in (200, 201), run
    run_id = run["dag_run_id"]
    folder = Path(af.artifact_root) / "runs" / safe_run_id(run_id) / NAME
    folder.mkdir(parents=True)
    report = {"run_id": run_id, "passed": True, "failed_checks": [],
              "quantization": {"method": "fp8", "scheme": "FP8_DYNAMIC"}}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "report.html").write_text("<html><body><h1>Validation report</h1>"
                                        "<p class='v' id='verdict'>PASSED</p></body></html>")
    # a file outside runs/ that traversal attempts aim at
    (Path(af.artifact_root) / "secret.txt").write_text("not for the browser")
    return run_id, folder


def test_report_needs_an_authenticated_user(airflow_instance, planted_run):
    run_id, _ = planted_run
    status, _, body = _get(airflow_instance, f"/quantpipe/reports/{DAG}/{quote(run_id, safe='')}")
    assert status == 401, body
    status, _, _ = _get(airflow_instance, "/quantpipe/reports/", token="not-a-jwt")
    assert status in (401, 403)


def test_report_html_json_and_index(airflow_instance, admin_token, planted_run):
    af = airflow_instance
    run_id, _ = planted_run
    base = f"/quantpipe/reports/{DAG}/{quote(run_id, safe='')}"
    status, headers, body = _get(af, base, token=admin_token)
    assert status == 200 and "id='verdict'>PASSED" in body and "quantpipe-banner" in body
    assert "default-src 'none'" in headers["content-security-policy"]
    # the UI's session cookie works as well as a bearer token
    status, _, body = _get(af, f"{base}/{NAME}", cookie=admin_token)
    assert status == 200 and "PASSED" in body
    status, _, body = _get(af, f"{base}/json", token=admin_token)
    assert status == 200 and json.loads(body)["quantization"]["scheme"] == "FP8_DYNAMIC"
    status, _, body = _get(af, "/quantpipe/reports/index.json", token=admin_token)
    # the instance is shared with the browser test, whose real run may have written its own report
    planted = [r for r in json.loads(body)["reports"] if r["run_id"] == run_id]
    assert [r["name"] for r in planted] == [NAME]
    status, _, body = _get(af, "/quantpipe/reports/", token=admin_token)
    assert status == 200 and NAME in body and DAG in body


@pytest.mark.parametrize("path", [
    "/quantpipe/reports/{dag}/..%2F..%2Fsecret.txt",
    "/quantpipe/reports/{dag}/..",
    "/quantpipe/reports/{dag}/{run}/..%2F..%2F..%2Fsecret.txt",
    "/quantpipe/reports/{dag}/{run}/validation-fp8-20260101T120001",
    "/quantpipe/reports/{dag}/no-such-run",
    "/quantpipe/reports/other_dag/{run}",
])
def test_lookups_outside_the_store_or_unknown_are_404(airflow_instance, admin_token, planted_run, path):
    run_id, _ = planted_run
    status, _, body = _get(airflow_instance, path.format(dag=DAG, run=quote(run_id, safe="")), token=admin_token)
    assert status == 404, body
    assert "not for the browser" not in body


def test_validation_extra_link_points_at_the_report(airflow_instance, admin_token, planted_run):
    af = airflow_instance
    run_id, folder = planted_run
    rid = quote(run_id, safe="")
    value = {"report_folder_uri": folder.resolve().as_uri(), "passed": True}
    status, body = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns/{rid}/taskInstances/validate/xcomEntries",
                            {"key": "return_value", "value": value}, admin_token)
    assert status in (200, 201), body
    status, links = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns/{rid}/taskInstances/validate/links",
                             token=admin_token)
    assert status == 200, links
    url = links["extra_links"]["Validation report"]
    assert url == f"{af.BASE}/quantpipe/reports/{DAG}/{rid}/{NAME}"
    assert _get(af, url.removeprefix(af.BASE), token=admin_token)[0] == 200
    # other tasks get no URL for these global links
    status, links = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns/{rid}/taskInstances/gate/links",
                             token=admin_token)
    assert status == 200 and not links["extra_links"].get("Validation report")


def test_plugin_is_registered_with_views_and_links(airflow_instance, admin_token):
    status, body = airflow_instance._http("GET", "/api/v2/plugins", token=admin_token)
    assert status == 200, body
    [p] = [p for p in body["plugins"] if p["name"] == "quantpipe_reports"]
    assert {v["destination"] for v in p["external_views"]} == {"nav", "dag_run"}
    assert p["fastapi_apps"][0]["url_prefix"] == "/quantpipe"
    assert len(p["global_operator_extra_links"]) == 2


def test_viewer_reads_reports_but_cannot_trigger(airflow_instance, planted_run):
    af = airflow_instance
    run_id, _ = planted_run
    viewer = af.token("viewer")
    assert _get(af, f"/quantpipe/reports/{DAG}/{quote(run_id, safe='')}", token=viewer)[0] == 200
    status, body = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns", {"logical_date": None, "conf": {}}, viewer)
    assert status == 403, body
