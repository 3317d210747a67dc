""".ci/run fails when one of its steps fails, and CI fails when a prerequisite is missing.

The script runs for real (bash, coreutils' timeout, grep) in a copy of `.ci/` whose PATH
holds fakes of what lies outside it: `python3 -m venv` builds a `.venv` of recording
scripts (pip, ruff, mypy, coverage) and `apt-get` is told to fail or do nothing. The
prerequisite checks run the real tests with the browser or `dot` out of reach."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("bash", "dirname", "timeout", "grep", "rm", "mkdir", "cat", "chmod", "touch", "sleep")

FAKE_PYTHON3 = """#!/bin/bash
# python3 -m venv --clear .venv: a venv whose tools record their arguments and exit as told
[ "$1 $2" = "-m venv" ] || exit 99
echo "python3 $*" >>"$LOG"
rm -rf .venv
mkdir -p .venv/bin
for tool in pip ruff mypy coverage; do
  cat >.venv/bin/$tool <<'TOOL'
#!/bin/bash
name=${0##*/}
echo "$name${*:+ $*}" >>"$LOG"
case "$name $1" in
  "pip install") exit "${FAKE_PIP_INSTALL:-0}" ;;
  "pip freeze") echo "${FAKE_FREEZE:-pytest==9.2.0}" ;;
  "coverage run") exit "${FAKE_PYTEST:-0}" ;;
  "mypy "*) exit "${FAKE_MYPY:-0}" ;;
esac
TOOL
  chmod +x .venv/bin/$tool
done
"""

FAKE_APT_GET = """#!/bin/bash
echo "apt-get $*" >>"$LOG"
if [ "$1" = install ] && [ "${FAKE_APT:-ok}" = ok ]; then
  for pkg in "$@"; do
    [ "$pkg" = chromium ] && touch "$FLOWBOT_CHROMIUM" && chmod +x "$FLOWBOT_CHROMIUM"
    [ "$pkg" = graphviz ] && printf '#!/bin/bash\\n' >"$FAKE_BIN/dot" && chmod +x "$FAKE_BIN/dot"
  done
