"""Every bad input ends a command with exit status 2 and one line naming what was wrong
and what is accepted, never a traceback; ``--debug`` shows the traceback instead.

Most probes call ``controltune.cli.main`` in-process and read stderr with ``capsys``; a
few run the console script in a subprocess to prove no traceback reaches the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controltune.cli import error_message, main
from controltune.zoo import CheckpointFolderError, available_devices, load_model, max_positions, offline_tokenizer

ROWS = [{"text": f"sentence number {i}", "label": i % 2} for i in range(20)]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Rows as JSONL; a str row is written verbatim (a malformed line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> str:
    """A folder task (train.jsonl + dev.jsonl) of 20 short sentences."""
    folder = tmp_path_factory.mktemp("task")
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "dev.jsonl", ROWS[:6])
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders of a random BERT: complete, without tokenizer, without weights, without config."""
    root = tmp_path_factory.mktemp("models")
    loaded = load_model("random:bert")
    out = {name: root / name for name in ("complete", "no_tokenizer", "no_weights", "no_config")}
    loaded.model.save_pretrained(out["complete"])
    loaded.tokenizer.save_pretrained(out["complete"])
    loaded.model.save_pretrained(out["no_tokenizer"])
    loaded.model.config.save_pretrained(out["no_weights"])
    loaded.tokenizer.save_pretrained(out["no_weights"])
    out["no_config"].mkdir()
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and the error line of ``controltune argv`` (asserting there is exactly one)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"controltune {argv[0]}: error:")]
    assert len(lines) == 1, err
    return code, lines[0]


def train(task: str, *extra: str, model: str = "random:bert", method: str = "lora") -> list[str]:
    return ["train", "--model", model, "--method", method, "--task", task, "--steps", "1", "--batch-size", "4",
            "--max-length", "16", "--no-progress", *extra]


# --- model folders ------------------------------------------------------------------------


def test_folder_without_tokenizer_is_refused(capsys, folders, task) -> None:
    code, line = run_cli(capsys, *train(task, model=str(folders["no_tokenizer"])))
    assert code == 2
    assert str(folders["no_tokenizer"]) in line
    assert "no tokenizer files" in line and "tokenizer.json" in line and "vocab.txt" in line


def test_folder_without_tokenizer_loads_with_a_given_tokenizer(folders) -> None:
    with pytest.raises(CheckpointFolderError, match="no tokenizer files"):
        load_model(str(folders["no_tokenizer"]))
    loaded = load_model(str(folders["no_tokenizer"]), tokenizer=str(folders["complete"]))
    ids = loaded.tokenizer("a gripping film")["input_ids"]
    assert loaded.tokenizer.unk_token_id not in ids  # real words, not [UNK]
    assert load_model(str(folders["complete"])).tokenizer.get_vocab() == offline_tokenizer().get_vocab()


def test_folder_without_weights_is_refused(capsys, folders, task) -> None:
    code, line = run_cli(capsys, *train(task, model=str(folders["no_weights"])))
    assert code == 2
    assert str(folders["no_weights"]) in line and "no weights" in line
    assert "model.safetensors" in line and "pytorch_model.bin" in line and "index.json" in line


def test_folder_without_config_is_refused(capsys, folders, task) -> None:
    code, line = run_cli(capsys, *train(task, model=str(folders["no_config"])))
    assert code == 2
    assert "no config.json" in line and str(folders["no_config"].resolve()) in line


def test_unknown_model_name(capsys, task) -> None:
    code, line = run_cli(capsys, *train(task, model="random:gpt5"))
    assert code == 2
    assert "unknown model 'random:gpt5'" in line and "random:bert" in line


# --- devices --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps", "tpu"])
def test_unavailable_device_is_refused_before_loading(capsys, device) -> None:
    if device in available_devices() or (device == "cuda" and "cuda:0" in available_devices()):
        pytest.skip(f"{device} is available here")
    # The task does not exist: the device must be refused before the task (or the model) is read.
    code, line = run_cli(capsys, *train("/no/such/task.jsonl", "--device", device))
    assert code == 2
    assert repr(device) in line and "available: cpu" in line
    assert "task" not in line


# --- sequence lengths -------------------------------------------------------------------------


def test_max_length_beyond_positions(capsys, task) -> None:
    code, line = run_cli(capsys, *train(task, "--max-length", "1024"))
    assert code == 2
    assert "--max-length 1024 exceeds the 512 positions" in line and "random:bert" in line


