"""Drives the Tally console in a real headless Chromium (Playwright).

Usage: browser.py BASE CHROMIUM SCREENSHOT_DIR TOKENS_JSON GPU_FIX_YAML

Signs in with each token, reads figures back from the page and prints them
as one JSON object on standard output; the Rust test (tests/console.rs)
decides whether they are right. Screenshots of each page go to
SCREENSHOT_DIR. Only the admin-side catalog fix (GPU_FIX_YAML) is sent
outside the browser, as an operator would with `tally apply`.
"""

import json
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone

from playwright.sync_api import expect, sync_playwright

BASE, CHROMIUM, SHOTS, TOKENS, FIX = sys.argv[1:6]
TOKENS = json.loads(TOKENS)
TIMEOUT_MS = 20_000
out = {"console_errors": []}


def apply(yaml_text):
    request = urllib.request.Request(
        BASE + "/apis/apply",
        data=yaml_text.encode(),
        method="POST",
        headers={"Authorization": "Bearer " + TOKENS["admin"], "Content-Type": "application/yaml"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()


def post(path, body, content_type):
    request = urllib.request.Request(
        BASE + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": "Bearer " + TOKENS["admin"], "Content-Type": content_type},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()


def lifecycle(id_, kind, project, instance, seconds_ago, reason=None):
    data = {"project": project, "instance": instance, "workload": "web"}
    if reason:
        data["reason"] = reason
    when = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return {
        "specversion": "1.0",
        "id": id_,
        "source": "instance-controller",
        "type": "com.datumapis.compute.instance." + kind,
        "subject": instance,
        "time": when.isoformat(),
        "data": data,
    }


def post_logs(project, instance, lines):
    """Instance log lines `(stream, text)` over OTLP/HTTP (JSON), as a collector sends them."""
    t = time.time_ns()
    records = [
        {
            "timeUnixNano": str(t + i),
            "body": {"stringValue": text},
            "attributes": [{"key": "log.iostream", "value": {"stringValue": stream}}],
        }
        for i, (stream, text) in enumerate(lines)
    ]
    resource = {"attributes": [
        {"key": "project", "value": {"stringValue": project}},
        {"key": "instance", "value": {"stringValue": instance}},
    ]}
    post("/v1/logs", {"resourceLogs": [{"resource": resource, "scopeLogs": [{"logRecords": records}]}]}, "application/json")


def seed_instances():
    """acme runs web-0 (started); globex's db-0 crashed. Each has logs."""
    post("/api/v1/instances/events", [
        lifecycle("w1", "created", "acme", "web-0", 3),
        lifecycle("w2", "scheduled", "acme", "web-0", 2),
        lifecycle("w3", "started", "acme", "web-0", 1),
        lifecycle("d1", "created", "globex", "db-0", 2),
        lifecycle("d2", "crashed", "globex", "db-0", 1, "InstanceCrashing"),
    ], "application/cloudevents-batch+json")
    post_logs("acme", "web-0", [("stdout", "listening on :8080"), ("stderr", "warn: slow query")])
    post_logs("globex", "db-0", [("stdout", "globex only line")])


def instance_rows(page, count):
    rows = page.locator("#i-table tbody tr")
    expect(rows).to_have_count(count)
    expect(rows.first.locator("td").nth(1)).not_to_be_empty()
    return [[c.strip() for c in row.locator("td").all_text_contents()[:3]] for row in rows.all()]


def log_lines(page, count):
    lines = page.locator("#i-logs li")
    expect(lines).to_have_count(count)
    return lines.evaluate_all("ls => ls.map((l) => l.lastChild.textContent)")


def show_logs(page, stream, grep, count):
    page.get_by_label("Stream", exact=True).select_option(stream)
    page.get_by_label("Containing", exact=True).fill(grep)
    page.get_by_role("button", name="Show logs").click()
    return log_lines(page, count)


def instances_session(browser, project):
    """One project's token: its instances, one's events and logs (filtered, then followed)."""
    context, page = sign_in(browser, TOKENS[project])
    page.get_by_role("button", name="Instances").click()
    seen = {"instances": instance_rows(page, 1)}
    instance = seen["instances"][0][1]
    page.get_by_role("button", name=f"Show {project}/{instance}").click()
    # The events are shown before the logs are read.
    expect(page.locator("#i-logs li").first).to_be_visible()
    seen["events"] = page.locator("#i-events tbody tr td:nth-child(2)").all_text_contents()
    seen["logs"] = log_lines(page, page.locator("#i-logs li").count())
    if project == "acme":
        expect(page.locator("#i-events tbody tr")).to_have_count(3)
        seen["events"] = page.locator("#i-events tbody tr td:nth-child(2)").all_text_contents()
        seen["stderr"] = show_logs(page, "stderr", "", 1)
        seen["grep"] = show_logs(page, "", "listening", 1)
        page.get_by_label("Containing", exact=True).fill("")
        page.get_by_label("Follow", exact=True).check()
        expect(page.locator("#i-logs-note")).to_contain_text("Following")
        log_lines(page, 2)
        post_logs("acme", "web-0", [("stdout", "GET /healthz 200")])
        seen["followed"] = log_lines(page, 3)
        page.screenshot(path=f"{SHOTS}/instances-logs.png", full_page=True)
    seen["text"] = page.locator("#page-instances").text_content()
    context.close()
    return seen


def sign_in(browser, token, scheme="light"):
    context = browser.new_context(color_scheme=scheme, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    # A refused API call (403 for a project token) is logged by the browser
    # as a failed load; anything else (a CSP violation, a script error) counts.
    page.on(
        "console",
        lambda m: out["console_errors"].append(m.text)
        if m.type == "error" and not m.text.startswith("Failed to load resource")
        else None,
    )
    page.on("pageerror", lambda e: out["console_errors"].append(str(e)))
    answer = page.goto(BASE + "/")
    out["csp"] = answer.headers.get("content-security-policy")
    page.get_by_label("Token (admin or project)").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_contain_text("Signed in")
    return context, page


def usage(page, meter, group):
    page.get_by_role("button", name="Usage").click()
    page.get_by_label("Meter", exact=True).select_option(meter)
    page.get_by_label("Group by", exact=True).select_option(group)
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#u-total")).not_to_have_text("–")
    expect(page.locator("#u-table tbody tr").first).to_be_visible()
    if group:
        # A chart drawn before "Show" (on choosing the meter) is ungrouped:
        # wait for the answer grouped as asked.
        expect(page.locator("#u-table tbody tr td:nth-child(2)").first).not_to_have_text("total")
    return {
        "total": page.locator("#u-total").text_content(),
        "groups": sorted(set(page.locator("#u-table tbody tr td:nth-child(2)").all_text_contents())),
        "bars": page.locator("#u-chart rect").count(),
    }


def quarantine_rows(page):
    return [
        [c.strip() for c in row.locator("td").all_text_contents()[:3]]
        for row in page.locator("#q-table tbody tr").all()
    ]


def validate(page, meter):
    page.get_by_role("button", name="Validate " + meter).click()
    verdict = page.locator("#cv-verdict")
    expect(verdict).to_be_visible()
    return verdict.text_content()


def validate_refused(page, meter):
    page.get_by_role("button", name="Validate " + meter).click()
    box = page.locator("#cv-body")
    expect(box).to_contain_text("admin")
    return box.text_content()


def admin_session(browser):
    context, page = sign_in(browser, TOKENS["admin"])
    out["token_in_page"] = TOKENS["admin"] in page.content()
    out["local_storage_items"] = page.evaluate("localStorage.length")
    out["admin"] = usage(page, "api-calls", "subject")
    page.screenshot(path=f"{SHOTS}/usage.png")
    page.get_by_role("button", name="Catalog").click()
    expect(page.locator("#q-table tbody tr").first).to_be_visible()
    out["quarantine_before"] = quarantine_rows(page)
    out["verdict_before"] = validate(page, "gpu-seconds")
    page.screenshot(path=f"{SHOTS}/catalog.png", full_page=True)
    apply(FIX)
    deadline = time.monotonic() + 30
    while True:
        page.get_by_role("button", name="Re-check quarantine").click()
        page.wait_for_timeout(300)
        rows = quarantine_rows(page)
        if not any(r and r[0] == "gpu-seconds" for r in rows) or time.monotonic() > deadline:
            break
    out["quarantine_after"] = rows
    out["recheck_summary"] = page.locator("#q-summary").text_content()
    out["verdict_after"] = validate(page, "gpu-seconds")
    for name in ["Billing", "Telemetry"]:
        page.get_by_role("button", name=name).click()
        page.wait_for_timeout(500)
        page.screenshot(path=f"{SHOTS}/{name.lower()}.png", full_page=True)
    page.get_by_role("button", name="Instances").click()
    out["admin_instances"] = instance_rows(page, 2)
    page.screenshot(path=f"{SHOTS}/instances.png", full_page=True)
    # Keyboard: the arrow keys move along the page buttons.
    page.get_by_role("button", name="Usage").focus()
    page.keyboard.press("ArrowRight")
    out["after_arrow"] = page.locator("nav button[aria-current=page]").text_content()
    context.close()
    context, page = sign_in(browser, TOKENS["admin"], scheme="dark")
    usage(page, "api-calls", "")
    page.screenshot(path=f"{SHOTS}/usage-dark.png")
    context.close()


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        seed_instances()
        admin_session(browser)
        out["instances_acme"] = instances_session(browser, "acme")
        out["instances_globex"] = instances_session(browser, "globex")
        context, page = sign_in(browser, TOKENS["acme"])
        out["acme"] = usage(page, "api-calls", "subject")
        page.get_by_role("button", name="Catalog").click()
        out["acme_validation"] = validate_refused(page, "gpu-seconds")
        context.close()
        context = browser.new_context()
        page = context.new_page()
        page.goto(BASE + "/")
        page.get_by_label("Token (admin or project)").fill("wrong-token")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#status")).to_contain_text("not known")
        out["wrong_token_stored"] = page.evaluate("sessionStorage.length")
        context.close()
        browser.close()
    print(json.dumps(out))


main()