fi
[ "${FAKE_APT:-ok}" != fail ]
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_ci(tmp_path: Path, *, chromium: bool = True, dot: bool = True, stale_venv: bool = False,
           **fakes: str) -> tuple[int, list[str], str]:
    """Run a copy of .ci/run; return its exit status, the commands it ran, its stderr."""
    repo, bin_dir, tools = tmp_path / "repo", tmp_path / "bin", tmp_path / "tools"
    for d in (repo / ".ci", bin_dir, tools):
        d.mkdir(parents=True)
    for name in ("run", "constraints.txt"):
        shutil.copy(ROOT / ".ci" / name, repo / ".ci" / name)
    for tool in TOOLS:  # only these from the system: no real python3, apt-get or dot
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    _script(bin_dir / "python3", FAKE_PYTHON3)
    _script(bin_dir / "apt-get", FAKE_APT_GET)
    if dot:
        _script(bin_dir / "dot", "#!/bin/bash\n")
    browser = tmp_path / "chromium"
    if chromium:
        _script(browser, "#!/bin/bash\n")
    if stale_venv:  # the case: an old .venv whose tools all pass
        (repo / ".venv" / "bin").mkdir(parents=True)
        for tool in ("pip", "ruff", "mypy", "coverage", "python"):
            _script(repo / ".venv" / "bin" / tool, "#!/bin/bash\n")
    log = tmp_path / "log"
    log.touch()
    env = {"PATH": f"{bin_dir}:{tools}", "LOG": str(log), "FLOWBOT_CHROMIUM": str(browser),
           "FAKE_BIN": str(bin_dir), **{f"FAKE_{k.upper()}": v for k, v in fakes.items()}}
    proc = subprocess.run([shutil.which("bash") or "bash", str(repo / ".ci" / "run")], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text().splitlines(), proc.stderr


STEPS = [
    "python3 -m venv --clear .venv",
    "pip install -q -e .[test] -c .ci/constraints.txt",
    "pip check",
    "pip freeze --exclude-editable",
    "ruff check .",
    "mypy",
    "coverage run -m pytest -p no:cacheprovider",
    "coverage combine -q",
    "coverage report",
]


def test_a_run_whose_steps_pass_runs_every_step_in_order(tmp_path: Path) -> None:
    # what the failing cases below are compared with: the fakes do stand in for the tools
    status, ran, err = run_ci(tmp_path)
    assert (status, ran) == (0, STEPS), err


def test_a_failing_install_fails_the_run_even_with_a_stale_venv(tmp_path: Path) -> None:
    status, ran, _ = run_ci(tmp_path, stale_venv=True, pip_install="1")
    assert status != 0
    assert ran == STEPS[:2]  # nothing ran against the old venv


def test_pytest_finding_no_tests_fails_the_run(tmp_path: Path) -> None:
    status, ran, _ = run_ci(tmp_path, pytest="5")
    assert status == 5
    assert ran == STEPS[:7]


def test_failing_lint_fails_the_run(tmp_path: Path) -> None:
    status, ran, _ = run_ci(tmp_path, mypy="1")
    assert status == 1 and ran == STEPS[:6]


def test_a_package_missing_from_the_constraints_fails_the_run(tmp_path: Path) -> None:
    status, ran, err = run_ci(tmp_path, freeze="leftpad==1.0")
    assert status == 1 and ran == STEPS[:4]
    assert "not pinned in .ci/constraints.txt" in err and "leftpad==1.0" in err


def test_a_pin_matches_whatever_spelling_pip_freeze_uses(tmp_path: Path) -> None:
    # pip freeze prints prometheus_client; the constraints say prometheus-client: one package
    status, ran, err = run_ci(tmp_path, freeze="Prometheus_Client==0.26.0")
    assert (status, ran) == (0, STEPS), err


@pytest.mark.parametrize("apt", ["fail", "nothing"])
def test_a_browser_that_cannot_be_installed_fails_the_run(tmp_path: Path, apt: str) -> None:
    status, ran, err = run_ci(tmp_path, chromium=False, apt=apt)
    assert status != 0
    assert ran[0] == "apt-get update -qq"
    assert not any(r.startswith(("python3", "pip", "coverage")) for r in ran)
    if apt == "nothing":
        assert "chromium is missing after 'apt-get install chromium'" in err


def test_missing_browser_and_dot_are_installed_then_the_run_goes_on(tmp_path: Path) -> None:
    status, ran, err = run_ci(tmp_path, chromium=False, dot=False)
    assert status == 0, err
    assert ran == ["apt-get update -qq", "apt-get install -y -qq chromium graphviz", *STEPS]


def test_dot_that_cannot_be_installed_fails_the_run(tmp_path: Path) -> None:
    status, ran, err = run_ci(tmp_path, dot=False, apt="nothing")
    assert status == 1 and "dot is missing" in err
    assert ran == ["apt-get update -qq", "apt-get install -y -qq graphviz"]


# -- the tests themselves: a missing prerequisite fails under CI, skips with a reason locally


def _pytest(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "COVERAGE_PROCESS_CONFIG")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          env={**base, **env}, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_browser_or_dot_fails_under_ci_and_skips_locally(tmp_path: Path, ci: str) -> None:
    # no chromium where the tests look, and a PATH without graphviz (python runs by full path)
    browser = tmp_path / "no-chromium"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py",
         "tests/test_config.py::test_graphviz_renders_the_dot_graph"],
        env={**{k: v for k, v in os.environ.items() if k not in ("CI", "COVERAGE_PROCESS_CONFIG")},
             "CI": ci, "FLOWBOT_CHROMIUM": str(browser), "PATH": "/nonexistent"},
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1]  # e.g. "1 failed, 5 errors in 0.4s"
    assert f"prerequisite missing: the browser {browser}" in proc.stdout
    assert "prerequisite missing: graphviz's dot" in proc.stdout
    if ci:  # every one fails (the browser's in set-up: errors); none passes or skips
        assert proc.returncode == 1, proc.stdout
        assert "1 failed" in summary and " error" in summary and "passed" not in summary
        assert "skipped" not in summary and "CI=true, so this fails instead of skipping" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout
        assert "skipped" in summary and "passed" not in summary and "fail" not in summary
