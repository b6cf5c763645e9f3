"""The console in a real browser (headless Chromium from Debian's packages, driven by
Selenium, nothing downloaded) against two real boxes in one mesh: every page renders with
live data; a person added in the browser gets a key that works with the `openai` client;
the chat page streams a real answer and names the box that gave it; the usage page shows
the numbers of `allerac usage --json`; the invite page's code joins a third box; and a
page of another origin (on the same host: the same site, so the strict cookie is even
sent) can neither read nor change anything. Screenshots of each page go to
docs/screenshots/ (see the README)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients import openai_client
from tests.members import models_config
from tests.nodeproc import NodeProcess, run_cli
from tests.test_lan_mesh import start_mesh
from tests.test_owner_edges import raw

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
WAIT_S = 20.0
JSON_TYPE = {"Content-Type": "application/json"}

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh --test installs them)",
)


def start_browser(profile: Path) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # The driver's path is given, so Selenium Manager is never asked to download one.
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two boxes in one mesh (a, b), a third box not yet in it (c) and the browser, all
    started at once (each start mostly waits: on two cores together is quicker)."""
    root = tmp_path_factory.mktemp("console-mesh")
    config = models_config("smollm2-135m-instruct")
    found: dict[str, Any] = {}
    failures: list[BaseException] = []

    def run(name: str, start: Any) -> None:
        try:
            found[name] = start()
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    third = NodeProcess(root / "c")
    threads = [
        threading.Thread(target=run, args=("browser", lambda: start_browser(root / "chromium"))),
        threading.Thread(target=run, args=("c", third.start)),
    ]
    for thread in threads:
        thread.start()
    try:
        found.update(start_mesh(root, {"a": config, "b": config}))
    except BaseException as exc:
        failures.append(exc)
    for thread in threads:
        thread.join()
    try:
        if failures:
            raise failures[0]
        yield found
    finally:
        third.kill()
        for name in ("a", "b"):
            if name in found:
                found[name].kill()
        if "browser" in found:
            found["browser"].quit()


@pytest.fixture(scope="module")
def mesh2(world: dict[str, Any]) -> dict[str, NodeProcess]:
    return {"a": world["a"], "b": world["b"]}


def display_name(node: NodeProcess) -> str:
    return str(raw(node, "GET", "/allerac/status", headers=node.owner)[2]["display_name"])


def wait(driver: Any, check: Any, what: str) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: check(d))
    except TimeoutException:
        raise AssertionError(f"not within {WAIT_S} s: {what}") from None


def text_of(driver: Any, selector: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, selector).text)


def open_page(driver: Any, page: str) -> None:
    driver.find_element(By.ID, f"nav-{page}").click()
    wait(driver, lambda d: d.find_element(By.ID, f"page-{page}").is_displayed(), page)


def screenshot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"console-{name}.png"))


@pytest.fixture(scope="module")
def owner(world: dict[str, Any], mesh2: dict[str, NodeProcess]) -> Any:
    """The browser signed in as box a's owner, through `allerac console --print`."""
    browser = world["browser"]
    printed = run_cli(mesh2["a"].home, "console", "--print")
    assert printed.returncode == 0, printed.stderr
    browser.get(printed.stdout.strip())
    wait(browser, lambda d: d.find_element(By.ID, "nav-mesh").is_displayed(), "signed in")
    assert "token=" not in browser.current_url  # the one-time token left the address bar
    return browser


def test_every_page_renders_with_live_data(owner: Any, mesh2: dict[str, NodeProcess]) -> None:
    a, b = mesh2["a"], mesh2["b"]
    names = {
        n: raw(n, "GET", "/allerac/status", headers=n.owner)[2]["display_name"] for n in (a, b)
    }
    open_page(owner, "mesh")
    row_b = f'#mesh-table tr[data-node="{b.node_id}"]'
    wait(owner, lambda d: "up" in d.find_element(By.CSS_SELECTOR, row_b).text, "box b up")
    assert names[a] in text_of(owner, f'#mesh-table tr[data-node="{a.node_id}"]')
    assert names[b] in text_of(owner, row_b)
    assert "lan" in text_of(owner, row_b)
    screenshot(owner, "mesh")

    open_page(owner, "models")
    pick = '#models-table tr[data-model="smollm2-135m-instruct"] td.pick'
    wait(owner, lambda d: "(local)" in d.find_element(By.CSS_SELECTOR, pick).text, "a route")
    served = text_of(owner, '#models-table tr[data-model="smollm2-135m-instruct"]')
    assert names[a] in served
    assert names[b] in served
    screenshot(owner, "models")

    for page, ready in (
        ("people", "#people-table tbody tr"),
        ("invite", f'#members-table tr[data-node="{b.node_id}"]'),
        ("chat", "#chat-model option"),
        ("usage", "#usage-user tbody tr"),
    ):
        open_page(owner, page)
        wait(owner, lambda d, ready=ready: d.find_elements(By.CSS_SELECTOR, ready), page)
        screenshot(owner, page)


