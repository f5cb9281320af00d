"""The Python examples of README.md and docs/anytime.md run as written; docs/api.md is what the code says."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_readme_example_runs():
    (block,) = python_blocks(ROOT / "README.md")
    exec(compile(block, "README.md", "exec"), {})


def test_the_anytime_example_runs_on_a_run_folder(tmp_path, monkeypatch, capsys):
    from fewstep import config as C
    from fewstep.train import Trainer

    cfg = C.load(ROOT / "configs" / "digits.yaml", ["train.epochs=2", "train.progress=false", "data.T=4"])
    Trainer(cfg, tmp_path / "fewstep-demo", log=lambda s: None).fit()
    monkeypatch.chdir(tmp_path)
    block = python_blocks(ROOT / "docs" / "anytime.md")[0]
    exec(compile(block, "docs/anytime.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"accuracy 0\.\d+, mean exit step [\d.]+ of 4", out), out
    assert re.search(r"sample 0: class \d after [1-4] steps", out), out
    assert (tmp_path / "my_topk.json").is_file()
    with pytest.raises(ValueError, match="T mismatch"):  # the saved policy knows its T
        from fewstep import anytime, cutoff, models

        anytime.AnytimeStream(models.create("cnn", input_shape=(1, 8, 8), num_classes=10),
                              cutoff.load(tmp_path / "my_topk.json"), T=8)


def test_the_any_network_example_calibrates_plain_pytorch_outputs(capsys):
    """docs/anytime.md's second block: a plain-PyTorch SNN's logits calibrated to a 2 pt bound on validation."""
    blocks = python_blocks(ROOT / "docs" / "anytime.md")
    assert len(blocks) == 2
    exec(compile(blocks[1], "docs/anytime.md (any network)", "exec"), {})
    out = capsys.readouterr().out
    m = re.search(r"bound ([\d.]+) pt on validation; on test ([\d.]+) % \(full T ([\d.]+) %\) after ([\d.]+) of 8", out)
    assert m, out
    bound, acc, full, steps = map(float, m.groups())
    assert bound <= 2.0 and full >= 85 and acc >= full - 3 and steps < 6, out  # learnt, certified, and sooner


def _api_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_page", ROOT / "docs" / "api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_api_page_is_what_the_code_says():
    api = _api_script()
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert page == api.render(), "docs/api.md is out of date with the code: run python docs/api.py"
    # every name a user is told to import resolves, with the signature printed
    for _, _, names in api.SECTIONS:
        for dotted in names:
            assert f"{dotted}{api.signature(api.resolve(dotted))}`" in page


def test_the_api_page_refuses_an_undocumented_name(monkeypatch):
    api = _api_script()
    import fewstep.cutoff

    def bare(Y):
        return Y

    monkeypatch.setattr(fewstep.cutoff, "bare", bare, raising=False)
    monkeypatch.setattr(api, "SECTIONS", [("x", "y", ["fewstep.cutoff.bare"])])
    with pytest.raises(ValueError, match="fewstep.cutoff.bare has no docstring"):
        api.render()


def test_the_extending_examples_work(monkeypatch):
    """docs/extending.md's model and ablation-token examples, run as written: the model registers, builds from a
    config's name and answers per step in both step modes; the token edits a variant's config."""
    import torch

    import fewstep
    from fewstep.ablation_variants import TOKENS, variant_dict
    from fewstep.models import MODELS, create

    monkeypatch.setattr("fewstep.models.registry.MODELS", dict(MODELS))  # registrations stay in this test
    _, model_block, token_block = python_blocks(ROOT / "docs" / "extending.md")
    try:
        exec(compile(model_block, "docs/extending.md", "exec"), {})
        net = create("tiny", input_shape=(1, 8, 8), num_classes=10, width=16)
        x = torch.rand(5, 3, 1, 8, 8)
        out = net(x)
        assert out.shape == (5, 3, 10)
        fewstep.set_step_mode(net, "s")
        assert torch.allclose(torch.stack([net(f) for f in x]), out, atol=1e-6)
        exec(compile(token_block, "docs/extending.md", "exec"), {})
        d = variant_dict({"train": {"loss": "tet"}}, "tet+rcs+mine", 0)
        assert d["regularizer"]["name"] == "rcs+mine"
    finally:
        TOKENS.pop("mine", None)


def table_rows_off(text: str) -> list[tuple[int, int, int]]:
    """(line, cells, header's cells) for each Markdown table row whose cell count differs from its header's.

    GitHub splits a cell at every unescaped ``|``, inside a code span too, and a row rewrapped onto several lines
    stops being a row: both show up here as a count that differs from the header's."""
    off, header, fenced = [], None, False
    for number, line in enumerate(text.split("\n"), 1):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("|"):
            header = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line)) - 1
        if header is None:
            header = cells
        elif cells != header:
            off.append((number, cells, header))
    return off


def test_table_rows_off_finds_a_split_cell_and_a_merged_row():
    good = "| a | b |\n|---|---|\n| 1 | `x\\|y` |\n"
    assert table_rows_off(good) == []
    assert table_rows_off("| a | b |\n|---|---|\n| 1 | `x|y` |\n") == [(3, 3, 2)]
    assert table_rows_off("| a | b |\n|---|---|\n| 1 | 2 | | 3 | 4 |\n") == [(3, 5, 2)]


@pytest.mark.parametrize("path", sorted([ROOT / "README.md", ROOT / "bench" / "README.md",
                                         *(ROOT / "docs").glob("*.md")]), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_its_headers_cells(path):
    assert table_rows_off(path.read_text(encoding="utf-8")) == [], f"{path.name}: (line, cells, header's cells)"
