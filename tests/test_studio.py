"""The studio page in a real browser (Debian's Chromium, driven by Playwright) against a real `segue serve` on
loopback with the built-in model: a clip end to end, a storyboard whose edit renders only its shots again,
cancel, an API error at its field, the keyboard alone, a phone-width screen and the token prompt. Every page
must finish without a console error. Each screen is photographed (see studio_browser.screenshot)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.studio_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    JOB_S,
    WATCH_JS,
    Console,
    Server,
    clip_keyframes,
    drop_file,
    file_payload,
    keyframe,
    png,
    screenshot,
)

WAIT_MS = JOB_S * 1000


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("SEGUE_STUDIO_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screens")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("serve") / "data")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, width=1100, height=900) -> (page, console); every page is checked for console errors."""
    opened = []

    def open_(url: str, width: int = 1100, height: int = 900):
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        context.set_default_timeout(30_000)
        page = context.new_page()
        console = Console(page)
        opened.append((context, console))
        page.goto(url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        return page, console

    yield open_
    for context, console in opened:
        context.close()
        assert not console.unexpected(), console.unexpected()


def newest_card(page):
    """The top card of the queue (the job submitted last), pinned by its job id."""
    top = page.locator("#jobs > .job").first
    expect(top).to_be_visible()
    job_id = top.get_attribute("data-id")
    return page.locator(f'#jobs > .job[data-id="{job_id}"]'), job_id


def test_clip_end_to_end(server, open_page, shots_dir):
    page, _ = open_page(server.url + "/")
    # the model's defaults fill the settings
    defaults = server.request("GET", "/health")[1]["model"]["defaults"]
    expect(page.locator("#clip-frames")).to_have_value(str(defaults["frames"]))
    expect(page.locator("#clip-steps")).to_have_value(str(defaults["steps"]))
    expect(page.locator("#clip-guidance")).to_have_value(f"{defaults['guidance']:g}")
    expect(page.locator("#clip-frames-note")).to_contain_text(f"at {defaults['fps']} fps")
    (first, last), caption = clip_keyframes(19, (0, 16), size=128)
    page.set_input_files("#clip-first", file_payload("first.png", png(first, (0, 16, 128, 112))))  # 128x96
    drop_file(page, '.drop[data-slot="last"]', "last.png", png(last, (16, 0, 112, 128)))  # 96x128, drag and drop
    expect(page.locator('.drop[data-slot="first"] .size')).to_have_text("first.png: 128×96")
    expect(page.locator('.drop[data-slot="last"] .size')).to_have_text("last.png: 96×128")
    expect(page.locator("#clip-fit")).to_contain_text(re.compile(r"Output: \d+×\d+"))
    expect(page.locator("#clip-fit")).to_contain_text("Last keyframe 96×128: scaled to cover it and centre-cropped")
    page.fill("#clip-prompt", caption)
    page.fill("#clip-frames", "5")
    page.fill("#clip-steps", "60")  # enough steps that the page's 0.25 s event poll sees some in between
    seed_before = page.locator("#clip-seed").input_value()
    page.click("text=New seed")
    assert page.locator("#clip-seed").input_value() != seed_before
    screenshot(page, shots_dir, "studio-clip.png")

    page.evaluate(WATCH_JS)
    page.click("button:text('Make the clip')")
    expect(page).to_have_url(re.compile("#queue$"))
    card, job_id = newest_card(page)
    expect(card).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    seen = [s for s in page.evaluate("window.__seen") if s["id"] == job_id]
    moving = sorted({s["value"] for s in seen if 0 < s["value"] < 100})
    assert moving, f"the progress bar never showed a value between 0 and 100: {seen[-5:]}"
    assert any(re.search(r"step ([1-9]|[1-5]\d) of 60\b", s["text"]) for s in seen), [s["text"] for s in seen]

    # the video plays inline, on a loop; the report's keyframe fidelity is shown
    video = card.locator("video")
    page.wait_for_function("v => v.readyState >= 2 && v.duration > 0", arg=video.element_handle(), timeout=30_000)
    assert video.evaluate("v => v.loop && v.duration > 0")
    page.wait_for_function("v => v.currentTime > 0 || v.ended", arg=video.element_handle(), timeout=30_000)
    report = server.job(job_id)["report"]
    page.click("nav >> text=Clip")  # the size the page said the keyframes would be fitted to is the video's
    expect(page.locator("#clip-fit")).to_contain_text(f"Output: {report['width']}×{report['height']}.")
    page.click("nav >> text=Queue")
    rows = card.locator(".fidelity tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text(f"{report['keyframes'][0]['psnr']:.2f}")
    expect(rows.nth(1)).to_contain_text(f"{report['keyframes'][1]['delta_e']:.2f}")
    screenshot(page, shots_dir, "studio-queue.png")

    # downloads: the mp4 and the PNG frames
    with page.expect_download() as dl:
        card.locator(".download-mp4").click()
    assert Path(dl.value.path()).read_bytes()[4:8] == b"ftyp"
    with page.expect_download() as dl:
        card.locator(".download-frames").click()
    assert Path(dl.value.path()).read_bytes()[:2] == b"PK"

    # a frame of the result, picked with the slider, becomes the clip's first keyframe
    card.locator(".picker summary").click()
    expect(card.locator(".picker-status")).to_contain_text(f"{report['frames']} frames")
    slider = card.locator(".picker-range")
    slider.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    expect(card.locator(".picker-index")).to_have_text("3")
    expect(card.locator(".picker-preview")).to_have_attribute("alt", "Frame 3 of the result")
    card.locator("button[data-use=first]").click()
    expect(card.locator(".picker-status")).to_contain_text("Frame 3 is now the first keyframe")
    page.click("nav >> text=Clip")
    w, h = report["width"], report["height"]
    expect(page.locator('.drop[data-slot="first"] .size')).to_contain_text(f"00003.png: {w}×{h}")


def test_again_and_delete(server, open_page):
    page, _ = open_page(server.url + "/")
    page.set_input_files("#clip-first", file_payload("a.png", keyframe(1)))
    page.fill("#clip-frames", "5")
    page.fill("#clip-seed", "1234")
    page.click("button:text('Make the clip')")
    card, first_id = newest_card(page)
    expect(card).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    cards = page.locator("#jobs > .job")
    listed = cards.count()

    card.locator("[data-act=again]").click()
    expect(cards).to_have_count(listed + 1)
    again_card, again_id = newest_card(page)
    assert again_id != first_id
    again = server.job(again_id)
    assert again["settings"]["seed"] == 1234 and again["settings"]["frames"] == 5
    again_card.locator("[data-act=cancel]").click()
    expect(again_card).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)

    card.locator("[data-act=again-seed]").click()
    expect(cards).to_have_count(listed + 2)
    reseed_card, reseed_id = newest_card(page)
    assert reseed_id not in (first_id, again_id)
    reseed = server.job(reseed_id)
    assert reseed["settings"]["seed"] != 1234 and reseed["settings"]["frames"] == 5
    reseed_card.locator("[data-act=cancel]").click()
    expect(reseed_card).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)

    assert again["remix_of"] == first_id and reseed["remix_of"] == first_id

    # after a reload the page holds no keyframes of its own: "again" remixes from the server's copy
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.click("nav >> text=Queue")
    card.locator("[data-act=again]").click()
    expect(cards).to_have_count(listed + 3)
    later_card, later_id = newest_card(page)
    later = server.job(later_id)
    assert later["remix_of"] == first_id and later["settings"] == again["settings"]
    later_card.locator("[data-act=cancel]").click()
    expect(later_card).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
    card.locator("[data-act=delete]").click()
    expect(page.locator(f'.job[data-id="{first_id}"]')).to_have_count(0)
    assert server.request("GET", f"/v1/videos/{first_id}")[0] == 404


