"""The console in a real browser (headless Chromium from Debian's packages, driven by
Selenium, nothing downloaded) against two real boxes in one mesh: every page renders with
live data; a person added in the browser gets a key that works with the `openai` client;
the chat page streams a real answer and names the box that gave it; the usage page shows
the numbers of `allerac usage --json`; the invite page's QR code reads (zbarimg) as the
code shown, which joins a third box; the members list revokes that box, after asking, and
the other box drops it; a name set in a box's config file cannot be changed from the
console (409); and a page of another origin (on the same host: the same site, so the
strict cookie is even sent) can neither read nor change anything. Screenshots of each
page go to docs/screenshots/ (see the README).

The boxes and the browser start at once and serve the whole module; the boxes' requests
go over HTTP, as the `allerac` commands send them (tests/test_console_api.py runs the
commands themselves)."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.clients import openai_client
from tests.nodeproc import NodeProcess
from tests.test_console_api import cli_in_process, one_thread_model
from tests.test_lan_mesh import wait_until
from tests.test_owner_edges import raw

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
WAIT_S = 20.0
JSON_TYPE = {"Content-Type": "application/json"}
GARAGE = "garage"  # box b's name, set in its config file
ZBARIMG = shutil.which("zbarimg")

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


def start_all(starts: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Everything in `starts` started at once (each start mostly waits: on two cores
    together is quicker); if one fails, those that started are stopped and it is raised."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = {name: pool.submit(start) for name, start in starts.items()}
    started = {n: f.result() for n, f in futures.items() if f.exception() is None}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        stop_all(started)
        raise failed[0]  # type: ignore[misc]
    return started


def stop_all(started: dict[str, Any]) -> None:
    for thing in started.values():
        if isinstance(thing, NodeProcess):
            thing.kill()
        else:
            thing.quit()


def owner_post(node: NodeProcess, path: str, body: dict[str, Any]) -> Any:
    """What the `allerac` commands send: the owner's request, over HTTP."""
    status, _, answer = raw(node, "POST", path, body, {**node.owner, **JSON_TYPE})
    assert status == 200, answer
    return answer


def peers_up(node: NodeProcess) -> set[str]:
    return {p["node_id"] for p in status_of(node)["peers"] if p["state"] == "up"}


def status_of(node: NodeProcess) -> Any:
    return raw(node, "GET", "/allerac/status", headers=node.owner)[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two boxes (a, and b whose name is set in its config file) joined in one mesh, a
    third box not yet in it (c), and the browser, all started at once."""
    root = tmp_path_factory.mktemp("console-mesh")
    model = one_thread_model()
    starts: dict[str, Callable[[], Any]] = {
        "a": NodeProcess(root / "a", config=model).start,
        "b": NodeProcess(root / "b", config=f'display_name = "{GARAGE}"\n{model}').start,
        "c": NodeProcess(root / "c", config=model).start,
        "browser": lambda: start_browser(root / "chromium"),
    }
    found = start_all(starts)
    try:
        a, b = found["a"], found["b"]
        invite = owner_post(a, "/allerac/mesh/invites", {"role": "member", "ttl_s": 600})
        owner_post(b, "/allerac/mesh/join", {"code": invite["code"]})
        wait_until(lambda: b.node_id in peers_up(a), 10, "a sees b up")
        wait_until(lambda: a.node_id in peers_up(b), 10, "b sees a up")
        yield found
    finally:
        stop_all(found)


@pytest.fixture(scope="module")
def mesh2(world: dict[str, Any]) -> dict[str, NodeProcess]:
    return {"a": world["a"], "b": world["b"]}


def display_name(node: NodeProcess) -> str:
    return str(status_of(node)["display_name"])


def wait(driver: Any, check: Any, what: str) -> Any:
    """Wait for `check`; the live pages redraw their tables, so an element found a moment
    ago may be gone: look again."""
    try:
        return WebDriverWait(
            driver,
            WAIT_S,
            poll_frequency=0.05,
            ignored_exceptions=(StaleElementReferenceException,),
        ).until(lambda d: check(d))
    except TimeoutException:
        raise AssertionError(f"not within {WAIT_S} s: {what}") from None


def text_of(driver: Any, selector: str) -> str:
    """The element's text; looked up again if the page redrew it in between (`wait`)."""
    [text] = wait(driver, lambda d: [d.find_element(By.CSS_SELECTOR, selector).text], selector)
    return str(text)


def open_page(driver: Any, page: str) -> None:
    driver.find_element(By.ID, f"nav-{page}").click()
    wait(driver, lambda d: d.find_element(By.ID, f"page-{page}").is_displayed(), page)


def screenshot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"console-{name}.png"))


