"""The `raylane model` commands, run through typer's test runner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from control_plane.cli import app

runner = CliRunner()


def test_make_tiny_then_generate(tmp_path):
    model_dir = tmp_path / "llama"
    result = runner.invoke(app, ["model", "make-tiny", "--arch", "llama", "--out", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    result = runner.invoke(app, ["model", "generate", str(model_dir), "Hello there", "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Hello there")


def test_generate_with_adapter(tmp_path):
    model_dir, lora_dir = tmp_path / "llama", tmp_path / "lora"
    assert runner.invoke(app, ["model", "make-tiny", "--out", str(model_dir)]).exit_code == 0
    result = runner.invoke(app, ["model", "make-lora", str(model_dir), "--out", str(lora_dir), "--rank", "4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["model", "generate", str(model_dir), "Hi", "--adapter", str(lora_dir)])
    assert result.exit_code == 0, result.output


def test_unknown_arch_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["model", "make-tiny", "--arch", "gpt9", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "unknown arch" in result.output


def test_bad_sampling_value_is_reported_without_traceback(tmp_path):
    model_dir = tmp_path / "llama"
    assert runner.invoke(app, ["model", "make-tiny", "--out", str(model_dir)]).exit_code == 0
    result = runner.invoke(app, ["model", "generate", str(model_dir), "Hi", "--top-p", "2"])
    assert result.exit_code == 2
    assert "top_p" in result.output and "Traceback" not in result.output
