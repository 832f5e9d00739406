"""The upload: the agent's import closure, and the bundle booting on a bare server python."""

import json
import subprocess
from pathlib import Path

import pytest
import shuttle_agent
from shuttle_client.upload import MSGPACK_MODULES, PACKAGES, bundle_modules

SERVER_PYTHON = "/usr/bin/python3"  # Debian's: no msgpack installed

CLOSURE_PROBE = """
import json, sys
exec(open(sys.argv[1]).read())
modules = json.load(open(sys.argv[2]))
sys.meta_path.insert(0, BundleFinder({k: tuple(v) for k, v in modules.items()}))
import shuttle_agent.main
import msgpack
print(json.dumps({
    "loaded": sorted(sys.modules),
    "stdlib": sorted(sys.stdlib_module_names),
    "fallback": msgpack.Unpacker.__module__,
}))
"""


@pytest.fixture
def bundle_file(tmp_path: Path) -> Path:
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle_modules()))
    return path


def test_bundle_names_exactly_what_it_ships() -> None:
    modules = bundle_modules()
    tops = {name.split(".")[0] for name in modules}
    assert tops == {*PACKAGES, "msgpack"}
    assert {n for n in modules if n.startswith("msgpack")} == set(MSGPACK_MODULES)
    assert "shuttle_agent.bootstrap" not in modules
    assert modules["shuttle_agent"][0] and not modules["shuttle_agent.main"][0]


def test_import_closure_is_stdlib_plus_bundle(bundle_file: Path) -> None:
    probe = subprocess.run([SERVER_PYTHON, "-c", "import msgpack"], check=False)
    if probe.returncode == 0:
        pytest.fail(f"{SERVER_PYTHON} has msgpack: this test needs a python without it")
    bootstrap = Path(shuttle_agent.__file__).with_name("bootstrap.py")
    result = subprocess.run(
        [SERVER_PYTHON, "-I", "-S", "-c", CLOSURE_PROBE, str(bootstrap), str(bundle_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout)
    bundled = set(json.loads(bundle_file.read_text()))
    stdlib = set(report["stdlib"])
    foreign = [
        name
        for name in report["loaded"]
        if name not in bundled and name.split(".")[0] not in stdlib and name != "__main__"
    ]
    assert foreign == []
    assert report["fallback"] == "msgpack.fallback"