def test_storyboard_renders_only_the_changed_shots(server, open_page, shots_dir):
    page, console = open_page(server.url + "/#story")
    frames, caption = clip_keyframes(7, (0, 8, 16, 12))
    k0, k1, k2, k3 = (png(f) for f in frames)
    page.set_input_files("#story-add-input", [file_payload("k1.png", k1), file_payload("k0.png", k0)])
    drop_file(page, "#story-add", "k2.png", k2)
    strip = page.locator("#story-strip > li")
    expect(strip).to_have_count(3)
    # reorder: drag the second keyframe onto the first, then move it back and forth with the keyboard
    page.drag_and_drop("#story-strip > li:nth-child(2) img", "#story-strip > li:nth-child(1) img")
    expect(strip.nth(0).locator(".size")).to_contain_text("k0.png")
    strip.nth(0).locator("[data-move=later]").click()
    expect(strip.nth(1).locator(".size")).to_contain_text("k0.png")
    expect(page.locator(":focus")).to_have_attribute("data-move", "later")
    strip.nth(1).locator("[data-move=earlier]").click()
    expect(strip.nth(0).locator(".size")).to_contain_text("k0.png")
    # remove and add again
    strip.nth(2).locator("[data-move=remove]").click()
    expect(strip).to_have_count(2)
    page.set_input_files("#story-add-input", file_payload("k2.png", k2))
    expect(strip).to_have_count(3)
    expect(page.locator("fieldset.shot")).to_have_count(2)
    page.check("#story-loop")
    expect(page.locator("fieldset.shot")).to_have_count(3)
    page.uncheck("#story-loop")
    for i, prompt in enumerate([caption, caption]):
        page.fill(f"#story-shot-{i}-prompt", prompt)
        page.fill(f"#story-shot-{i}-frames", "5")
    page.fill("#story-steps", "3")
    page.check("#story-color-match")
    screenshot(page, shots_dir, "studio-storyboard.png")

    # a shot's bad frame count: the API's message under that shot's field, and no job
    console.allow(r"status of 422")
    page.fill("#story-shot-1-frames", "6")
    page.click("button:text('Render the film')")
    expect(page.locator("#story-shot-1-frames-error")).to_contain_text("shots[1]: frames must be 4n+1")
    expect(page.locator("#story-shot-1-frames")).to_be_focused()
    expect(page.locator("#story-render")).to_be_hidden()
    page.fill("#story-shot-1-frames", "5")

    page.click("button:text('Render the film')")
    render = page.locator("#story-render .job")
    expect(render).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    first_id = render.get_attribute("data-id")
    expect(render.locator(".shots li")).to_have_text([re.compile(r"Shot 1: rendered"), re.compile(r"Shot 2: rendered")])

    # a new third keyframe: only shot 2 (keyframe 2 -> 3) renders again, and the page says so
    page.set_input_files('[data-field="keyframes[2]"]', file_payload("k3.png", k3))
    expect(strip.nth(2).locator(".size")).to_contain_text("k3.png")
    page.evaluate(WATCH_JS)
    page.click("button:text('Render the film')")
    expect(render).not_to_have_attribute("data-id", first_id)
    expect(render).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    expect(render.locator(".shots li")).to_have_text(
        [re.compile(r"Shot 1: reused from the cache"), re.compile(r"Shot 2: rendered")]
    )
    expect(render.locator(".shot-summary")).to_have_text(
        "Rendered again: shot 2. Reused unchanged: shot 1 (same keyframes and settings)."
    )
    second = server.job(render.get_attribute("data-id"))
    assert [s["reused"] for s in second["report"]["shots"]] == [True, False]
    states = [s["shots"] for s in page.evaluate("window.__seen") if s["id"] == second["id"]]
    assert any("Shot 2: rendering" in shot for st in states for shot in st), states
    screenshot(page, shots_dir, "studio-storyboard-render.png")


