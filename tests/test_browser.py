"""The upload page in a real headless Chromium (Debian's), served by app.py over HTTP."""

import re

import pytest
from conftest import SAMPLE, text_page
from playwright.sync_api import expect, sync_playwright

import app_harness

CHROMIUM = "/usr/bin/chromium"  # Debian's package: `make browser` installs it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def server(random_checkpoint):
    with app_harness.running_server(
        random_checkpoint, "--threads", "2", "--torch-threads", "1", "--max-upload-mb", "1.5"
    ) as (url, _):
        yield url


@pytest.fixture(scope="module")
def trusted_server(trusted_checkpoint):
    with app_harness.running_server(trusted_checkpoint, "--threads", "2", "--torch-threads", "1") as (url, _):
        yield url


@pytest.fixture
def page():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport=PHONE)
        finally:
            browser.close()


@pytest.mark.browser
def test_upload_shows_label_probability_and_heatmap_then_a_readable_error(server, page, tmp_path):
    script_errors = []  # script errors and CSP violations (e.g. anything loaded from elsewhere)
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and script_errors.append(message.text))
    page.goto(server)
    expect(page.get_by_text("Research tool, not a diagnosis.")).to_be_visible()

    page.get_by_label("Choose a dermoscopic image").set_input_files(SAMPLE / "images" / "ISIC_0024306.jpg")
    expect(page.locator("#preview")).to_be_visible()
    # The keyboard alone can send it: focus the button, press Enter.
    page.get_by_role("button", name="Check this image").focus()
    page.keyboard.press("Enter")

    expect(page.locator("#result-label")).to_have_text(re.compile(r"^(Melanoma|Non-Melanoma)$"))
    expect(page.locator("#probability")).to_have_text(re.compile(r"^\d{1,3}\.\d%$"))
    expect(page.locator("#threshold")).to_have_text("50.0%")
    heatmap = page.locator("#heatmap")
    expect(heatmap).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    expect(heatmap).to_be_visible()
    assert heatmap.evaluate("image => image.complete && image.naturalWidth") > 0
    page.screenshot(path=tmp_path / "upload_page.png", full_page=True)
    assert (tmp_path / "upload_page.png").stat().st_size > 0

    page.get_by_label("Choose a dermoscopic image").set_input_files(
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image\n"}
    )
    page.get_by_role("button", name="Check this image").click()
    expect(page.get_by_role("alert")).to_have_text(
        "Unsupported file type: send a JPEG, PNG, WebP, BMP or TIFF image."
    )
    expect(page.locator("#result")).to_be_hidden()
    # Chromium logs the 415 answer itself as a failed resource load; nothing else may appear.
    assert [error for error in script_errors if "status of 415" not in error] == []


@pytest.mark.browser
def test_a_file_over_the_limit_is_refused_before_it_is_sent(server, page):
    posts = []
    page.on("request", lambda request: request.method == "POST" and posts.append(request.url))
    page.goto(server)
    expect(page.get_by_text("up to 1.5 MB")).to_be_visible()
    large = {"name": "large.jpg", "mimeType": "image/jpeg", "buffer": bytes(2 * 1024 * 1024)}
    page.get_by_label("Choose a dermoscopic image").set_input_files(large)
    page.get_by_role("button", name="Check this image").click()
    expect(page.get_by_role("alert")).to_have_text("The file is too large: the limit is 1.5 MB.")
    assert posts == []


@pytest.mark.browser
def test_a_picture_that_is_not_a_lesion_gets_no_verdict(trusted_server, page, tmp_path):
    text_page().save(tmp_path / "document.png")
    page.goto(trusted_server)
    page.get_by_label("Choose a dermoscopic image").set_input_files(tmp_path / "document.png")
    page.get_by_role("button", name="Check this image").click()

    expect(page.locator("#result-label")).to_have_text("Cannot judge this image")
    expect(page.get_by_text("This does not look like a dermoscopic image of a skin lesion")).to_be_visible()
    expect(page.locator("#result")).to_have_attribute("data-label", "cannot-judge")
    expect(page.locator("#probability-meaning")).to_contain_text("Calibrated")

    page.get_by_label("Choose a dermoscopic image").set_input_files(SAMPLE / "images" / "ISIC_0024306.jpg")
    page.get_by_role("button", name="Check this image").click()
    expect(page.locator("#result-label")).to_have_text(re.compile(r"^(Melanoma|Non-Melanoma)$"))
    expect(page.locator("#cannot-judge")).to_be_hidden()