def test_a_person_added_in_the_browser_gets_a_working_key(
    owner: Any, mesh2: dict[str, NodeProcess]
) -> None:
    open_page(owner, "people")
    owner.find_element(By.ID, "person-name").send_keys("carol")
    Select(owner.find_element(By.ID, "person-privacy")).select_by_visible_text("mesh")
    owner.find_element(By.ID, "person-quota").send_keys("mesh=200k/day")
    owner.find_element(By.CSS_SELECTOR, "#add-person button").click()
    key = wait(owner, lambda d: d.find_element(By.ID, "new-key-value").text, "the new key")
    assert key.startswith("amk_")
    assert key in text_of(owner, "#new-key-snippet")
    wait(
        owner,
        lambda d: d.find_elements(By.CSS_SELECTOR, '#people-table tr[data-user="carol"]'),
        "carol listed",
    )
    assert "200,000" in text_of(owner, '#people-table tr[data-user="carol"]')
    screenshot(owner, "people")
    # The key works with the official client.
    client = openai_client(mesh2["a"].url + "/v1", key)
    answer = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0


def test_the_chat_page_streams_a_real_answer_and_names_the_box(
    owner: Any, mesh2: dict[str, NodeProcess]
) -> None:
    open_page(owner, "chat")
    Select(owner.find_element(By.ID, "chat-privacy")).select_by_visible_text("local-only")
    owner.find_element(By.ID, "chat-input").send_keys("What is the capital of France?")
    owner.find_element(By.ID, "chat-send").click()
    done = wait(
        owner, lambda d: d.find_elements(By.CSS_SELECTOR, ".bubble.assistant.done"), "answer"
    )[-1]
    assert "Paris" in done.find_element(By.CSS_SELECTOR, ".text").text
    served = done.find_element(By.CSS_SELECTOR, ".served-by")
    assert served.get_attribute("data-node") == mesh2["a"].node_id  # local-only: this box
    assert served.get_attribute("data-route") == "local"
    assert display_name(mesh2["a"]) in served.text
    screenshot(owner, "chat")


def test_the_usage_page_shows_the_numbers_of_allerac_usage(
    owner: Any, mesh2: dict[str, NodeProcess]
) -> None:
    a = mesh2["a"]
    hello = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}
    answered = raw(a, "POST", "/v1/chat/completions", {**hello, "max_tokens": 2}, JSON_TYPE)
    assert answered[0] == 200, answered  # usage on the page, whichever tests ran before
    open_page(owner, "usage")
    owner.find_element(By.ID, "nav-mesh").click()  # load it afresh: the answers have settled
    open_page(owner, "usage")
    # The command's figures for one grouping (the same computation answers the HTTP API
    # the page reads: tests/test_console_api.py shows they agree for every grouping).
    command = run_cli(a.home, "usage", "--period", "month", "--by", "user", "--json")
    reports = {"user": json.loads(command.stdout)}
    for by in ("model", "node", "tier"):
        reports[by] = raw(a, "GET", f"/allerac/usage?period=month&by={by}", headers=a.owner)[2]
    for by, report in reports.items():
        expected = {
            r[by]: [r["requests"], r["prompt_tokens"], r["completion_tokens"]]
            for r in report["rows"]
        }
        rows = wait(
            owner,
            lambda d, by=by: d.find_elements(By.CSS_SELECTOR, f"#usage-{by} tr[data-key]"),
            f"usage by {by}",
        )
        shown = {
            row.get_attribute("data-key"): [
                int(cell.text.replace(",", ""))
                for cell in row.find_elements(By.CSS_SELECTOR, "td.num")
            ]
            for row in rows
        }
        assert shown == expected, by
    assert "verified" in text_of(owner, "#usage-verification")
    screenshot(owner, "usage")