def test_cancel(server, open_page):
    page, _ = open_page(server.url + "/")
    page.set_input_files("#clip-first", file_payload("a.png", keyframe(0)))
    page.fill("#clip-frames", "5")
    page.fill("#clip-steps", "400")
    page.click("button:text('Make the clip')")
    card, job_id = newest_card(page)
    expect(card).to_have_attribute("data-status", "in_progress", timeout=WAIT_MS)
    expect(card.locator(".progress-text")).to_contain_text(re.compile(r"step [1-9]\d* of 400"), timeout=WAIT_MS)
    card.locator("[data-act=cancel]").click()
    expect(card).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
    expect(card.locator(".badge")).to_have_text("cancelled")
    job = server.job(job_id)
    assert job["status"] == "cancelled" and job["step"] < 400


def test_invalid_frames_shows_the_api_message_at_the_field(server, open_page, shots_dir):
    page, console = open_page(server.url + "/")
    console.allow(r"status of 422")  # the refused request itself, as the browser logs it
    before = len(server.request("GET", "/v1/videos?limit=100")[1]["data"])
    page.set_input_files("#clip-first", file_payload("a.png", keyframe(0)))
    page.fill("#clip-frames", "6")
    page.click("button:text('Make the clip')")
    error = page.locator("#clip-frames-error")
    expect(error).to_contain_text("frames must be 4n+1")
    # the same text the API gives, next to its field, announced and focused
    status, answer = server.post_form({"frames": "6"}, {"first": keyframe(0)})
    assert status == 422
    message = answer["error"]["message"]
    expect(error).to_have_text(message)
    frames = page.locator("#clip-frames")
    expect(frames).to_have_attribute("aria-invalid", "true")
    expect(frames).to_be_focused()
    assert "clip-frames-error" in frames.get_attribute("aria-describedby")
    assert page.locator("#clip-frames + .note + .field-error, #clip-frames ~ .field-error").count() == 1
    assert len(server.request("GET", "/v1/videos?limit=100")[1]["data"]) == before  # no job was created
    screenshot(page, shots_dir, "studio-error.png", full_page=False)
    page.fill("#clip-frames", "5")
    page.click("button:text('Make the clip')")
    card, job_id = newest_card(page)
    card.locator("[data-act=cancel]").click()
    expect(card).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)


