"""`pip install -e .`: pyproject.toml takes its dependencies from requirements.txt, line by line."""

from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def test_every_requirement_line_is_one_requirement_for_setuptools():
    """setuptools drops whole-line comments only (an inline `# ...` would make the line an invalid requirement)."""
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    kept = [line for line in lines if line and not line.startswith("#")]  # setuptools' _parse_requirements_list
    names = [Requirement(line).name for line in kept]
    assert "torch" in names and "transformers" in names and len(set(names)) == len(names)
