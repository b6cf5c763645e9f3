"""The `allerac` commands as a user meets them: each exits non-zero when it did not do what
was asked, bad input gets the right status, and `allerac chat` edits lines like a shell
(tested through a real terminal, a pty) and prints only the answer when piped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from node.cli import cli
from tests.nodeproc import NodeProcess, run_cli
from tests.test_owner_edges import raw

QUESTION = "What is the capital of France?"
LEFT, HOME_KEY, END_KEY, UP = "\x1b[D", "\x01", "\x05", "\x1b[A"


def test_route_for_a_model_nobody_serves_exits_non_zero(node: NodeProcess) -> None:
    served = run_cli(node.home, "route", "--explain", "default")
    assert served.returncode == 0, served.stderr
    missing = run_cli(node.home, "route", "--explain", "no-such-model")
    assert missing.returncode == 1
    assert "nobody can serve it now" in missing.stdout  # the explanation is still shown


def test_route_plans_a_given_chat_and_refuses_a_bad_one(node: NodeProcess, tmp_path: Path) -> None:
    chat = tmp_path / "chat.json"
    chat.write_text('[{"role": "user", "content": "Hi"}]', encoding="utf-8")
    planned = run_cli(node.home, "route", "--explain", "--messages", str(chat), "default")
    assert planned.returncode == 0, planned.stderr
    assert "CACHED" in planned.stdout
    chat.write_text("[{", encoding="utf-8")
    broken = run_cli(node.home, "route", "--messages", str(chat), "default")
    assert broken.returncode == 2
    assert "is not JSON" in broken.stderr
    chat.write_text('[{"role": "robot", "content": "Hi"}]', encoding="utf-8")
    wrong = run_cli(node.home, "route", "--messages", str(chat), "default")
    assert wrong.returncode == 1
    assert "400" in wrong.stderr
    assert "messages[0].role" in wrong.stderr
    chat.write_text('"Hi"', encoding="utf-8")
    assert "array of messages" in run_cli(node.home, "route", "--messages", str(chat), "x").stderr
    owner = {"Content-Type": "application/json", **node.owner}
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}]}
    status, _, refused = raw(node, "POST", "/allerac/route?privacy=nowhere", body, owner)
    assert (status, refused["error"]["param"]) == (400, "privacy")


def test_a_malformed_invite_code_is_a_400(node: NodeProcess) -> None:
    owner = {"Content-Type": "application/json", **node.owner}
    for code in ("hello", "allerac1-!!!!", "allerac1-AAAA"):
        status, _, body = raw(node, "POST", "/allerac/mesh/join", {"code": code}, owner)
        assert status == 400, body
        assert body["error"]["code"] == "invite_malformed"
    refused = run_cli(node.home, "mesh", "join", "allerac1-AAAA")
    assert refused.returncode == 1
    assert "400" in refused.stderr
    assert "damaged" in refused.stderr


@pytest.mark.parametrize(
    "args",
    [("status",), ("models",), ("chat", "hi"), ("route", "default"), ("user", "list")],
)
def test_a_mistyped_home_is_a_clear_error(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*args, "--home", str(tmp_path / "no-such-home")])
    assert result.exit_code == 1
    assert "no data dir" in result.stderr
    assert "--home" in result.stderr
    assert not (tmp_path / "no-such-home").exists()  # asking created nothing


def test_piped_chat_prints_only_the_answer(node: NodeProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node", "chat", "--home", str(node.home), "--max-tokens", "24"],
        input=QUESTION + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "you>" not in result.stdout
    assert "Chatting" not in result.stdout
    empty = subprocess.run(
        [sys.executable, "-m", "node", "chat", "--home", str(node.home)],
        input="  \n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert empty.returncode == 1
    assert "nothing to ask" in empty.stderr


def test_multi_line_messages() -> None:
    from node.chat_input import read_message

    def lines(*given: str) -> object:
        pending = iter(given)

        def read(prompt: str) -> str:
            try:
                return next(pending)
            except StopIteration:
                raise EOFError from None

        return read

    assert read_message(lines("hello")) == "hello"
    assert read_message(lines("one \\", "two \\", "three")) == "one \ntwo \nthree"
    assert read_message(lines('"""', "line 1", "", "line 2", '"""')) == "line 1\n\nline 2"
    assert read_message(lines('"""first', 'last"""')) == "first\nlast"
    with pytest.raises(EOFError):
        read_message(lines())
    with pytest.raises(EOFError):  # Ctrl-D inside a block leaves, sending nothing half-typed
        read_message(lines('"""', "half"))


def test_interactive_chat_edits_lines_and_keeps_history(node: NodeProcess) -> None:
    history = node.home / "chat_history"
    history.unlink(missing_ok=True)
    # readline's default key bindings, whatever ~/.inputrc the machine has
    env = {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1", "INPUTRC": "/dev/null"}
    argv = ["-m", "node", "chat", "--home", str(node.home), "--max-tokens", "24"]
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", timeout=60)
    try:
        child.expect_exact("you> ")
        # Typed with mistakes and fixed with the arrow keys, Home and End: only the edited
        # line reaches the model.
        child.send("capital of Frnce")
        child.send(LEFT * 3 + "a")
        child.send(HOME_KEY + "What is the ")
        child.send(END_KEY + "?\r")
        child.expect("Paris")
        child.expect_exact("you> ")
        child.send(UP)  # the last question comes back from the history
        child.expect_exact(QUESTION)
        child.send("\r")
        child.expect("Paris")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert history.read_text(encoding="utf-8").splitlines().count(QUESTION) >= 1
    assert oct(history.stat().st_mode & 0o777) == "0o600"
    assert "\x1b" not in history.read_text(encoding="utf-8")


def test_a_refused_question_is_said_and_the_session_goes_on(node: NodeProcess) -> None:
    argv = ["-m", "node", "chat", "--home", str(node.home), "-m", "no-such-model"]
    env = {**os.environ, "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", timeout=60)
    try:
        child.expect_exact("you> ")
        child.send("hi\r")
        child.expect_exact("404")
        child.expect_exact("you> ")  # still chatting
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
