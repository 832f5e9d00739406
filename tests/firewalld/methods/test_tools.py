"""Running the firewall tools: stdout back, any failure as one RequestError line."""

from __future__ import annotations

import sys

import pytest
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.methods.tools import run_tool


def test_stdin_in_stdout_out() -> None:
    assert run_tool(["cat"], "*nat\nCOMMIT\n") == "*nat\nCOMMIT\n"


def test_failure_names_the_tool_the_status_and_the_first_complaint() -> None:
    script = "import sys; print(); print('bad rule', file=sys.stderr); print('more', file=sys.stderr); sys.exit(3)"  # noqa: E501
    with pytest.raises(RequestError) as failed:
        run_tool([sys.executable, "-c", script])
    assert str(failed.value) == f"{sys.executable} failed (exit 3): bad rule"


def test_missing_tool() -> None:
    with pytest.raises(RequestError, match="no-such-tool failed"):
        run_tool(["no-such-tool"])


def test_arguments_are_not_a_shell() -> None:
    assert run_tool(["echo", "$(id); `id`"]) == "$(id); `id`\n"
