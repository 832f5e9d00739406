"""The atheris harness (fuzz_stream.py) run for a bounded number of inputs: coverage-guided
fuzzing of the decoders on top of the hypothesis properties of test_stream.py and
test_frames.py. atheris comes with the test tools (make install)."""

import subprocess
import sys
from pathlib import Path

import atheris  # noqa: F401  (missing: the test tools are not installed, see the Makefile)

HARNESS = Path(__file__).with_name("fuzz_stream.py")
RUNS = 20_000  # about a second or two; the time limit is only a guard


def test_the_decoders_survive_coverage_guided_fuzzing(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-runs={RUNS}",
            "-max_total_time=60",
            f"-artifact_prefix={tmp_path}/",  # a crashing input is written here
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Done {RUNS} runs" in done.stderr
    assert list(tmp_path.iterdir()) == []
