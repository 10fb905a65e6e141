"""The figure registry, ``render``, ``controltune figures`` and the figures built from committed results."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest

from controltune import figures
from controltune.cli import main
from controltune.commands import figures as figures_cmd
from controltune.figures import FigureSpec, registry, render
from controltune.figures.pmp_agreement import control_column, error_matrices

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"
# Only the figures of pmp_agreement.py, msa.py and lipschitz.py are rendered here: the other modules'
# sources may not be committed yet.
OWN = ("pmp_agreement", "msa_toy", "msa_minilm", "lipschitz_constants", "bound_vs_gap")


def _spec(name: str, sources: tuple[str, ...] = (), draw=None) -> FigureSpec:
    def never(_):
        raise AssertionError("draw must not run")

    return FigureSpec(name=name, title=f"title of {name}", sources=sources, draw=draw or never,
                      caption=lambda _: "caption", recompute=(("python", "experiments/make_it.py", "--fast"),))


def test_registry_is_consistent_whatever_modules_exist():
    found = registry()
    assert set(OWN) <= set(found)
    for name, spec in found.items():
        assert isinstance(spec, FigureSpec) and spec.name == name
        assert spec.sources and all(isinstance(s, str) for s in spec.sources)
        assert all(isinstance(c, tuple) and c and all(isinstance(a, str) for a in c) for c in spec.recompute)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[Path]]:
    """Each figure of :data:`OWN` rendered once from the committed results (rendering is the slow part)."""
    out = tmp_path_factory.mktemp("figs")
    found = registry()
    return {name: render(found[name], RESULTS, out) for name in OWN}


@pytest.mark.parametrize("name", OWN)
def test_render_writes_pdf_png_and_caption(name, rendered):
    spec = registry()[name]
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


def _fake_modules(monkeypatch, modules: dict[str, list]) -> None:
    for name, figs in modules.items():
        module = types.ModuleType(f"controltune.figures.{name}")
        module.FIGURES = figs
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(figures, "_figure_modules", lambda: sorted(modules))


def test_duplicate_name_is_refused(monkeypatch):
    _fake_modules(monkeypatch, {"fake_a": [_spec("twice")], "fake_b": [_spec("once"), _spec("twice")]})
    with pytest.raises(ValueError, match=r"'twice' is registered twice.*fake_a.*fake_b"):
        registry()


def test_figures_must_be_figure_specs(monkeypatch):
    _fake_modules(monkeypatch, {"fake_c": ["not a spec"]})
    with pytest.raises(TypeError, match="fake_c.FIGURES must be a list of FigureSpec"):
        registry()


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


def test_error_matrices_take_the_largest_error_per_column():
    payload = {"results": [
        {"method": "m", "n_layers": 2, "kinds": ["layer", "term"], "costate_autograd": [0.0, 1e-12, 2e-12],
         "control_autograd": {"m.0.a": 1e-9, "m.0.b": 3e-9, "m.1.a": 0.0, "head.weight": 0.0}},
        {"method": "skipped", "status": "skipped"},
    ]}
    methods, costate, control = error_matrices(payload, "autograd")
    assert methods == ["m", "skipped"]
    assert costate[0].tolist() == [0.0, 1e-12, 2e-12] and all(math.isnan(v) for v in costate[1])
    # columns: init, u_0, u_1, shared, term
    assert math.isnan(control[0, 0]) and control[0, 1] == 3e-9 and control[0, 2] == 0.0
    assert math.isnan(control[0, 3]) and control[0, 4] == 0.0
