"""`cli.py serve` mistakes: each one `error:` line naming the file or option and what to do, exit code 2, and
the server never starts."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import cli_in_process


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("the server started"))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("content, says", [
    (b"", "empty.ckpt: an empty file (0 bytes"),
    (bytes(range(7, 250)) * 40, "random.ckpt: not a PyTorch file (it starts with bytes 07 08 09 0a"),
    (b"\x80" + bytes(range(1, 200)) * 10, "pickle.ckpt: a damaged or foreign file, not a model checkpoint"),
])
def test_a_file_that_is_no_checkpoint_is_called_what_it_is(content, says, tmp_path, capsys):
    """0 bytes was an EOFError then IndexError traceback; random bytes were called "pickled Python objects"."""
    name = says.split(":")[0]
    (tmp_path / name).write_bytes(content)
    assert cli_in_process("serve", "--run", str(tmp_path / name)) == 2
    line = one_error_line(capsys)
    assert says in line and "pickled Python objects" not in line, line


@pytest.mark.parametrize("option, value, says", [
    ("--port", "70000", "--port 70000: a TCP port is 1-65535"),
    ("--port", "0", "--port 0: a TCP port is 1-65535"),
    ("--decode_slots", "0", "--decode_slots 0: must be at least 1"),
    ("--decode_seconds", "0", "--decode_seconds 0.0: must be a positive number of seconds"),
    ("--read_timeout", "-1", "--read_timeout -1.0: must be a positive number of seconds"),
])
def test_an_option_that_cannot_work_is_one_error_line(option, value, says, served, capsys):
    """--port 70000 was an OverflowError traceback; --decode_slots 0 made every request hang."""
    assert cli_in_process("serve", "--run", str(served.run_dir), option, value) == 2
    assert says in one_error_line(capsys)


def test_a_busy_port_is_one_error_line_and_exit_2(served, capsys):
    """uvicorn logged the bind error and exited with 3."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_in_process("serve", "--run", str(served.run_dir), "--port", str(port)) == 2
    line = one_error_line(capsys)
    assert f"--port {port}: already in use on 127.0.0.1" in line and "--port" in line.split(";")[1]