@pytest.fixture(scope="module")
def owner(world: dict[str, Any], mesh2: dict[str, NodeProcess]) -> Any:
    """The browser signed in as box a's owner, with the link `allerac console` prints
    (asked for over HTTP, as the command does: tests/test_console_api.py runs the command)."""
    browser = world["browser"]
    a = mesh2["a"]
    browser.get(a.url + "/")  # nobody signed in yet: the sign-in page, and nothing else
    wait(browser, lambda d: d.find_element(By.ID, "sign-in").is_displayed(), "sign-in page")
    assert not browser.find_elements(By.CSS_SELECTOR, "#nav a")
    screenshot(browser, "sign-in")
    browser.get(owner_post(a, "/console/login-tokens", {})["url"])
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


@pytest.fixture(scope="module")
def carol_key(owner: Any) -> str:
    """A person added on the People page: the key it showed once."""
    open_page(owner, "people")
    owner.find_element(By.ID, "person-name").send_keys("carol")
    Select(owner.find_element(By.ID, "person-privacy")).select_by_visible_text("mesh")
    owner.find_element(By.ID, "person-quota").send_keys("mesh=200k/day")
    owner.find_element(By.CSS_SELECTOR, "#add-person button").click()
    key = wait(owner, lambda d: d.find_element(By.ID, "new-key-value").text, "the new key")
    return str(key)


def test_a_person_added_in_the_browser_gets_a_working_key(
    owner: Any, mesh2: dict[str, NodeProcess], carol_key: str
) -> None:
    key = carol_key
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
    command = cli_in_process(a.home, "usage", "--period", "month", "--by", "user", "--json")
    reports = {"user": json.loads(command)}
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