def test_seq_len_beyond_rotary_positions(capsys) -> None:
    code, line = run_cli(capsys, "verify", "--model", "random:llama", "--methods", "lora", "--seq-len", "4096")
    assert code == 2
    assert "--seq-len 4096 exceeds the 512 positions of model random:llama" in line


def test_rollout_max_length(capsys) -> None:
    code, line = run_cli(capsys, "rollout", "--model", "random:gpt2", "--max-length", "600")
    assert code == 2
    assert "exceeds the 512 positions" in line


def test_max_positions_of_each_family() -> None:
    assert max_positions(load_model("random:gpt2")) == 512  # n_positions
    assert max_positions(load_model("random:llama")) == 512  # rotary, but with a declared maximum
    assert max_positions(load_model("random:roberta")) == 513  # 514 rows, numbered from pad_token_id + 1 = 1


# --- controller options -----------------------------------------------------------------------


def test_unknown_option_lists_accepted(capsys, task) -> None:
    code, line = run_cli(capsys, *train(task, "--opt", "rnk=4"))
    assert code == 2
    assert "lora has no option 'rnk' (did you mean rank?)" in line
    assert "accepted options of lora: rank, alpha, targets, layers, seed, weight_decay" in line


def test_unknown_option_of_a_combination_part(capsys, task) -> None:
    code, line = run_cli(capsys, *train(task, "--opt", "lora.rnk=4", method="lora+bitfit"))
    assert code == 2
    assert "option 'lora.rnk': lora has no option 'rnk' (did you mean lora.rank?)" in line
    assert "accepted options of lora: rank" in line
    code, line = run_cli(capsys, *train(task, "--opt", "rank=4", method="lora+bitfit"))
    assert code == 2 and "prefix each option with its part (lora.KEY, bitfit.KEY)" in line


@pytest.mark.parametrize(("opt", "message"), [
    ("alpha=0", "lora: alpha must be a positive number, got 0"),
    ("targets=", "lora: targets is empty, so nothing would be tuned but the head"),
    ("targets=[]", "lora: targets is empty"),
    ("rank=2.5", "lora: rank must be an integer >= 1, got 2.5"),
    ("rank=0", "lora: rank must be an integer >= 1, got 0"),
    ("rank=four", "lora: rank must be an integer >= 1, got 'four'"),
    ("targets=q,nosuch", "target 'nosuch' matches no module of family 'bert'; roles: attn"),
    ("layers=1.5", "layers must be block indices"),
    ("layers=7", "layers [7] out of range: the model has 3 blocks"),
    ("targets=[q", "--opt 'targets=[q': the value is not valid JSON"),
])
def test_lora_options_on_the_command_line(capsys, task, opt, message) -> None:
    code, line = run_cli(capsys, *train(task, "--opt", opt))
    assert code == 2
    assert message in line


@pytest.mark.parametrize(("method", "options", "message"), [
    ("lora", {"alpha": 0.0}, "alpha must be a positive number"),
    ("lora", {"rank": -1}, "rank must be an integer >= 1"),
    ("lora", {"targets": 5}, "targets must be module roles such as q,v"),
    ("adapter", {"bottleneck": 0}, "adapter: bottleneck size must be an integer >= 1"),
    ("pfeiffer", {"bottleneck": 2.5}, "pfeiffer: bottleneck size must be an integer >= 1, got 2.5"),
    ("parallel_adapter", {"bottleneck": -4}, "parallel_adapter: bottleneck size must be an integer >= 1"),
    ("closed_loop_prefix", {"n_prefix": 0}, "closed_loop_prefix: n_prefix must be an integer >= 1"),
    ("parallel_control", {"rank": 0}, "parallel_control: rank must be an integer >= 1"),
    ("arbitrary", {"group_size": 0}, "arbitrary: group_size must be an integer >= 1"),
    ("costate_lora", {"alpha": 0}, "costate_lora: alpha must be a positive number"),
    ("prefix", {"length": 0}, "prefix: length must be an integer >= 1"),
    ("prompt", {"n_tokens": 1.5}, "prompt: n_tokens must be an integer >= 1, got 1.5"),
    ("subspace", {"dim": 0}, "subspace: dim must be an integer >= 1"),
    ("unipelt", {"lora_rank": 2.5}, "unipelt: lora_rank must be an integer >= 1"),
    ("unipelt", {"lora_targets": []}, "unipelt: lora_targets is empty"),
    ("ia3", {"targets": []}, "ia3: targets is empty"),
    ("last_layer", {"n_layers": 0}, "last_layer: n_layers must be an integer >= 1"),
])
def test_controller_constructors_validate(method, options, message) -> None:
    from controltune.controllers.base import construct

    with pytest.raises(ValueError) as info:
        construct(method, options)
    assert message in str(info.value)


