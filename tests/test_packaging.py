"""The project as installed and run: `pip install -e .` (pyproject.toml takes its dependencies from
requirements-runtime.txt, line by line; requirements.txt adds the tests' tools) and its three command lines."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _requirements(name: str) -> list[str]:
    lines = [line.strip() for line in (REPO / name).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]  # setuptools' _parse_requirements_list


def test_every_runtime_requirement_line_is_one_requirement_for_setuptools():
    """setuptools drops whole-line comments only (an inline `# ...` would make the line an invalid requirement), and
    reads no `-r` lines: `pip install .` gets the runtime alone, the README's `pip install -r requirements.txt` the
    runtime and the tests' tools (pytest, peft, tensorboard, ruff), which a user of the library does not need."""
    runtime = [Requirement(line).name for line in _requirements("requirements-runtime.txt")]
    assert "torch" in runtime and "transformers" in runtime and len(set(runtime)) == len(runtime)
    everything = _requirements("requirements.txt")
    assert everything[0] == "-r requirements-runtime.txt"
    tools = [Requirement(line).name for line in everything[1:]]
    assert "pytest" in tools and not set(tools) & set(runtime)


def test_the_requirements_pin_admits_no_transformers_older_than_the_model_codes_minimum():
    """The pin (what training and the tests install) and the minimum of the two files that travel to the Hub (what
    loading an export needs; they cannot read a requirements file) are different facts: the pin may be the newer one,
    but an older pin would let the project install a transformers that its own exports refuse."""
    from modeling_gpt2_scratch.configuration_gpt2_scratch import MIN_TRANSFORMERS_VERSION

    lines = _requirements("requirements-runtime.txt")
    transformers = next(Requirement(line) for line in lines if line.startswith("transformers"))
    pinned = [Version(spec.version) for spec in transformers.specifier if spec.operator == ">="]
    assert len(pinned) == 1 and Version(MIN_TRANSFORMERS_VERSION) <= pinned[0]


def test_the_requirements_pin_admits_no_torch_that_transformers_refuses():
    """transformers disables a torch older than its own floor (5.24: `requires PyTorch >= 2.6`, checked with 2.4.1):
    a lower pin would let `pip install .` set up a torch that the model cannot run with."""
    from transformers.dependency_versions_table import deps

    def floor(requirement: Requirement) -> Version:
        return max(Version(spec.version) for spec in requirement.specifier if spec.operator == ">=")

    torch = next(Requirement(line) for line in _requirements("requirements-runtime.txt") if line.startswith("torch"))
    assert floor(torch) >= floor(Requirement(deps["torch"]))


@pytest.mark.parametrize(
    "module, argv",
    [
        ("train_accelerate", ["--no_such_flag", "1"]),  # logging is set up before the flags are read
        ("modeling_gpt2_scratch.data", ["prepare", "--no_such_flag", "1"]),
        ("push_to_hub", ["--help"]),
    ],
)
def test_a_command_line_logs_its_own_info_lines_and_only_warnings_from_libraries(module, argv):
    """A library's INFO lines stay out of the output: on a fresh GPU machine the trainer's log ended with
    matplotlib's "INFO matplotlib.font_manager: generated new fontManager" (the loss plot), as the root logger was
    at INFO. The command's own INFO lines ("Reusing the shards in ...", "Uploading ...") still show."""
    code = textwrap.dedent(f"""
        import contextlib, io, logging
        import {module} as cli
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            cli.main({argv!r})
        logging.getLogger("matplotlib.font_manager").info("LIBRARY-INFO")
        logging.getLogger("accelerate.utils").warning("LIBRARY-WARNING")
        logging.getLogger("modeling_gpt2_scratch.hub").info("OUR-INFO")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LIBRARY-WARNING" in result.stderr and "OUR-INFO" in result.stderr, result.stderr
    assert "LIBRARY-INFO" not in result.stderr
