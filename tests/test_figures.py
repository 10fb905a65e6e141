"""The figure machinery (``controltune.figures``), ``controltune figures`` and the paper's figure scripts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from controltune import figures
from controltune.cli import main
from controltune.commands import figures as figures_cmd
from controltune.figures import FigureSpec, load_scripts, registry, render

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
SCRIPTS = ROOT / "paper_figs" / "figures"
pmp_agreement = load_scripts(SCRIPTS)["pmp_agreement"]
control_column, error_matrices = pmp_agreement.control_column, pmp_agreement.error_matrices
group_column, leg_tolerance = pmp_agreement.group_column, pmp_agreement.leg_tolerance
# Only the figures of pmp_agreement.py, msa.py and lipschitz.py are rendered here: the other scripts'
# sources may not be committed yet.
OWN = ("pmp_agreement", "msa_toy", "msa_minilm", "lipschitz_constants", "bound_vs_gap")


def _spec(name: str, sources: tuple[str, ...] = (), draw=None) -> FigureSpec:
    def never(_):
        raise AssertionError("draw must not run")

    return FigureSpec(name=name, title=f"title of {name}", sources=sources, draw=draw or never,
                      caption=lambda _: "caption", recompute=(("python", "experiments/make_it.py", "--fast"),))


def test_registry_is_consistent_whatever_modules_exist():
    found = registry(SCRIPTS)
    assert set(OWN) <= set(found)
    for name, spec in found.items():
        assert isinstance(spec, FigureSpec) and spec.name == name
        assert spec.sources and all(isinstance(s, str) for s in spec.sources)
        assert all(isinstance(c, tuple) and c and all(isinstance(a, str) for a in c) for c in spec.recompute)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[Path]]:
    """Each figure of :data:`OWN` rendered once from the committed results (rendering is the slow part)."""
    out = tmp_path_factory.mktemp("figs")
    found = registry(SCRIPTS)
    return {name: render(found[name], RESULTS, out) for name in OWN}


@pytest.mark.parametrize("name", OWN)
def test_render_writes_pdf_png_and_caption(name, rendered):
    spec = registry(SCRIPTS)[name]
    paths = rendered[name]
    assert [p.name for p in paths] == [f"{name}.pdf", f"{name}.png", f"{name}.caption.md"]
    assert paths[0].read_bytes()[:5] == b"%PDF-"
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    caption = paths[2].read_text()
    assert caption.startswith(f"# {spec.title}\n")
    for source in spec.sources:
        assert source in caption and "created 2026" in caption  # the committed results carry a stamp
    for argv in spec.recompute:
        assert figures.command_line(argv) in caption
    assert "Command: `" in caption  # the exact command, rebuilt from the result's config


def test_missing_source_names_file_and_command(tmp_path):
    spec = _spec("needs_data", sources=("absent.json",))
    with pytest.raises(FileNotFoundError, match=r"absent\.json.*python experiments/make_it\.py --fast"):
        render(spec, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _write_scripts(folder: Path, scripts: dict[str, str]) -> Path:
    """``folder`` holding the figure scripts ``name -> source``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in scripts.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return folder


def _specs_script(*names: str) -> str:
    specs = ", ".join(f"FigureSpec({n!r}, 't', ('x.json',), draw=None, caption=None)" for n in names)
    return f"from controltune.figures import FigureSpec\nFIGURES = [{specs}]\n"


def test_duplicate_name_is_refused(tmp_path):
    folder = _write_scripts(tmp_path, {"fake_a": _specs_script("twice"), "fake_b": _specs_script("once", "twice")})
    with pytest.raises(ValueError, match=r"'twice' is registered twice.*fake_a\.py.*fake_b\.py"):
        registry(folder)


def test_figures_must_be_figure_specs(tmp_path):
    folder = _write_scripts(tmp_path, {"fake_c": "FIGURES = ['not a spec']\n"})
    with pytest.raises(TypeError, match=r"fake_c\.py: FIGURES must be a list of FigureSpec"):
        registry(folder)


def test_scripts_share_helpers_and_helpers_register_nothing(tmp_path):
    folder = _write_scripts(tmp_path, {
        "_shared": "from controltune.figures import FigureSpec\nTITLE = 'shared title'\n",
        "no_figures": "VALUE = 1\n",
        "uses_helper": """\
            from controltune.figures import FigureSpec
            from ._shared import TITLE
            FIGURES = [FigureSpec("one", TITLE, ("x.json",), draw=None, caption=None)]
            """,
    })
    assert figures.script_names(folder) == ["no_figures", "uses_helper"]
    assert {n: s.title for n, s in registry(folder).items()} == {"one": "shared title"}
    with pytest.raises(NotADirectoryError, match="absent"):
        registry(tmp_path / "absent")