def test_wrong_type_of_option_becomes_a_value_error() -> None:
    from controltune.controllers.base import construct

    with pytest.raises(ValueError, match="combination: bad options"):
        construct("combination", {"parts": 5})


# --- data ---------------------------------------------------------------------------------


def test_single_file_task_holds_out_dev(capsys, tmp_path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", ROWS)
    assert main(train(str(path))) == 0
    err = capsys.readouterr().err
    assert f"{path} is a single file: holding out 2 of its 20 rows (10%, seed 0) as the dev split" in err


@pytest.mark.parametrize(("bad_line", "problem"), [
    ('{"text": "broken", "label": 1', "line 2: invalid JSON"),
    ({"text": "no label"}, "line 2: missing key 'label'"),
])
def test_malformed_data_file_names_file_and_line(capsys, tmp_path, bad_line, problem) -> None:
    folder = tmp_path / "bad"
    write_jsonl(folder / "train.jsonl", [ROWS[0], bad_line, ROWS[1]])
    write_jsonl(folder / "dev.jsonl", ROWS[:2])
    code, line = run_cli(capsys, *train(str(folder)))
    assert code == 2
    assert f"{folder / 'train.jsonl'}, {problem}" in line


def test_unknown_task(capsys, tmp_path) -> None:
    code, line = run_cli(capsys, *train(str(tmp_path / "nowhere")))
    assert code == 2
    assert "does not exist" in line and "sst2, mrpc, rte, cola" in line


# --- verify ---------------------------------------------------------------------------------


def test_unknown_method_has_no_extra_quotes(capsys) -> None:
    code, line = run_cli(capsys, "verify", "--model", "random:bert", "--methods", "lora,nosuch")
    assert code == 2
    assert line.startswith("controltune verify: error: unknown method(s) ['nosuch']; registered: ")


class _NaNBackward(torch.autograd.Function):
    """Identity forward, NaN backward: a co-state that turns non-finite at one block."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_verify_table_names_the_layer_of_a_nonfinite_costate(capsys, monkeypatch) -> None:
    from controltune.system import ResidualSystem

    step = ResidualSystem.step

    def nan_at_block_1(self, layer, x, ctx):
        out = step(self, layer, x, ctx)
        return _NaNBackward.apply(out) if layer == 1 else out

    monkeypatch.setattr(ResidualSystem, "step", nan_at_block_1)
    code = main(["verify", "--model", "random:gpt2", "--methods", "lora", "--no-fd", "--seq-len", "8"])
    out = capsys.readouterr().out
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("lora "))
    assert "failed" in row and "CoStateError: co-state p_1 (layer 1)" in row
    assert "first appearing in the VJP of block 1" in row and "backward pass overflowed" in row


# --- the error line itself -------------------------------------------------------------------


def test_error_message_forms() -> None:
    assert error_message(KeyError("unknown method 'x'")) == "unknown method 'x'"
    assert error_message(FileNotFoundError(2, "No such file or directory", "/a/b")) == \
        "No such file or directory: /a/b"
    assert error_message(ValueError("two\nlines")) == "two lines"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(task, where) -> None:
    argv = train(task, "--opt", "rnk=4")
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ValueError, match="lora has no option 'rnk'"):
        main(argv)


def _console(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "controltune.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def test_subprocess_prints_one_line_and_no_traceback(folders, task) -> None:
    proc = _console(*train(task, model=str(folders["no_weights"])))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [line for line in errors if line.startswith("controltune train: error: model folder ")]
    assert len(errors) == 1

    proc = _console(*train(task, "--device", "cuda:3"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "controltune train: error: device 'cuda:3' cannot be used: CUDA is not available on this machine; "
        f"available: {', '.join(available_devices())}"] or "cuda:3" in available_devices()


def test_subprocess_debug_prints_the_traceback(task) -> None:
    proc = _console("--debug", *train(task, "--opt", "rank=2.5"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "lora: rank must be an integer >= 1, got 2.5" in proc.stderr
