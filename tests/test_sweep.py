"""``controltune sweep`` (issue 14): a grid run on Ray (or in-process when Ray cannot start), resumable, one JSONL."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from controltune import sweep, sweep_spec
from controltune.cli import main
from controltune.results import read_jsonl
from controltune.run_folder import drop_resume_state


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A separable toy sentiment task (32 train, 8 dev rows)."""
    folder = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    words = (["bad", "awful", "sad"], ["good", "great", "fine"])
    for split, n in (("train", 32), ("dev", 8)):
        with (folder / f"{split}.jsonl").open("w") as fh:
            for _ in range(n):
                y = rng.randint(0, 1)
                fh.write(json.dumps({"text": " ".join(rng.choice(words[y]) for _ in range(3)), "label": y}) + "\n")
    return folder


def _spec(tmp_path, task, **grid) -> str:
    """A 2x2 grid on random:bert (lora, bitfit) x (lr 1e-2, 1e30: diverges), 3 steps each, as YAML."""
    body = {"name": "toy", "grid": {"model": "random:bert", "method": ["lora", "bitfit"], "task": str(task),
                                    "lr": [1e-2, 1e30], **grid},
            "per_method": {"lora": {"options": {"rank": 2, "targets": ["q", "v"]}}},
            "train": {"steps": 3, "batch_size": 8, "max_length": 16}}
    path = tmp_path / "grid.yaml"
    import yaml

    path.write_text(yaml.safe_dump(body))
    return str(path)


def _check_rows(rows: list[dict]) -> None:
    by = {(r["config"]["method"], r["config"]["lr"]): r for r in rows}
    assert sorted(by) == [("bitfit", 1e-2), ("bitfit", 1e30), ("lora", 1e-2), ("lora", 1e30)]
    for method in ("lora", "bitfit"):
        ok, bad = by[(method, 1e-2)], by[(method, 1e30)]
        assert ok["status"] == "done" and 0 <= ok["score"] <= 1 and ok["scores"]["accuracy"] == ok["score"]
        assert bad["status"] == "diverged" and bad["score"] is None and "diverged at step" in bad["reason"]
        assert bad["diverged"]["step"] >= 1
        for row in (ok, bad):
            assert {"config", "versions", "wall_time_s", "peak_memory_mb", "cell", "threads"} <= set(row)
            assert row["config"]["steps"] == 3 and row["config"]["dtype"] == "float32" and row["threads"] == 1
            assert row["peak_memory_mb"] > 0 and row["wall_time_s"] > 0
    assert by[("lora", 1e-2)]["config"]["options"] == {"rank": 2, "targets": ["q", "v"]}
    assert by[("bitfit", 1e-2)]["config"]["options"] == {}


