"""The README's and docs' Python examples run as written (the scikit-learn ones make their own small
stand-in data), their command lines parse, and their checkable claims hold."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import marquardt
from marquardt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKLEARN_DOC = ROOT / "docs" / "sklearn.md"


def python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def command_lines(path: Path = README) -> list[str]:
    """The ``marquardt ...`` commands of a page's shell blocks, comments removed; a
    ``torchrun ... -m marquardt ARGS`` line is read as ``marquardt ARGS``."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    commands = [re.sub(r"^torchrun .*?-m marquardt ", "marquardt ", part.strip())
                for line in lines for part in line.split("&&")]
    return [command for command in commands if command.startswith("marquardt ")]


def test_readme_has_the_quick_starts():
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert any("marquardt.least_squares" in b for b in blocks)
    assert any("marquardt.fit" in b for b in blocks)
    assert any("LevenbergMarquardt" in b for b in blocks)
    assert any("LMRegressor" in b for b in blocks)


def test_least_squares_and_pytorch_quick_starts(capsys):
    namespace: dict = {}
    torch_blocks = [b for b in python_blocks() if "sklearn" not in b]
    for block in torch_blocks:
        exec(compile(block, str(README), "exec"), namespace)
    res = namespace["res"]
    assert res.success
    np.testing.assert_allclose(res.x, [2.5, 1.3], rtol=0.02)
    assert namespace["history"]["perf"][-1] < 1e-4
    assert float(namespace["cost"]) < 1e-4
    printed = capsys.readouterr().out
    assert namespace["history"].stop_reason in printed and res.message in printed
    # "numpy in, numpy out; float64", and the optimizer found fit's Jacobian, as the comments say.
    assert isinstance(res.x, np.ndarray) and res.x.dtype == np.float64 and res.stderr.dtype == np.float64
    assert printed.splitlines()[-1] == "closed-form"
    # "covariance is s^2 (J^T J)^+ with s^2 = 2 cost / (m - n); stderr the square roots of its diagonal"
    s2 = 2 * res.cost / (res.fun.size - res.x.size)
    np.testing.assert_allclose(res.covariance, s2 * np.linalg.pinv(res.jac.T @ res.jac), rtol=1e-10)
    np.testing.assert_allclose(res.stderr, np.sqrt(np.diag(res.covariance)), rtol=1e-12)


def test_least_squares_result_fields_are_the_ones_listed():
    listed = re.search(r"Results carry `([^`]*)`", " ".join(README.read_text().split())).group(1)
    assert listed.split(", ") == [field.name for field in dataclasses.fields(marquardt.LeastSquaresResult)]
    with pytest.raises(TypeError):
        marquardt.least_squares(lambda b: b - 1, [0.0], bounds=(0, 2))


def test_scikit_learn_quick_start():
    # The block runs as pasted: it makes its own stand-in data.
    pytest.importorskip("sklearn")
    block = next(b for b in python_blocks() if "LMRegressor" in b)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["search"].best_params_["lmregressor__hidden_layer_sizes"] in [(5,), (10,), (10, 10)]
    assert namespace["reg"].predict(namespace["X_new"]).shape == (5,)


def test_sklearn_doc_example():
    pytest.importorskip("sklearn")
    (block,) = python_blocks(SKLEARN_DOC)
    namespace: dict = {}  # the block makes its own stand-in data
    exec(compile(block, str(SKLEARN_DOC), "exec"), namespace)
    clf = namespace["clf"]
    assert clf.classes_.tolist() == ["left", "right"]
    assert clf.predict_proba(namespace["X_new"]).shape == (5, 2)
    assert namespace["search"].best_params_["lmregressor__hidden_layer_sizes"] in [(5,), (10,), (10, 10)]


def test_sklearn_doc_br_max_fail_default_stops_on_validation():
    # docs/sklearn.md: "the default max_fail=6 stops method='br' on validation too; max_fail=None never does".
    pytest.importorskip("sklearn")
    from marquardt import LMRegressor

    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(60, 2))
    y = np.sin(3 * X[:, 0]) * X[:, 1]
    reasons = [LMRegressor((5,), method="br", epochs=20, random_state=0, **options).fit(X, y).history_.stop_reason
               for options in ({}, {"max_fail": None})]
    assert reasons[0] == "Validation stop." and reasons[1] != "Validation stop."


@pytest.mark.parametrize("command", dict.fromkeys(
    command for page in (README, ROOT / "docs" / "cli.md", ROOT / "docs" / "scaling.md") for command in command_lines(page)))
def test_readme_command_lines_parse(command):
    # Each option the README, docs/cli.md and docs/scaling.md show exists, with a value the command line takes.
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == shlex.split(command)[1]


def test_readme_shows_every_command():
    assert {shlex.split(command)[1] for command in command_lines()} == {"demo", "fit", "predict", "evaluate"}