@pytest.fixture(scope="module")
def invite(owner: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A member invite made on the Invite page: the code shown as text, and a picture of
    its QR code as the browser drew it."""
    open_page(owner, "invite")
    owner.find_element(By.CSS_SELECTOR, "#invite-form button").click()
    code = wait(owner, lambda d: d.find_element(By.ID, "invite-code").text, "an invite code")
    picture = tmp_path_factory.mktemp("qr") / "invite-qr.png"
    picture.write_bytes(owner.find_element(By.ID, "invite-qr").screenshot_as_png)
    screenshot(owner, "invite")
    return str(code), picture


@pytest.mark.skipif(ZBARIMG is None, reason="needs zbarimg (scripts/setup.sh --test installs it)")
def test_the_invite_qr_code_reads_as_the_code_shown(invite: tuple[str, Path]) -> None:
    code, picture = invite
    assert code.startswith("allerac1-")
    read = subprocess.run(
        [str(ZBARIMG), "--quiet", "--raw", "-Sdisable", "-Sqrcode.enable", str(picture)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert read.returncode == 0, read.stderr  # zbarimg exits 4 when it finds no code
    assert read.stdout.splitlines() == [code]  # one QR code, holding exactly that text


@pytest.fixture(scope="module")
def third_box(invite: tuple[str, Path], world: dict[str, Any]) -> NodeProcess:
    """Box c joined with the Invite page's code (as `allerac mesh join CODE` does)."""
    c = world["c"]
    owner_post(c, "/allerac/mesh/join", {"code": invite[0]})
    return c  # type: ignore[no-any-return]


def test_the_invite_page_code_joins_a_third_box(owner: Any, third_box: NodeProcess) -> None:
    open_page(owner, "mesh")
    open_page(owner, "invite")  # the list afresh
    member = f'#members-table tr[data-node="{third_box.node_id}"]'
    wait(owner, lambda d: d.find_elements(By.CSS_SELECTOR, member), "the third box, a member")
    assert display_name(third_box) in text_of(owner, member)


def test_the_members_list_revokes_a_box(
    owner: Any, mesh2: dict[str, NodeProcess], third_box: NodeProcess
) -> None:
    a, b, c = mesh2["a"], mesh2["b"], third_box

    def revoked_at_a() -> bool:
        members = raw(a, "GET", "/allerac/mesh/members", headers=a.owner)[2]["members"]
        return any(m["node_id"] == c.node_id and m["revoked"] for m in members)

    wait_until(lambda: c.node_id in peers_up(b), 10, "b uses c")  # before: b knows c
    open_page(owner, "mesh")
    open_page(owner, "invite")
    row = f'#members-table tr[data-node="{c.node_id}"]'
    revoke = wait(owner, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} button"), "Revoke")
    assert revoke.text == "Revoke"
    # It asks first: saying no changes nothing.
    revoke.click()
    question = wait(owner, lambda d: expected_conditions.alert_is_present()(d), "a question")
    assert display_name(c) in question.text
    question.dismiss()
    assert not revoked_at_a()
    assert c.node_id in peers_up(b)
    # Saying yes revokes it: the list, `allerac mesh members` and the other box agree.
    owner.find_element(By.CSS_SELECTOR, f"{row} button").click()
    wait(owner, lambda d: expected_conditions.alert_is_present()(d), "a question").accept()
    wait(owner, lambda d: "revoked" in d.find_element(By.CSS_SELECTOR, row).text, "revoked")
    assert not owner.find_elements(By.CSS_SELECTOR, f"{row} button")  # once is enough
    assert "Revoked; told" in text_of(owner, "#notice")
    assert revoked_at_a()
    members = cli_in_process(a.home, "mesh", "members")
    assert any(c.node_id[:15] in line and "REVOKED" in line for line in members.splitlines())

    def dropped(node: NodeProcess) -> bool:
        return c.node_id not in {p["node_id"] for p in status_of(node)["peers"]}

    wait_until(lambda: dropped(a) and dropped(b), 10, "a and b drop c")
    owner.execute_script(
        "arguments[0].scrollIntoView()", owner.find_element(By.ID, "members-table")
    )
    screenshot(owner, "invite-revoked")


def test_a_name_set_in_the_config_file_is_not_renamed_from_the_console(
    owner: Any, mesh2: dict[str, NodeProcess]
) -> None:
    """Box b's name is in its config file: its Mesh page says so instead of offering a
    rename; renaming it anyway (the owner's request, or a console session's) is a 409
    that says where to change it, and nothing changes."""
    a, b = mesh2["a"], mesh2["b"]
    owner.get(owner_post(b, "/console/login-tokens", {})["url"])  # b's own console
    wait(owner, lambda d: d.find_element(By.ID, "rename-note").is_displayed(), "the note")
    assert "config file" in text_of(owner, "#rename-note")
    assert not owner.find_element(By.ID, "rename-input").is_enabled()
    assert not owner.find_element(By.CSS_SELECTOR, "#rename-form button").is_enabled()
    assert text_of(owner, "#box-name") == GARAGE
    screenshot(owner, "mesh-name-in-config")
    owner.get(a.url + "/#mesh")  # back to a, whose session (its own cookie) still holds
    name_a = display_name(a)
    wait(owner, lambda d: text_of(d, "#box-name") == name_a, "a's console again")
    assert owner.find_element(By.ID, "rename-input").is_enabled()
    assert not owner.find_element(By.ID, "rename-note").is_displayed()
    login = urllib.parse.urlsplit(owner_post(b, "/console/login-tokens", {})["url"])
    cookie = raw(b, "GET", f"{login.path}?{login.query}")[1]["set-cookie"].split(";")[0]
    csrf = raw(b, "GET", "/console/session", headers={"Cookie": cookie})[2]["csrf"]
    session = {"Cookie": cookie, "X-Allerac-CSRF": csrf}
    for who in (b.owner, session):
        status, _, body = raw(
            b, "PUT", "/allerac/display-name", {"display_name": "shed"}, {**who, **JSON_TYPE}
        )
        assert status == 409, body
        assert "config file" in body["error"]["message"]
    assert display_name(b) == GARAGE
    assert not (b.home / "display-name").exists()  # nothing kept to override it later
    peers = status_of(a)["peers"]
    assert [p["display_name"] for p in peers if p["node_id"] == b.node_id] == [GARAGE]


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
  const posted = new Promise((r) => document.querySelector("iframe").onload = r);
  document.getElementById("f").submit();
  await posted;
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


def test_a_person_signs_in_with_their_key_and_sees_their_own_pages(
    owner: Any, mesh2: dict[str, NodeProcess], carol_key: str
) -> None:
    """Last: it signs the owner out. Carol's key opens her usage and the chat, nothing of
    the administration."""
    a = mesh2["a"]

    def carol_counted(_: Any) -> bool:  # her usage page is read once, when she signs in
        report = raw(a, "GET", "/allerac/usage?period=month&by=user", headers=a.owner)[2]
        return any(row["user"] == "carol" for row in report["rows"])

    wait(owner, carol_counted, "carol's requests in a's ledger")
    owner.find_element(By.ID, "sign-out").click()
    wait(owner, lambda d: d.find_element(By.ID, "sign-in").is_displayed(), "signed out")
    owner.find_element(By.ID, "sign-in-key").send_keys(carol_key)
    owner.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
    wait(owner, lambda d: d.find_element(By.ID, "page-usage").is_displayed(), "her usage")
    assert text_of(owner, "#who") == "carol"
    pages = [
        link.get_attribute("data-page") for link in owner.find_elements(By.CSS_SELECTOR, "#nav a")
    ]
    assert pages == ["usage", "chat"]
    rows = wait(
        owner, lambda d: d.find_elements(By.CSS_SELECTOR, "#usage-user tr[data-key]"), "rows"
    )
    assert [row.get_attribute("data-key") for row in rows] == ["carol"]  # hers alone
    assert "carol" in text_of(owner, "#usage-verification")
    screenshot(owner, "person-usage")
    owner.get(mesh2["a"].url + "/#people")  # an administration page by address: not hers
    wait(owner, lambda d: d.find_element(By.ID, "page-usage").is_displayed(), "her usage again")
    assert not owner.find_element(By.ID, "page-people").is_displayed()
