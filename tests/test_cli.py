"""run_cli: a user's mistake is one line on stderr and exit status 2; --debug and bugs keep the traceback."""

import subprocess
import sys

import pytest
import yaml

from diffusers_repa.cli import DEBUG_ENV, UserError, run_cli
from diffusers_repa.training.run_lock import OutputDirInUseError


def failing(error: BaseException):
    def main(argv: list[str]) -> None:
        print("working...")
        raise error

    return main


@pytest.mark.parametrize(
    "error",
    [
        ValueError("--cfg_prob must be in [0, 1), got 2.0."),
        FileNotFoundError("--resume_from_checkpoint ckpt: no such checkpoint folder."),
        NotADirectoryError("--output_dir run is a file."),
        OutputDirInUseError("run is in use by another training run (pid 7)."),
        UserError("the dataset has no label column."),
    ],
)
def test_a_user_error_is_one_line_and_status_2(error, capsys):
    assert run_cli(failing(error), [], prog="train_repa.py") == 2
    out, err = capsys.readouterr()
    assert out == "working...\n" and err == f"train_repa.py: error: {error}\n"


def test_a_multi_line_message_ends_with_its_summary(capsys):
    error = UserError(
        "Cannot start training: the VAE 'x' cannot be read.\n  - the VAE 'x': not found\nFor a smoke run: ..."
    )
    assert run_cli(failing(error), [], prog="train_repa.py") == 2
    assert capsys.readouterr().err.splitlines() == [
        "  - the VAE 'x': not found",
        "For a smoke run: ...",
        "train_repa.py: error: Cannot start training: the VAE 'x' cannot be read.",
    ]


def test_a_broken_yaml_config_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_train_steps: 10\nlearning_rate: [1e-4\n")

    def main(argv: list[str]) -> None:
        with open(config) as handle:
            yaml.safe_load(handle)

    assert run_cli(main, [], prog="train_repa.py") == 2
    assert capsys.readouterr().err == (
        f"train_repa.py: error: invalid YAML in {config}, line 3, column 1: expected ',' or ']', but got "
        "'<stream end>' (while parsing a flow sequence)\n"
    )


def test_debug_flag_and_environment_reraise_with_the_traceback(monkeypatch):
    seen = []

    def main(argv: list[str]) -> None:
        seen.append(argv)
        raise ValueError("bad value")

    with pytest.raises(ValueError, match="bad value"):
        run_cli(main, ["--seed", "1", "--debug"])
    assert seen == [["--seed", "1"]]  # the script's parser never sees --debug
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="bad value"):
        run_cli(main, [])


def test_a_bug_keeps_its_traceback_and_the_status_comes_from_main():
    with pytest.raises(KeyError):
        run_cli(failing(KeyError("step")), [])
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3


def test_importing_it_loads_neither_torch_nor_the_package():
    code = "import sys, diffusers_repa.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