# Controls without a name a screen reader could say (a label, aria-label(ledby) or their own text).
UNNAMED_JS = """() => [...document.querySelectorAll("input, select, textarea, button, a[href], summary")]
    .filter((el) => !el.closest("[hidden], template, dialog"))
    .filter((el) => !((el.labels && el.labels.length) || el.getAttribute("aria-label")
        || el.getAttribute("aria-labelledby") || el.textContent.trim()))
    .map((el) => el.outerHTML)"""
FOCUSED_JS = "() => document.activeElement.id || document.activeElement.textContent.trim()"


def test_keyboard_alone(server, open_page):
    page, _ = open_page(server.url + "/")
    # file choosers are intercepted from now on: turning that on reaches the browser asynchronously, and a
    # chooser opened before it lands is never reported
    page.on("filechooser", lambda _: None)
    assert page.evaluate(UNNAMED_JS) == []
    stops = []
    for _ in range(17):
        page.keyboard.press("Tab")
        stops.append(page.evaluate(FOCUSED_JS))
    assert stops[:4] == ["Skip to the page", "Clip", "Storyboard", stops[3]] and stops[3].startswith("Queue")
    assert stops[4:16] == [
        "clip-first", "clip-last", "clip-prompt", "clip-negative", "clip-frames", "clip-duration", "clip-size",
        "clip-steps", "clip-seed", "New seed", "clip-guidance", "More settings",
    ]  # fmt: skip
    assert stops[16] == "Make the clip"
    # pick the keyframe with the keyboard (Space opens the file chooser), type, submit with Enter
    page.locator("#clip-first").focus()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(file_payload("k.png", keyframe(0)))
    expect(page.locator('.drop[data-slot="first"] .size')).to_have_text("k.png: 64×64")
    page.keyboard.press("Tab")
    assert page.evaluate(FOCUSED_JS) == "Remove the first keyframe"
    page.locator("#clip-prompt").focus()
    page.keyboard.type("the disc rolls")
    page.locator("#clip-frames").focus()
    page.keyboard.press("Control+a")
    page.keyboard.type("5")
    page.locator("button:text('Make the clip')").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#queue-title")).to_be_focused()
    card, job_id = newest_card(page)
    assert server.job(job_id)["settings"]["prompt"] == "the disc rolls"
    # reach the job's Cancel button by Tab alone and press it
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.dataset.act") == "cancel":
            break
    if card.get_attribute("data-status") in ("queued", "in_progress"):
        assert page.evaluate("() => document.activeElement.closest('.job').dataset.id") == job_id
        page.keyboard.press("Enter")
        expect(card).to_have_attribute("data-status", re.compile("cancelled|completed"), timeout=WAIT_MS)


