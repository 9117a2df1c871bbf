"""No remote code: a model folder whose config names Python code (``auto_map``) fails at once, in one line, never prompts.

The folder is a tiny embedded Llama saved with ``save_pretrained`` whose config.json gets an
``auto_map`` pointing at ``custom_code.py`` (and an unknown ``model_type``, so transformers has no
built-in class to fall back on and would need that code). Importing ``custom_code.py`` writes a
marker file: the marker must never appear.
"""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from constraints import ConfigError, ConstraintError, RewardModelConstraint

ROOT = Path(__file__).resolve().parents[1]
ONE_LINE = r"model.policy.name_or_path: .*custom needs custom code \(config.json auto_map: AutoConfig, AutoModelForCausalLM\), which is not run unless you set model.policy.trust_remote_code: true"
TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def write_custom_code_folder(folder: Path, marker: Path, head: str = "AutoModelForCausalLM") -> Path:
    """A tiny model folder that needs custom code; importing that code would create ``marker``."""
    from l3m_lightning.embedded.model import build_embedded_model
    from l3m_lightning.policy import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    build_embedded_model(tokenizer, TINY).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "l3m_custom_test"  # not a built-in type: only the folder's code could load it
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig", head: "custom_code.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_code.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('custom code ran')\n")
    return folder


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    marker = root / "MARKER"
    return write_custom_code_folder(root / "custom", marker), marker


def test_policy_and_tokenizer_refuse_custom_code_in_one_line(custom):
    from l3m_lightning.policy import load_policy, load_tokenizer

    folder, marker = custom
    with pytest.raises(ConfigError, match=ONE_LINE) as caught:
        load_policy(str(folder), load_tokenizer("embedded"))
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"model.policy.name_or_path: .* needs custom code"):
        load_tokenizer(str(folder))
    with pytest.raises(ConfigError, match=r"data.tokenizer: .* needs custom code"):
        load_tokenizer(str(folder), option="data.tokenizer")
    assert not marker.exists()


def test_tokenizer_config_auto_map_is_refused_too(tmp_path):
    from l3m_lightning.policy import load_tokenizer

    folder = tmp_path / "tok"
    load_tokenizer("embedded").save_pretrained(folder)
    spec = json.loads((folder / "tokenizer_config.json").read_text())
    spec["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"tokenizer_config.json auto_map: AutoTokenizer"):
        load_tokenizer(str(folder))


def test_reward_model_constraint_refuses_a_custom_code_folder_when_built(tmp_path):
    marker = tmp_path / "MARKER"
    folder = write_custom_code_folder(tmp_path / "rm", marker, head="AutoModelForSequenceClassification")
    with pytest.raises(ConfigError, match=r"constraint 'rm': model_name_or_path: .*rm needs custom code .* unless you set trust_remote_code: true"):
        RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(folder), name="rm")
    allowed = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(folder), name="rm", trust_remote_code=True)
    assert allowed.trust_remote_code and not marker.exists()  # allowed, but nothing imported before load()


def test_reward_model_trainer_refuses_custom_code(tmp_path):
    from l3m_lightning.reward.module import RewardModelModule

    marker = tmp_path / "MARKER"
    folder = write_custom_code_folder(tmp_path / "rm", marker, head="AutoModelForSequenceClassification")
    with pytest.raises(ConfigError, match=r"model.model_name_or_path: .* needs custom code .* model.trust_remote_code: true"):
        RewardModelModule(model_name_or_path=str(folder))
    assert not marker.exists()


def test_reward_model_load_error_is_a_constraint_and_config_error(tmp_path):
    c = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(tmp_path / "nothing"), name="rm")
    with pytest.raises(ConstraintError, match=r"constraint 'rm': could not load reward model: model_name_or_path: no such file or folder") as caught:
        c.load()
    assert isinstance(caught.value, ConfigError)


def _run_on_a_terminal(args: list[str], cwd: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a pseudo-terminal (as a person at a shell would); return (status, output)."""
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdin=child_fd, stdout=child_fd, stderr=child_fd, cwd=cwd, env=env, close_fds=True)
    os.close(child_fd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.5)
            if ready:
                try:
                    data = os.read(main_fd, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data and proc.poll() is not None:
                    break
                chunks.append(data)
                if b"[y/N]" in data:  # the prompt we must never show: answer nothing, fail below
                    break
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(main_fd)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_cli_on_a_terminal_fails_at_once_without_prompting(custom, tmp_path):
    folder, marker = custom
    status, output = _run_on_a_terminal(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
         "--model.policy.name_or_path", str(folder), "--trainer.max_steps", "1"], cwd=tmp_path)
    assert "[y/N]" not in output and "Do you wish to run the custom code" not in output
    assert status == 2, output[-2000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "needs custom code" in lines[0] and "model.policy.trust_remote_code: true" in lines[0], output[-2000:]
    assert "Traceback" not in output
    assert not marker.exists()
