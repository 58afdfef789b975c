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
    for name in ["Billing", "Telemetry", "Instances"]:
        page.get_by_role("button", name=name).click()
        page.wait_for_timeout(500)
        page.screenshot(path=f"{SHOTS}/{name.lower()}.png", full_page=True)
    out["instances_text"] = page.locator("#page-instances").text_content()
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
        admin_session(browser)
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
