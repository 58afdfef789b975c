"""Benchmark (not a test): time to first chart in the console.

Usage: first_chart.py BASE CHROMIUM TOKEN METER [RUNS]

Against a running `tally serve` (e.g. over a store that `tally bench`
filled), signs in, then per run: asks for METER over the 30 days before
now in HOUR windows (one series, then grouped by `region`, then by
`subject`: the server's top 7 and "other") and times from
the click on Show until the chart's bars are drawn (server query + page).
Also reports the console's page weight (the bytes of its three files).
Prints one JSON object. See BENCHMARKS.md.
"""

import json
import statistics
import sys
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

BASE, CHROMIUM, TOKEN, METER = sys.argv[1:5]
RUNS = int(sys.argv[5]) if len(sys.argv) > 5 else 5


def weight():
    total = 0
    for path in ["/", "/console/app.js", "/console/app.css"]:
        with urllib.request.urlopen(BASE + path, timeout=30) as answer:
            total += len(answer.read())
    return total


def first_chart(page, group):
    now = time.time()
    to = time.strftime("%Y-%m-%dT%H:00", time.gmtime(now + 3600))
    start = time.strftime("%Y-%m-%dT%H:00", time.gmtime(now + 3600 - 30 * 86400))
    page.get_by_label("Meter", exact=True).select_option(METER)
    page.get_by_label("Window", exact=True).select_option("HOUR")
    page.get_by_label("From (UTC)").fill(start)
    page.get_by_label("To (UTC)").fill(to)
    page.get_by_label("Group by", exact=True).select_option(group)
    page.evaluate("document.querySelectorAll('#u-chart rect').forEach((r) => r.remove())")
    began = time.perf_counter()
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#u-chart rect").first).to_be_attached(timeout=120_000)
    elapsed = time.perf_counter() - began
    return elapsed, page.locator("#u-chart rect").count(), page.locator("#u-total").text_content()


def main():
    out = {"page_weight_bytes": weight()}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(BASE + "/")
        page.get_by_label("Token (admin or project)").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_contain_text("Signed in")
        page.locator("#live").uncheck()
        for group in ["", "region", "subject"]:
            times, bars, total = [], 0, ""
            for _ in range(RUNS):
                t, bars, total = first_chart(page, group)
                times.append(t)
            out[group or "total"] = {
                "runs_ms": [round(t * 1000, 1) for t in times],
                "median_ms": round(statistics.median(times) * 1000, 1),
                "bars": bars,
                "total": total,
            }
        browser.close()
    print(json.dumps(out))


main()
