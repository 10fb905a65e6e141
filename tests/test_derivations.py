"""The symbolic derivations in derivations/ hold, and their LaTeX output is the committed one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DERIVATIONS = Path(__file__).resolve().parents[1] / "derivations"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"derivation_{name}", DERIVATIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def written(tmp_path: Path, name: str, labels: list[str], snippets: list[str]) -> str:
    """The generated fragment: it has every ``labels`` equation and ``snippets`` text, and is the committed one."""
    tex = (tmp_path / f"{name}.tex").read_text(encoding="utf-8")
    for label in labels:
        assert f"\\label{{eq:{name}:{label}}}" in tex, label
    for snippet in snippets:
        assert snippet in tex, snippet
    committed = DERIVATIONS / "out" / f"{name}.tex"
    assert committed.read_text(encoding="utf-8") == tex, f"{committed} is stale: rerun derivations/{name}.py"
    return tex


def test_costate_identities_hold_symbolically(tmp_path):
    results = load("costate").main(tmp_path)
    assert len(results) == 8 and all(results.values()), results
    written(tmp_path, "costate", ["system", "pmp", "lora_grad"], ["\\nabla_A H_l = s B_l^{\\top}"])


def test_pmp_is_the_chain_rule_for_generic_dynamics(tmp_path):
    checks = load("pmp_chain_rule").main(tmp_path)
    # 6 identities for each of n = 1, 2 and R_l(u), R_l(x, u); 6 for the batch form.
    assert len(checks) == 30 and all(checks.values()), checks
    assert sum("shared control" in name for name in checks) == 4
    written(tmp_path, "pmp_chain_rule", ["dynamics", "hamiltonian", "costate", "unrolled", "shared", "own",
                                         "batch", "costate_state_cost"],
            ["= -\\frac{\\partial J}{\\partial \\theta}", "= -\\frac{\\partial J}{\\partial x_0}"])


def test_lq_pmp_gives_riccati_and_emsa_converges(tmp_path, one_thread):
    module = load("lq_riccati")
    checks, numbers = module.run(tmp_path)
    assert len(checks) == 16 and all(checks.values()), checks
    emsa = numbers["emsa_errors"]
    assert emsa[-1] < 1e-10 and emsa[0] > 1e-2  # it starts far from the optimum and gets there
    assert numbers["msa_errors"][-1] > 1e3  # basic MSA diverges on this problem
    assert numbers["predicted_rate_emsa"] < 1 < numbers["predicted_rate_msa"]
    written(tmp_path, "lq_riccati", ["hamiltonian", "pmp", "gain", "riccati", "emsa", "msa_rate"],
            ["K_{l} = \\left(R_{l} + B_{l}^{T} P_{l+1} B_{l}\\right)^{-1} B_{l}^{T} P_{l+1} A_{l}",
             "P_l = Q_{l} + A_{l}^{T} P_{l+1} \\left(A_{l} - B_{l} K_{l}\\right)"])


def test_control_forms_unified_view(tmp_path, one_thread):
    checks = load("control_forms").main(tmp_path)
    assert all(checks.values()), checks
    for method in ("LoRA", "adapter", "prefix", "IA3", "BitFit", "prompt"):
        assert sum(method in name and not name.startswith("[numeric]") for name in checks) >= 2, method
    assert sum(name.startswith("[numeric]") for name in checks) == 10
    written(tmp_path, "control_forms",
            ["unified", "lora", "adapter_sequential", "adapter_parallel", "prefix", "prefix_gate", "prefix_unified",
             "ia3", "ia3_ffn", "bitfit", "bitfit_inner", "prompt", "prompt_prefix"],
            ["\\Delta h = s x A^{T} B^{T}", "W_{\\rm down} = c\\,W_q^\\top P_k^\\top",
             "\\operatorname{diag}(\\ell - 1)"])