def test_phone_width(server, open_page, shots_dir):
    page, _ = open_page(server.url + "/", width=390, height=844)
    overflow = "() => document.documentElement.scrollWidth - window.innerWidth"
    (first, last), caption = clip_keyframes(19, (0, 16), size=256)
    page.set_input_files("#clip-first", file_payload("first.png", png(first)))
    page.set_input_files("#clip-last", file_payload("last.png", png(last)))
    page.fill("#clip-prompt", caption)
    expect(page.locator("#clip-fit")).to_contain_text("Output:")
    assert page.evaluate(overflow) <= 0
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, shots_dir, "studio-phone-clip.png", full_page=False)
    page.click("nav >> text=Storyboard")
    frames, _ = clip_keyframes(7, (0, 8, 16))
    page.set_input_files("#story-add-input", [file_payload(f"k{i}.png", png(f)) for i, f in enumerate(frames)])
    expect(page.locator("#story-strip > li")).to_have_count(3)
    assert page.evaluate(overflow) <= 0
    page.click("nav >> text=Queue")
    expect(page.locator("#queue-title")).to_be_focused()
    page.wait_for_load_state("networkidle")
    assert page.evaluate(overflow) <= 0
    screenshot(page, shots_dir, "studio-phone-queue.png", full_page=False)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("serve-token") / "data", token="studio-test-token")
    yield srv
    srv.stop()


def test_token_asked_once_per_session(token_server, open_page, shots_dir):
    page, console = open_page(token_server.url + "/#queue")
    console.allow(r"status of 401")  # the refused requests, as the browser logs them
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#token-input")).to_be_focused()
    screenshot(page, shots_dir, "studio-token.png", full_page=False)
    page.keyboard.type("wrong-token")
    page.keyboard.press("Enter")
    expect(page.locator("#token-error")).to_have_text("The server refused that token; try again.")
    page.fill("#token-input", "studio-test-token")
    page.click("#token-dialog button[value=ok]")
    expect(dialog).to_be_hidden()
    expect(page.locator("#queue-message")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('segue.token')") == "studio-test-token"

    # kept for the session: a reload does not ask again, and a clip goes through with the token
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.click("nav >> text=Clip")
    page.set_input_files("#clip-first", file_payload("a.png", keyframe(0)))
    page.fill("#clip-frames", "5")
    page.fill("#clip-steps", "1")
    page.click("button:text('Make the clip')")
    card, job_id = newest_card(page)
    expect(card).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    page.wait_for_function("v => v.duration > 0", arg=card.locator("video").element_handle(), timeout=30_000)
    expect(dialog).to_be_hidden()


def test_a_late_refusal_keeps_the_new_token(token_server, open_page):
    # A request sent with an old token and refused after the person gave the right one retries with the
    # right one; it neither forgets it nor asks again.
    page, console = open_page(token_server.url + "/#queue")
    console.allow(r"status of 401")
    page.evaluate("sessionStorage.setItem('segue.token', 'studio-test-token')")
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    held = []
    # the first request is held here until the new token is stored; the retry goes through
    page.route("**/v1/videos?limit=1", lambda route: route.continue_() if held else held.append(route))
    page.evaluate(
        """async () => {
            const api = await import('./js/api.js');
            sessionStorage.setItem('segue.token', 'old-token');
            window.lateAnswer = api.send('GET', '/v1/videos?limit=1').then((res) => res.status);
        }"""
    )
    for _ in range(200):  # the route handler runs while the page is pumped
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the request never reached the route"
    page.evaluate("sessionStorage.setItem('segue.token', 'studio-test-token')")
    held[0].continue_()  # the server refuses it: it was sent with 'old-token'
    # without an answer in 20 s the request is waiting on a token dialog that should not have opened
    answer = "Promise.race([window.lateAnswer, new Promise((r) => setTimeout(() => r('no answer'), 20000))])"
    assert page.evaluate(answer) == 200
    expect(page.locator("#token-dialog")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('segue.token')") == "studio-test-token"