def test_cli_unknown_figure_is_an_error(capsys):
    assert main(["figures", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown figure(s) nope" in err and "accepted:" in err and "pmp_agreement" in err


def test_cli_builds_only_and_lists(tmp_path, capsys, rendered):
    assert main(["figures", "--only", "msa_toy", "--results", str(RESULTS), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msa_toy.caption.md", "msa_toy.pdf", "msa_toy.png"]
    # A rebuild from unchanged results gives byte-identical files (clean git diffs).
    assert [p.read_bytes() for p in rendered["msa_toy"]] == [
        (tmp_path / p.name).read_bytes() for p in rendered["msa_toy"]]
    assert "msa_toy" in capsys.readouterr().out
    assert main(["figures", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in OWN) and "sources: msa_toy.json" in listed


def test_cli_reports_missing_sources_and_builds_the_rest(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    assert main(["figures", "--only", "msa_toy", "--results", str(tmp_path / "results"),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "msa_toy.json" in err and "python experiments/msa_toy.py" in err


def test_recompute_runs_each_command_once_and_stops_at_a_failure(capsys):
    calls = []

    def runner(argv, check):
        calls.append(argv)
        return types.SimpleNamespace(returncode=3 if "fail" in argv else 0)

    same = [_spec("a"), _spec("b")]  # two figures from one experiment
    assert figures_cmd.recompute(same, runner=runner) == 0
    assert calls == [[sys.executable, "experiments/make_it.py", "--fast"]]
    failing = FigureSpec("c", "t", ("x.json",), draw=None, caption=None,
                         recompute=(("python", "fail"), ("python", "x")))
    assert figures_cmd.recompute([failing], runner=runner) == 3
    assert calls[-1][-1] == "fail"  # the second command never ran
    assert "[a] $ python experiments/make_it.py --fast" in capsys.readouterr().out


def test_control_column_placement():
    assert control_column("adapter.3.o.W_up", ["layer", "term"]) == 3
    assert control_column("stage0.bitfit.5.q.bias", ["layer", "term"]) == 5
    assert control_column("head.weight", ["layer", "term"]) == "term"
    assert control_column("prompt.P", ["init", "term"]) == "init"
    assert control_column("full.init.embeddings.word_embeddings.weight", ["init", "layer", "term"]) == "init"
    assert control_column("subspace.z", ["shared", "term"]) == "shared"
    with pytest.raises(ValueError, match="cannot tell where control 'mystery.z' acts"):
        control_column("mystery.z", ["init", "shared", "layer", "term"])


def test_group_column_placement():
    assert group_column("layer 3") == 3
    assert group_column("shared subspace.z") == "shared"
    assert [group_column(g) for g in ("init", "term", "all")] == ["init", "term", "all"]
    with pytest.raises(ValueError, match="'adapter.0.W_up' is not a control group"):
        group_column("adapter.0.W_up")  # a control name: a --fd-mode legacy result


def _verify_row(**fields):
    return {"method": "m", "n_layers": 2, "kinds": ["layer", "term"], "tol_autograd": 1e-10, "tol_forward": 1e-10,
            "tol_fd": 1e-6, "fd_raw_ceiling": 1e-2, **fields}


def test_error_matrices_take_the_largest_error_per_column():
    payload = {"results": [
        _verify_row(costate_autograd=[0.0, 1e-12, 2e-12],
                    control_autograd={"m.0.a": 1e-9, "m.0.b": 3e-9, "m.1.a": 0.0, "head.weight": 0.0}),
        {"method": "skipped", "status": "skipped"},
    ]}
    methods, costate, control = error_matrices(payload, "autograd")
    assert methods == ["m", "skipped"]
    assert costate[0].tolist() == [0.0, 1e-12, 2e-12] and all(math.isnan(v) for v in costate[1])
    # columns: init, u_0, u_1, shared, term, all (joint; autograd has none)
    assert math.isnan(control[0, 0]) and control[0, 1] == 3e-9 and control[0, 2] == 0.0
    assert math.isnan(control[0, 3]) and control[0, 4] == 0.0 and math.isnan(control[0, 5])
    assert all(math.isnan(v) for v in control[1])


def test_error_matrices_of_the_forward_and_fd_legs():
    row = _verify_row(costate_forward=[1e-15, 2e-15, 3e-15], control_forward={"m.0.a": 4e-15, "head.weight": 5e-16},
                      forward_joint=6e-16, costate_fd=[0.0, 0.0, 1e-9], costate_fd_raw=[1e-10, 2e-10, 3e-9],
                      fd_directions={"all": 0.0, "layer 1": 2e-8, "term": 0.0},
                      fd_directions_raw={"all": 1e-9, "layer 1": 4e-8, "term": 5e-11},
                      control_fd={"m.1.a": 2e-8, "m.1.b": 2e-8, "head.weight": 0.0})
    payload = {"results": [row]}
    _, costate, control = error_matrices(payload, "forward")
    assert costate[0].tolist() == [1e-15, 2e-15, 3e-15]
    assert control[0, 1] == 4e-15 and math.isnan(control[0, 2]) and control[0, 4] == 5e-16 and control[0, 5] == 6e-16
    # FD: one cell per control group (the group's error), the joint direction in `all`
    _, costate, control = error_matrices(payload, "fd")
    assert costate[0].tolist() == [0.0, 0.0, 1e-9]
    assert math.isnan(control[0, 1]) and control[0, 2] == 2e-8 and control[0, 4] == 0.0 and control[0, 5] == 0.0
    _, costate, control = error_matrices(payload, "fd_raw")
    assert costate[0].tolist() == [1e-10, 2e-10, 3e-9]
    assert control[0, 2] == 4e-8 and control[0, 4] == 5e-11 and control[0, 5] == 1e-9
    with pytest.raises(ValueError, match="unknown leg 'reverse'"):
        error_matrices(payload, "reverse")


def test_leg_tolerances_come_from_the_rows():
    payload = {"results": [_verify_row(), _verify_row(tol_autograd=1e-10), {"method": "s", "status": "skipped"}]}
    assert leg_tolerance(payload, "fd") == 1e-6 and leg_tolerance(payload, "fd_raw") == 1e-2
    payload["results"][1]["tol_autograd"] = 1e-4
    with pytest.raises(ValueError, match="different tol_autograd"):
        leg_tolerance(payload, "autograd")


def test_pmp_agreement_caption_describes_the_three_legs(rendered):
    text = rendered["pmp_agreement"][2].read_text()
    for phrase in ("forward-mode AD", "Richardson", "per control *group*", "raw ceiling", "float64 copy",
                   "--dtype float64", "--dtype float32"):
        assert phrase in text, phrase


# --- figure scripts outside the library ---------------------------------------------------------------
LINE_SCRIPT = """\
    import json

    from controltune.figures import FigureSpec, new_figure


    def draw(results_dir):
        fig = new_figure(2.0, 2.0)
        fig.add_subplot().plot(json.loads((results_dir / "line.json").read_text())["y"])
        return fig


    WRITE = "import json; json.dump({'y': [1, 3, 2]}, open('results/line.json', 'w'))"
    FIGURES = [FigureSpec("line", "a line", ("line.json",), draw=draw, caption=lambda _: "a caption",
                          recompute=(("python", "-c", WRITE),))]
    """


def test_library_imports_without_matplotlib():
    code = ("import sys, controltune, controltune.figures, controltune.commands.figures; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr


def test_cli_without_matplotlib_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["figures", "--list"]) == 2
    assert "install controltune[figures]" in capsys.readouterr().err


def test_scripts_are_found_from_a_subfolder_and_built_from_the_root(monkeypatch, tmp_path, capsys):
    here = ROOT / "experiments"
    assert figures_cmd.find_scripts(None, start=here) == (SCRIPTS, ROOT)
    monkeypatch.chdir(here)
    assert main(["figures", "--only", "msa_toy", "--out", str(tmp_path)]) == 0
    assert Path.cwd() == here  # back where we started
    # Sources are named from the project root, as in the committed caption.
    assert (tmp_path / "msa_toy.caption.md").read_text() == (ROOT / "paper_figs" / "msa_toy.caption.md").read_text()
    assert "working in the project root" in capsys.readouterr().err


def test_no_scripts_folder_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["figures", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert "looked for paper_figs/figures/ in" in err and "--source DIR" in err and "\n" not in err
    assert main(["figures", "--source", "nowhere"]) == 2
    assert "--source nowhere: no such folder" in capsys.readouterr().err


def test_source_folder_recomputes_with_the_scripts_own_command(monkeypatch, tmp_path, capsys):
    folder = _write_scripts(tmp_path / "my_figs", {"line": LINE_SCRIPT})
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["figures", "--source", "my_figs", "--results", "results", "--out", "out"]
    assert main(args) == 1  # no results yet: reported with the script's command
    assert "python -c" in capsys.readouterr().err
    assert main([*args, "--recompute", "--only", "line"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["line.caption.md", "line.pdf", "line.png"]
    caption = (tmp_path / "out" / "line.caption.md").read_text()
    assert "a caption" in caption and "`results/line.json`" in caption
    assert main([*args, "--list"]) == 0 and "line" in capsys.readouterr().out
    assert folder.is_dir()