def test_the_invite_page_code_joins_a_third_box(owner: Any, world: dict[str, Any]) -> None:
    open_page(owner, "invite")
    owner.find_element(By.CSS_SELECTOR, "#invite-form button").click()
    code = wait(owner, lambda d: d.find_element(By.ID, "invite-code").text, "an invite code")
    modules = int(owner.find_element(By.ID, "invite-qr").get_attribute("data-modules"))
    assert modules >= 21
    assert (modules - 17) % 4 == 0  # a QR code is 17 + 4 * version modules wide
    screenshot(owner, "invite")
    c = world["c"]
    joined = run_cli(c.home, "mesh", "join", code)
    assert joined.returncode == 0, joined.stderr
    owner.refresh()
    member = f'#members-table tr[data-node="{c.node_id}"]'
    wait(owner, lambda d: d.find_elements(By.CSS_SELECTOR, member), "the third box, a member")


class _EvilPage(http.server.BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *args: Any) -> None:
        pass


EVIL_PAGE = """<!doctype html><html><body><pre id="out"></pre>
<form id="f" method="POST" action="NODE/allerac/users" enctype="text/plain" target="sink">
<input name='{"name":"evilform","x":"' value='"}'></form><iframe name="sink"></iframe>
<script>
const node = "NODE", out = [], users = node + "/allerac/users", also = {credentials: "include"};
async function attempt(name, run) {
  try { out.push(name + ": " + await run()); } catch (e) { out.push(name + ": blocked"); }
}
(async () => {
  await attempt("read users", async () => (await fetch(users, also)).status);
  await attempt("read status, no credentials",
    async () => (await fetch(node + "/allerac/status")).status);
  await attempt("read session",
    async () => JSON.stringify(await (await fetch(node + "/console/session", also)).json()));
  await attempt("add user json", async () => (await fetch(users, {...also, method: "POST",
    headers: {"Content-Type": "application/json"}, body: '{"name": "evil1"}'})).status);
  await attempt("add user no-cors", async () => (await fetch(users, {...also, method: "POST",
    mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: '{"name": "evil2"}'})).type);
  document.getElementById("f").submit();
  await new Promise((r) => setTimeout(r, 300));
  document.getElementById("out").textContent = out.join("\\n");
  document.title = "done";
})();
</script></body></html>"""


def test_a_page_of_another_origin_can_read_or_change_nothing(
    owner: Any, mesh2: dict[str, NodeProcess]
) -> None:
    a = mesh2["a"]
    _EvilPage.html = EVIL_PAGE.replace("NODE", a.url).encode()
    # Same host, another port: another origin but the same site, so even the strict
    # session cookie goes along; the node's Origin check must hold alone.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EvilPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        owner.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait(owner, lambda d: d.title == "done", "the other page's attempts")
        results = text_of(owner, "#out")
    finally:
        server.shutdown()
        server.server_close()
    assert "read users: blocked" in results  # no CORS answer: nothing readable
    assert "read status, no credentials: blocked" in results
    assert "read session: blocked" in results
    assert "add user json: blocked" in results  # the preflight is refused
    users = [u["name"] for u in raw(a, "GET", "/allerac/users", headers=a.owner)[2]["users"]]
    assert not {"evil1", "evil2", "evilform"} & set(users)
    # Back on the console, the session still works.
    owner.get(a.url + "/#mesh")
    wait(owner, lambda d: d.find_element(By.ID, "nav-mesh").is_displayed(), "console again")


def test_the_owner_renames_the_box_and_the_other_box_learns_it(
    owner: Any, mesh2: dict[str, NodeProcess]
) -> None:
    a, b = mesh2["a"], mesh2["b"]
    open_page(owner, "mesh")
    field = owner.find_element(By.ID, "rename-input")
    field.clear()
    field.send_keys("kitchen")
    owner.find_element(By.CSS_SELECTOR, "#rename-form button").click()
    row_a = f'#mesh-table tr[data-node="{a.node_id}"]'
    wait(owner, lambda d: "kitchen" in d.find_element(By.CSS_SELECTOR, row_a).text, "new name")

    def b_knows() -> bool:
        peers = raw(b, "GET", "/allerac/status", headers=b.owner)[2]["peers"]
        return any(p["node_id"] == a.node_id and p["display_name"] == "kitchen" for p in peers)

    wait(owner, lambda _: b_knows(), "box b shows box a's new name")
