"""The README stays true: its Quick start runs, its commands are CI's."""

import os
import pathlib
import re
import runpy

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_quick_start_runs(tmp_path, monkeypatch):
  (code,) = [b for b in _blocks("python") if "nnx.Optimizer" in b]
  code = code.replace("/tmp/mlp_1bit.safetensors",
                      str(tmp_path / "mlp_1bit.safetensors"))
  script = tmp_path / "quick_start.py"
  script.write_text(code)
  monkeypatch.chdir(tmp_path)
  ns = runpy.run_path(str(script))
  assert ns["report"].rows  # the size table has a row per leaf
  assert os.path.getsize(tmp_path / "mlp_1bit.safetensors") > 0


def test_fresh_machine_commands_match_ci():
  bash = _blocks("bash")
  test_cmd = next(b for b in bash if "pytest" in b).strip()
  assert test_cmd == ("python3 -m venv .venv && .venv/bin/pip install -e "
                      "'.[test]' && .venv/bin/python -m pytest -q")
  ci = (REPO / ".ci" / "run").read_text()  # the same steps, quieter pip
  for step in ("python3 -m venv .venv", ".venv/bin/pip install -q -e '.[test]'",
               ".venv/bin/python -m pytest -q"):
    assert step in ci
  main_cmd = next(b for b in bash if "experiments.compare" in b).strip()
  assert main_cmd.startswith("python3 -m venv .venv && .venv/bin/pip install "
                             "-e '.[experiments]' && ")
  assert "--config experiments/configs/quick.py" in main_cmd
  assert (REPO / "experiments" / "configs" / "quick.py").exists()