def test_matlab_table_first_rows_run_on_matlab_shaped_data():
    # x and t as MATLAB holds them (one sample per column); the table's code, in its order.
    rows = [line for line in _section(README.read_text(), "## Quick start: MATLAB users", "Stop reasons").splitlines()
            if line.startswith("| `")]
    code = [re.findall(r"`([^`]*)`", row.split("|")[2]) for row in rows[:3]]
    x = np.linspace(-1, 1, 94)[None, :]
    t = np.sin(3 * x) + 0.1 * np.random.default_rng(0).standard_normal(x.shape)  # noisy: a validation stop
    namespace = {"marquardt": marquardt, "torch": torch, "x": x, "t": t, "X_new": x.T[:5]}
    for statement in code[1] + code[0] + code[2][:1]:
        exec(statement, namespace)
    assert namespace["Y"].shape == (5, 1)


def test_memory_table_sample_space_row():
    # "fewer residuals than parameters, and the whole m x n J fits max_jacobian_bytes"
    X = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]
    jacobian_bytes = 20 * 121 * 8  # 20 residuals, 121 parameters, float64
    forms = {}
    for budget in (jacobian_bytes, jacobian_bytes - 8):
        model = marquardt.mlp(1, hidden=(40,), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        history = marquardt.fit(model, X, torch.sin(3 * X), epochs=1, max_jacobian_bytes=budget)
        forms[budget] = history["solver"][-1]
    assert forms == {jacobian_bytes: "sample-space", jacobian_bytes - 8: "chunked-cholesky"}


def test_optimizers_doc_examples_run():
    """docs/optimizers.md's Python blocks run in order, in one namespace, as a reader pastes them
    (LM loops cut to 10 steps: the physics-informed closure takes the graph path, 0.1-0.2 s a step
    on the loaded 2-core machine; the scheduler's loop runs its 100 steps, as its total_steps needs)."""
    blocks = python_blocks(ROOT / "docs" / "optimizers.md")
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        if "LevenbergMarquardt" in block:
            assert re.search(r"range\((100|200)\)", block)
            block = re.sub(r"range\((100|200)\)", "range(10)", block)
        exec(compile(block, "docs/optimizers.md", "exec"), namespace)


def test_scaling_doc_example_runs_as_one_rank(monkeypatch):
    """docs/scaling.md's script, as torchrun starts it, here one rank of a one-rank gloo group."""
    import atexit
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(atexit, "register", lambda fn, *args: None)  # the group is destroyed below
    (block,) = python_blocks(ROOT / "docs" / "scaling.md")
    namespace: dict = {}
    try:
        exec(compile(block.replace("epochs=100", "epochs=5"), "docs/scaling.md", "exec"), namespace)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert (namespace["start"], namespace["stop"]) == (0, 2000)
    assert namespace["history"].stop_reason == "Maximum epoch reached." and len(namespace["history"]) == 6


def test_optimizer_damping_n_mu_takes_fits_steps():
    # docs/optimizers.md: "damping=N * mu takes the steps fit(..., mu=mu) takes on the same network".
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1)).double()
    copy = torch.nn.Sequential(torch.nn.Linear(1, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1)).double()
    copy.load_state_dict(net.state_dict())
    X = torch.linspace(-1, 1, 200, dtype=torch.float64)[:, None]
    y = torch.sin(3 * X)
    marquardt.fit(net, X, y, epochs=5, mu=1e-3)
    opt = marquardt.LevenbergMarquardt(copy.parameters(), damping=200 * 1e-3)
    for _ in range(5):
        opt.step(lambda: copy(X) - y)
    for fitted, stepped in zip(net.parameters(), copy.parameters()):
        torch.testing.assert_close(fitted, stepped, rtol=1e-10, atol=1e-12)


RESULTS = ROOT / "benchmarks" / "results"


def _section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def _duration(seconds: float) -> str:
    """A time as the benchmark tables print it: three significant digits in us, ms or s."""
    for scale, unit in ((1e6, "us"), (1e3, "ms")):
        if seconds * scale < 1000:
            return f"{seconds * scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def _nist_rows() -> list[list[str]]:
    lines = (RESULTS / "nist.md").read_text().splitlines()
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines
            if re.match(r"\| \w+ \| (Lower|Average|Higher) \|", line)]


def test_readme_nist_table_matches_results():
    # The README's accuracy table is nist.md's summary, row for row.
    summary = re.findall(r"LRE >= 4 in (\d+)/54, LRE >= 6 in (\d+)/54, mean LRE ([\d.]+)",
                         (RESULTS / "nist.md").read_text())
    section = _section(README.read_text(), "### Accuracy: NIST StRD", "The 11 runs")
    table = [[cell.replace("*", "").replace(" ", "") for cell in line.split("|")[1:-1]]
             for line in section.splitlines() if line.startswith("| ") and "/ 54" in line]
    assert [(row[1], row[2], row[3]) for row in table] == [(f"{a}/54", f"{b}/54", mean) for a, b, mean in summary]


