from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash\n")[1:3]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    run_main, run_tests = _commands()
    assert "fedrec simulate" in run_main and "pytest" in run_tests
    assert run_tests in (ROOT / ".ci" / "run").read_text().splitlines()
