"""Helpers for the coordinator's HTTP views: scrape /metrics, read the dashboard's JSON, open its page in Chromium."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

CHROMIUM_NAMES = ("chromium", "chromium-browser")


class Samples(dict):
    """(sample name, frozenset of label items) -> value, from one scrape."""

    def value(self, name: str, **labels: str) -> float:
        return self.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of the name whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(value for (sample, items), value in self.items() if sample == name and wanted <= items)

    def labels(self, name: str, label: str) -> set[str]:
        return {dict(items)[label] for (sample, items), _ in self.items() if sample == name and label in dict(items)}


def scrape(url: str) -> Samples:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def read_summary(dashboard_url: str) -> dict:
    return json.loads(urllib.request.urlopen(dashboard_url + "api/summary", timeout=10).read())


def chromium_path() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is not installed: apt-get install chromium (the dashboard is tested in a real browser; "
                ".ci/run installs it)")


@contextmanager
def dashboard_page(url: str) -> Iterator:  # type: ignore[type-arg]
    """The page in headless Chromium (Debian's, no download), with every request it makes and every script error."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.requested = []  # type: ignore[attr-defined]
            page.errors = []  # type: ignore[attr-defined]
            page.on("request", lambda request: page.requested.append(request.url))  # type: ignore[attr-defined]
            page.on("pageerror", lambda error: page.errors.append(str(error)))  # type: ignore[attr-defined]
            page.goto(url)
            yield page
        finally:
            browser.close()


LOSS_POINTS = "document.querySelectorAll('#loss-chart circle').length"


def _wait(page, condition: str, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll a JavaScript condition from here: Playwright's wait_for_function evaluates strings, which the
    page's Content-Security-Policy (no eval) rightly refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _shown(page) -> dict:  # type: ignore[no-untyped-def]
    """What the page shows now: its numbers, and the data its charts drew."""
    text = {name: page.inner_text(f"#{name}") for name in
            ("round", "rounds-decided", "live-workers", "throughput", "epoch", "eta", "sources-chart",
             "institutions-chart", "classes-chart", "devices-chart")}
    bars = lambda chart, attribute: [float(v) for v in page.eval_on_selector_all(  # noqa: E731
        f"#{chart} rect[{attribute}]", f"bars => bars.map(bar => bar.getAttribute('{attribute}'))")]
    return {**text, "loss_rounds": [int(v) for v in page.eval_on_selector_all(
                "#loss-chart circle", "dots => dots.map(dot => dot.dataset.round)")],
            "group_sizes": bars("groups-chart", "data-value"), "source_targets": bars("sources-chart", "data-target"),
            "institution_tokens": bars("institutions-chart", "data-value")}


WATCH_TIMEOUT = 150.0  # for each thing the page must show; the caller waits twice that, so its message surfaces


def watch_the_dashboard_through_a_round(url: str, total_rounds: int, workers: int, opened: threading.Event,
                                        timeout: float = WATCH_TIMEOUT) -> None:
    """Open the dashboard in Chromium while a run trains: its charts and numbers are there, and a round later
    they have moved on, the page never reloaded. `opened` is set once the page has drawn itself: start the
    workers after it, or a slow browser start can miss a short run's live rounds."""
    with dashboard_page(url + "?refresh=1") as page:
        page.evaluate("window.openedOnce = true")  # a reload would forget it
        _wait(page, "document.getElementById('round').textContent.includes('/')", timeout, "the page's first draw")
        opened.set()
        _wait(page, f"{LOSS_POINTS} >= 1 && document.getElementById('live-workers').textContent == '{workers}'",
              timeout, f"a decided round and {workers} live workers on the page")
        before = _shown(page)
        assert len(before["loss_rounds"]) < total_rounds, "the page first saw the run already over: no round to watch"
        _wait(page, f"{LOSS_POINTS} > {len(before['loss_rounds'])}", timeout, "the next round on the page")
        after = _shown(page)
        assert page.evaluate("window.openedOnce === true"), "the page reloaded instead of redrawing"
        assert page.errors == [], page.errors
        assert all(request.startswith(url) for request in page.requested), page.requested  # nothing from elsewhere
    for shown in before, after:
        decided = len(shown["loss_rounds"])
        assert shown["loss_rounds"] == list(range(decided)) and shown["rounds-decided"] == f"{decided} decided"
        assert shown["round"] == f"{decided} / {total_rounds}" and shown["group_sizes"] == [float(workers)] * decided
        assert len(shown["source_targets"]) >= 2 and abs(sum(shown["source_targets"]) - 1) < 1e-6  # the mixture
        assert sum(shown["institution_tokens"]) > 0 and "independent" in shown["institutions-chart"]
        assert "volunteer" in shown["classes-chart"] and "cpu" in shown["devices-chart"]
        assert shown["epoch"].startswith("0: ")
    # Live while the run trains (the next round may be its last, after which the workers leave).
    assert before["live-workers"] == str(workers) and int(before["throughput"].replace(",", "")) > 0
    assert len(after["loss_rounds"]) > len(before["loss_rounds"]), (before, after)
    assert sum(after["institution_tokens"]) > sum(before["institution_tokens"])