def test_readme_nist_runs_below_six_and_times_match_results():
    rows = _nist_rows()
    assert len(rows) == 54
    below = [(row[0], row[2]) for row in rows if float(row[3]) < 6]
    readme = README.read_text()
    assert f"The {len(below)} runs under LRE 6 (" in readme
    named = re.search(r"runs under LRE 6 \(([^)]*)\)", readme).group(1)
    assert {problem for problem, _ in below} == {name.split()[0] for name in named.split(", ")}
    ours, scipy = (np.median([float(row[column]) for row in rows]) for column in (5, 8))
    ratio = np.median([float(row[5]) / float(row[8]) for row in rows])
    assert f"{ours:.0f} ms for marquardt against {scipy:.0f} ms for scipy's" in readme
    assert f"a median ratio of {ratio:.1f}x" in readme


@pytest.mark.parametrize("case, contenders", [
    ("T1", ["ours (fit)", "ours (optimizer)", "peer (cholesky)", "peer (default: qr)"]),
    ("T2", ["ours (fit)", "ours (optimizer)", "peer (cholesky)"]),
    ("T3", ["ours (fit)"]),
    ("T5", ["ours (fit)", "ours (optimizer)", "peer (cholesky)"]),
])
def test_readme_step_times_match_results(case, contenders):
    # The README quotes the per-step medians that benchmarks/results/<case>.json records.
    import json

    measured = json.loads((RESULTS / f"{case}.json").read_text())["per_step"]["contenders"]
    section = _section(README.read_text(), "### Speed and memory", "### Accuracy")
    for name in contenders:
        assert _duration(measured[name]["median"]) in section, (case, name)


def test_readme_target_ratios_match_results():
    # Each ratio of performance.md's targets table, to the README's precision (two decimals, or
    # one for T5's).
    targets = _section((RESULTS / "performance.md").read_text(), "## Targets", "## T1")
    section = _section(README.read_text(), "### Speed and memory", "### Accuracy")
    for line in targets.splitlines():
        for ratio in re.findall(r"(\d+\.\d+)x", line):
            shown = f"{float(ratio):.1f}x" if line.startswith("| T5") else f"{ratio}x"
            assert shown in section, line


def test_t2_two_factorizations_ratio_matches_results():
    # 'syrk ... plus two spotrf ... would be ...x the bound', from the bound's own kernel times.
    import json

    bound = json.loads((RESULTS / "T2.json").read_text())["per_step"]["bound"]
    syrk, chol = bound["syrk_s"], bound["chol_s"]
    ratio = f"{(syrk + 2 * chol) / (syrk + chol):.2f}x"
    performance = " ".join((ROOT / "docs" / "performance.md").read_text().split())
    assert f"`syrk` {syrk:.2f} s plus two `spotrf` of {chol:.2f} s would be {ratio}" in performance


def test_cli_doc_reads_back_a_run(tmp_path, monkeypatch, capsys):
    """docs/cli.md's Python block reads the model, metadata and History that `marquardt fit` wrote."""
    from marquardt.cli import main

    monkeypatch.chdir(tmp_path)
    rows = "\n".join(f"{x / 10},{(x / 10) ** 2}" for x in range(12))
    Path("data.csv").write_text(f"x,y\n{rows}\n")
    assert main(["fit", "data.csv", "--target", "y", "--epochs", "3", "--division", "none", "--seed", "0",
                 "--out", "run"]) == 0
    (block,) = python_blocks(ROOT / "docs" / "cli.md")
    namespace: dict = {}
    exec(compile(block, "docs/cli.md", "exec"), namespace)
    cli = namespace["metadata"]["cli"]
    assert (cli["targets"], cli["features"], cli["loss"]) == (["y"], ["x"], "mse")
    assert cli["options"]["seed"] == 0 and cli["metrics"][0]["samples"] == 12
    history = namespace["history"]
    assert (history.stop_reason, len(history)) == ("Maximum epoch reached.", 4)
    assert f"stop reason: {history.stop_reason} epochs: 3" in capsys.readouterr().out
    assert torch.equal(namespace["model"](torch.zeros(1, 1, dtype=torch.float64)),
                       marquardt.load(tmp_path / "run" / "model")(torch.zeros(1, 1, dtype=torch.float64)))


def test_cli_doc_errors_are_the_commands_output(tmp_path, monkeypatch, capsys):
    """docs/cli.md's "Errors" block: each ``$ marquardt ...`` line prints the line under it."""
    from marquardt.cli import main

    monkeypatch.chdir(tmp_path)
    Path("data.csv").write_text("x,y\n0,0\n1,1\n2,4\n")
    Path("bad.csv").write_text("x,y\n0,0\n1,1\nabc,4\n")
    block = _section((ROOT / "docs" / "cli.md").read_text(), "### Errors", "The same holds")
    lines = re.search(r"```\n(.*?)```", block, re.S).group(1).splitlines()
    pairs = list(zip(lines[::2], lines[1::2]))
    assert len(pairs) == 2 and all(command.startswith("$ marquardt ") for command, _ in pairs)
    for command, expected in pairs:
        assert main(shlex.split(command)[2:]) == 2
        assert capsys.readouterr().err.strip() == expected
        assert not Path("run").exists()


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    # Every link to another file of the project names a file that exists, and an anchor a heading there.
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links {target}"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name} links {target}"
