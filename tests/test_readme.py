"""Every Python block of README.md runs as written (in a fresh folder, on the real default model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_readme_has_python_blocks():
    assert python_blocks(), "README.md lost its API example"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write edited/ and adapter/ relative to where they run
    code = python_blocks()[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    for call, written in (("editor.save(", "edited/editor.json"), ("export_peft(", "adapter/adapter_config.json")):
        if call in code:
            assert (tmp_path / written).is_file(), f"the block's {call}...) wrote no {written}"


def test_the_supported_models_table_lists_every_registered_architecture():
    from rledit.targets import ARCHITECTURES

    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Supported models"):].split("\n\n")[2]
    rows = [line.split("|")[1:4] for line in table.splitlines()[2:]]
    listed = {name.strip(): (modules.strip(), layout.strip()) for types, modules, layout in rows
              for name in types.split(",")}
    assert set(listed) == set(ARCHITECTURES)
    for name, spec in ARCHITECTURES.items():
        assert listed[name][0] == ", ".join(spec.mlp_modules), name
        assert ("Conv1D" in listed[name][1]) == spec.transposed, name