def test_sweep_runs_a_grid_records_divergence_and_skips_finished_cells(task, tmp_path, capsys):
    spec, out, summary = _spec(tmp_path, task), tmp_path / "rows.jsonl", tmp_path / "summary.json"
    code = main(["sweep", spec, "--out", str(out), "--cpus-per-cell", "1", "--json", str(summary)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = read_jsonl(out)
    _check_rows(rows)
    executor = json.loads(summary.read_text())["executor"]
    if executor == "ray":  # each cell ran in its own worker process, not here
        assert all(r["worker"]["pid"] != os.getpid() for r in rows)
    else:
        assert executor == "local" and "Ray could not start" in captured.err
    progress = [line for line in captured.out.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and sum("] done " in line for line in progress) == 2
    assert any("diverged lora lr=1e+30 options=" in line for line in progress)

    assert main(["sweep", spec, "--out", str(out)]) == 0  # everything finished: nothing runs, Ray not started
    assert "4 cells, 4 finished before, 0 to run" in capsys.readouterr().out
    assert len(read_jsonl(out)) == 4


def test_a_stopped_sweep_continues_in_process(task, tmp_path, capsys):
    spec, out = _spec(tmp_path, task), tmp_path / "rows.jsonl"
    assert main(["sweep", spec, "--out", str(out), "--executor", "local"]) == 0
    rows = read_jsonl(out)
    assert all(r["worker"]["pid"] == os.getpid() for r in rows)
    _check_rows(rows)
    # A stop after three cells: the fourth row was never written.
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    capsys.readouterr()
    assert main(["sweep", spec, "--out", str(out), "--executor", "local", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("finished:") == 3 and listing.count("to run:") == 1
    assert main(["sweep", spec, "--out", str(out), "--executor", "local"]) == 0
    assert "3 finished before, 1 to run" in capsys.readouterr().out
    again = read_jsonl(out)
    assert len(again) == 4 and again[3]["config"] == rows[3]["config"]
    _check_rows(again)


def test_auto_falls_back_to_this_process_when_ray_cannot_start(task, tmp_path, monkeypatch, capsys):
    def no_ray(address, cpus):
        raise RuntimeError("no Ray here")
    monkeypatch.setattr(sweep, "start_ray", no_ray)
    spec = sweep_spec.parse_spec({"grid": {"model": "random:bert", "method": "bitfit", "task": str(task), "lr": 1e-2},
                             "train": {"steps": 2, "batch_size": 8, "max_length": 16}})
    summary = sweep.run_sweep(spec, tmp_path / "rows.jsonl")
    assert summary["executor"] == "local" and summary["done"] == 1
    assert "notice: Ray could not start (RuntimeError: no Ray here)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Ray could not start"):  # asked for Ray explicitly: an error
        sweep.run_sweep(spec, tmp_path / "other.jsonl", executor="ray")


def test_a_failed_cell_is_recorded_and_tried_again(task, tmp_path, capsys):
    spec = sweep_spec.parse_spec({"grid": {"model": "random:bert", "method": "lora", "task": str(task), "lr": 1e-2,
                                      "options": {"rank": 2, "no_such_option": 1}}, "train": {"steps": 1}})
    out = tmp_path / "rows.jsonl"
    assert sweep.run_sweep(spec, out, executor="local")["failed"] == 1
    row = read_jsonl(out)[0]
    assert row["status"] == "failed" and "no_such_option" in row["reason"] and row["score"] is None
    assert sweep.run_sweep(spec, out, executor="local")["ran"] == 1  # failed cells are not finished


def test_spec_expansion_fills_defaults_and_takes_per_method_axes():
    spec = sweep_spec.parse_spec({"grid": {"method": ["lora", "full"], "task": "sst2", "lr": [1e-3, 1e-3],
                                           "seed": [0, 1]},
                                  "per_method": {"full": {"lr": 5e-5}, "lora": {"options": [{"rank": 4}, {"rank": 8}]}},
                                  "train": {"epochs": 2}})
    cells = sweep_spec.expand(spec, {"dtype": "float64"})
    assert len(cells) == 2 * 2 + 2  # lora: 2 option sets x 2 seeds (lr listed twice is one value); full: 2 seeds
    assert {c["lr"] for c in cells if c["method"] == "full"} == {5e-5}
    assert all(c["epochs"] == 2 and c["dtype"] == "float64" and c["batch_size"] == 32 for c in cells)
    assert len({sweep_spec.cell_id(c) for c in cells}) == len(cells)
    assert sweep_spec.canonical_config({"a": 1, "b": [1]}) == sweep_spec.canonical_config({"b": [1], "a": 1})


@pytest.mark.parametrize("data, match", [
    ({"grid": {"method": "lora", "task": "sst2", "lr": 1e-3, "colour": ["red"]}}, "unknown axis 'colour'"),
    ({"grid": {"method": "lora", "task": "sst2"}}, "give lr"),
    ({"grid": {"task": "sst2", "lr": 1e-3}}, "needs a 'method' axis"),
    ({"grid": {"method": [], "task": "sst2", "lr": 1e-3}}, "has no values"),
    ({"grid": {"method": "lora", "task": "sst2", "lr": 1e-3}, "trian": {}}, "unknown key"),
    ({"grid": {"method": "lora", "task": "sst2", "lr": 1e-3}, "train": {"threads": 4}}, "unknown train setting"),
])
def test_bad_specs_say_what_is_wrong(data, match):
    with pytest.raises(ValueError, match=match):
        sweep_spec.parse_spec(data)


def test_bad_spec_files_end_in_one_line(tmp_path, capsys):
    bad = tmp_path / "grid.toml"
    bad.write_text("x = 1")
    assert main(["sweep", str(bad)]) == 2
    assert "expected a .yaml, .yml or .json file" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.json")]) == 2
    broken = tmp_path / "grid.json"
    broken.write_text('{"grid": ')
    assert main(["sweep", str(broken)]) == 2
    assert "invalid JSON" in capsys.readouterr().err


def test_cells_keep_their_run_folders_and_resume_from_them(task, tmp_path):
    spec = sweep_spec.parse_spec({"grid": {"model": "random:bert", "method": "bitfit", "task": str(task), "lr": 1e-2},
                             "train": {"steps": 2, "batch_size": 8, "max_length": 16}})
    out, runs = tmp_path / "rows.jsonl", tmp_path / "runs"
    sweep.run_sweep(spec, out, executor="local", runs_dir=runs, echo=lambda _: None, keep_checkpoints=True)
    row = read_jsonl(out)[0]
    folder = runs / row["cell"]
    assert row["run_dir"] == str(folder) and (folder / "deltas.safetensors").is_file()
    assert (folder / "checkpoint.pt").is_file()
    assert json.loads((folder / "metrics.json").read_text())["final"]["accuracy"] == row["score"]
    out.unlink()  # the row was lost (a stop before the driver wrote it): the cell resumes from its checkpoint
    sweep.run_sweep(spec, out, executor="local", runs_dir=runs, echo=lambda _: None)
    again = read_jsonl(out)[0]
    assert again["status"] == "done" and again["score"] == row["score"] and again["step"] == 2


def test_a_finished_cell_loses_its_resume_state_once_its_row_is_written_and_an_unfinished_run_keeps_it(task,
                                                                                                      tmp_path):
    spec = sweep_spec.parse_spec({"grid": {"model": "random:bert", "method": "bitfit", "task": str(task),
                                           "lr": [1e-2, 1e30]},
                                  "train": {"steps": 2, "batch_size": 8, "max_length": 16}})
    out, runs = tmp_path / "rows.jsonl", tmp_path / "runs"
    sweep.run_sweep(spec, out, executor="local", runs_dir=runs, echo=lambda _: None)
    rows = read_jsonl(out)
    assert sorted(r["status"] for r in rows) == ["diverged", "done"]
    for row in rows:  # done and diverged are both finished: neither is resumed, neither keeps its state
        folder = Path(row["run_dir"])
        assert not (folder / "checkpoint.pt").exists() and (folder / "metrics.json").is_file()
    done = next(r for r in rows if r["status"] == "done")
    assert (Path(done["run_dir"]) / "deltas.safetensors").is_file()
    # a folder whose run is still running keeps its state, whatever is asked
    running = tmp_path / "running"
    running.mkdir()
    (running / "metrics.json").write_text(json.dumps({"status": "running"}))
    (running / "checkpoint.pt").write_bytes(b"state")
    assert drop_resume_state(running) == 0 and (running / "checkpoint.pt").is_file()
    (running / "metrics.json").write_text(json.dumps({"status": "done"}))
    assert drop_resume_state(running) == len(b"state") and not (running / "checkpoint.pt").exists()


def test_a_sequential_cell_trains_stage_by_stage_and_continues_at_the_stage_it_stopped_in(task, tmp_path):
    config = {"grid": {"model": "random:bert", "method": "bitfit+lora", "task": str(task), "lr": 1e-2,
                       "options": {"lora.rank": 2}},
              "train": {"steps": 3, "batch_size": 8, "max_length": 16, "sequential": True, "stage_lrs": [1e-2, 5e-3],
                        "val_size": 8, "eval_every": 1}}
    spec = sweep_spec.parse_spec(config)
    out, runs = tmp_path / "rows.jsonl", tmp_path / "runs"
    sweep.run_sweep(spec, out, executor="local", runs_dir=runs, echo=lambda _: None)
    row = read_jsonl(out)[0]
    assert row["status"] == "done", row.get("reason")
    assert [s["method"] for s in row["stages"]] == ["bitfit", "lora"]
    folder = runs / row["cell"]
    first, second = folder / "stage0-bitfit", folder / "stage1-lora"
    assert json.loads((first / "metrics.json").read_text())["config"]["lr"] == 1e-2
    assert json.loads((second / "metrics.json").read_text())["config"]["lr"] == 5e-3
    assert row["n_trainable"] == row["stages"][1]["n_trainable"] != row["stages"][0]["n_trainable"]
    # a stop inside stage 1: its results are gone, stage 0's stay and are not trained again; stage 0 continues
    # from the deltas it reported (best on validation), not from its last step's
    assert (first / "best.safetensors").is_file()
    (first / "deltas.safetensors").unlink()
    stamp0 = (first / "best.safetensors").stat().st_mtime_ns
    for name in ("metrics.json", "deltas.safetensors", "best.safetensors"):
        (second / name).unlink()
    out.unlink()
    sweep.run_sweep(spec, out, executor="local", runs_dir=runs, echo=lambda _: None)
    again = read_jsonl(out)[0]
    assert again["status"] == "done", again.get("reason")
    assert (first / "best.safetensors").stat().st_mtime_ns == stamp0 and not (first / "deltas.safetensors").exists()
    assert again["score"] == row["score"] and again["stages"] == row["stages"]
    bad = sweep_spec.parse_spec({**config, "grid": {**config["grid"], "method": "lora", "options": {}}})
    sweep.run_sweep(bad, tmp_path / "bad.jsonl", executor="local", echo=lambda _: None)
    assert "one part" in read_jsonl(tmp_path / "bad.jsonl")[0]["reason"]


def _lost_glue_run(task, tmp_path):
    """A finished GLUE-style selection cell (BitFit on random BERT, 3 steps) in ``tmp_path/glue_select.jsonl``
    whose run folder has lost its deltas, as on a machine that did not train it; its row and the runs folder."""
    spec = sweep_spec.parse_spec({"name": "glue_select",
                                  "grid": {"model": "random:bert", "method": "bitfit", "task": str(task), "lr": 1e-2},
                                  "train": {"steps": 3, "batch_size": 8, "max_length": 16, "val_size": 0.25,
                                            "eval_every": 1}})
    runs = tmp_path / "runs" / "glue_table"
    sweep.run_sweep(spec, tmp_path / "glue_select.jsonl", executor="local", runs_dir=runs, echo=lambda _: None)
    row = read_jsonl(tmp_path / "glue_select.jsonl")[0]
    (runs / row["cell"] / "deltas.safetensors").unlink()
    return row, runs


def test_a_lost_run_folder_is_rebuilt_from_its_row_and_reproduces_it(task, tmp_path, monkeypatch):
    """``experiments/rebuild_runs.py``: the recorded cell is trained again into its folder, scores identical."""
    from experiments import rebuild_runs

    row, runs = _lost_glue_run(task, tmp_path)
    assert row["curves"]["val"] and row["curves"]["dev"]  # rows carry their curves: folders are not committed
    for name, value in (("RESULTS", tmp_path), ("OUT", tmp_path / "rebuilt.jsonl"),
                        ("SUMMARY", tmp_path / "rebuilt.json"), ("TASKS", [str(task)]), ("METHODS", ["bitfit"])):
        monkeypatch.setattr(rebuild_runs, name, value)
    argv = ["--tasks", str(task), "--methods", "bitfit", "--seeds", "0", "--executor", "local"]
    assert rebuild_runs.main([*argv, "--plan"])["todo"] == [row["cell"]]
    payload = rebuild_runs.main(argv)
    assert (runs / row["cell"] / "deltas.safetensors").is_file() and payload["still_missing"] == []
    assert payload["n_rebuilt"] == payload["n_identical"] == 1 and payload["max_abs_difference"] == 0.0
    assert payload["cells"][0]["rebuilt"]["score_at_best_val"] == row["score_at_best_val"] is not None
    assert rebuild_runs.main([*argv, "--plan"])["todo"] == []  # nothing left to train
    # the machine is gone again: its rebuilt row (curves included) is recorded, so by default nothing is trained;
    # --deltas trains it again for a study that needs the folder
    (runs / row["cell"] / "deltas.safetensors").unlink()
    assert rebuild_runs.main([*argv, "--plan"])["todo"] == []
    assert rebuild_runs.main([*argv, "--deltas", "--plan"])["todo"] == [row["cell"]]
    with pytest.raises(SystemExit):
        rebuild_runs.main(["--methods", "nope"])


def test_an_old_row_is_rescored_from_its_run_folder_and_takes_top_class_share_only_when_identical(task, tmp_path,
                                                                                                   monkeypatch):
    """``experiments/rescore_runs.py``: a row written before evaluations reported ``top_class_share`` is rebuilt
    without training (:func:`sweep.build_cell`), its folder's reported deltas scored on dev again, the score
    compared exactly; ``rate_selection.with_rescored`` completes the row from an identical rescore only."""
    from experiments import rescore_runs
    from experiments.rate_selection import rescored_lacks, with_rescored

    spec = sweep_spec.parse_spec({"name": "old", "grid": {"model": "random:bert", "method": "lora", "task": str(task),
                                                          "lr": 1e-2, "options": {"rank": 2}},
                                  "train": {"steps": 3, "batch_size": 8, "max_length": 16, "val_size": 0.25,
                                            "eval_every": 1}})
    sweep.run_sweep(spec, tmp_path / "fresh.jsonl", executor="local", runs_dir=tmp_path / "runs" / "old",
                    echo=lambda _: None)
    fresh = read_jsonl(tmp_path / "fresh.jsonl")[0]
    share = fresh["dev_at_best_val"]["top_class_share"]
    old = {k: v for k, v in fresh.items() if k != "predicts_one_class"}
    old["dev_at_best_val"] = {k: v for k, v in fresh["dev_at_best_val"].items() if k != "top_class_share"}
    assert rescored_lacks(old) and not rescored_lacks(fresh)
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    for name, value in (("ROOT", tmp_path), ("RESULTS", tmp_path), ("OUT", tmp_path / "rescored.jsonl")):
        monkeypatch.setattr(rescore_runs, name, value)
    assert rescore_runs.main(["--rows", "old.jsonl", "--plan"]) == []
    [again] = rescore_runs.main(["--rows", "old.jsonl"])
    assert again["reproduces"] is True and again["difference"] == 0.0
    assert again["scores"]["top_class_share"] == share
    assert rescore_runs.main(["--rows", "old.jsonl"]) == []  # resumable: rescored rows are skipped
    [merged] = with_rescored([old], read_jsonl(tmp_path / "rescored.jsonl"))
    assert merged["dev_at_best_val"] == fresh["dev_at_best_val"]
    assert merged["predicts_one_class"] == fresh["predicts_one_class"]
    [kept] = with_rescored([old], [{**again, "reproduces": False}])  # a rescore that differs is never merged
    assert kept == old
    with pytest.raises(SystemExit):
        rescore_runs.main(["--rows", "nonesuch.jsonl"])


def test_transfer_rebuilds_a_lost_source_run_and_scores_it_at_once(task, tmp_path, monkeypatch):
    """``experiments/transfer.py`` on a machine without the GLUE run folders: each source is trained again from its
    row (the rebuilt row recorded, as the convergence study reads it) and scored before the next, so its scores
    outlive the machine; a second start has nothing to do."""
    import shutil

    from experiments import transfer

    other = tmp_path / "other"
    shutil.copytree(task, other)
    tasks = (str(task), str(other))
    row, runs = _lost_glue_run(task, tmp_path)
    for name, value in (("RESULTS", tmp_path), ("OUT", tmp_path / "transfer.jsonl"),
                        ("SUMMARY", tmp_path / "transfer.json"), ("REBUILT_OUT", tmp_path / "rebuilt.jsonl"),
                        ("TASKS", tasks), ("METHODS", ("bitfit",)), ("LABEL_MAP", dict.fromkeys(tasks, 1)),
                        ("KIND", dict.fromkeys(tasks, "single"))):
        monkeypatch.setattr(transfer, name, value)
    assert [r["cell"] for r in transfer.pending(transfer.source_rows(), transfer.scored())] == [row["cell"]]
    local = {"cpus_per_cell": 1, "cpus": 1, "executor": "local", "address": None}
    transfer.run(1, local)
    assert (runs / row["cell"] / "deltas.safetensors").is_file()
    rebuilt = read_jsonl(tmp_path / "rebuilt.jsonl")
    assert [r["cell"] for r in rebuilt] == [row["cell"]] and rebuilt[0]["curves"]["val"]
    scored = read_jsonl(tmp_path / "transfer.jsonl")
    assert [(r["source"], r["target"]) for r in scored] == [tasks]
    assert scored[0]["source_rebuilt"] is True and scored[0]["source_reproduces"] is True
    assert scored[0]["score"] is not None
    transfer.run(1, local)  # nothing pending: no new rows, nothing trained
    assert len(read_jsonl(tmp_path / "transfer.jsonl")) == 1 and len(read_jsonl(tmp_path / "rebuilt.jsonl")) == 1


def test_a_designed_cell_records_its_design_in_its_row(task):
    config = sweep_spec.expand(sweep_spec.parse_spec({
        "name": "designed", "grid": {"model": "random:bert", "method": ["recommended_lora", "lora"], "task": str(task),
                                     "lr": 1e-2},
        "per_method": {"recommended_lora": {"options": {"task": str(task), "n_design": 8, "budget": 600,
                                                        "max_rank": 2}},
                       "lora": {"options": {"rank": 2}}},
        "train": {"steps": 2, "batch_size": 8, "max_length": 16}}))
    designed, plain = (sweep.run_cell(c) for c in sorted(config, key=lambda c: c["method"] != "recommended_lora"))
    assert designed["status"] == "done", designed.get("reason")
    report = designed["designs"]["recommended_lora"]
    assert 0 < report["used"] <= 600 and report["ranks"] and "accepted" in report["trust_region"]
    assert plain["status"] == "done" and plain["designs"] is None  # LoRA designs nothing
