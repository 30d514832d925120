"""Named sets read from files: one integer a line, or a CSV column; checkpoints and reloads keep them right."""

from __future__ import annotations

import pytest

from engine import Engine, RulesError, load_rules, parse_rules
from engine.compiler import compile_program
from engine.rules import InSet
from tests.conftest import make_batch

SUB = 8613800138000
T0 = 1_700_000_000_000
LOCATION = 5

AIRPORT_RULES = """
[sets]
airports = {{ file = "{file}"{column} }}

[[rule]]
id = "airport_lounge"
on = "location"
where = "cell in airports"
channels = ["portal"]
"""


def write_rules(tmp_path, set_text: str, file: str = "airport_cells.txt", column: str | None = None):
    (tmp_path / file).write_text(set_text)
    path = tmp_path / "rules.toml"
    path.write_text(AIRPORT_RULES.format(file=file, column="" if column is None else f', column = "{column}"'))
    return path


def at_cell(*cells: int) -> dict:
    return make_batch([{"ts": T0 + k, "msisdn": SUB, "kind": LOCATION, "cell": c} for k, c in enumerate(cells)])


def test_text_set_file_with_comments_and_blank_lines(tmp_path):
    path = write_rules(tmp_path, "# Beijing Capital\n460001234\n\n  460001235  # T3\n460001234\n-7\n")
    ruleset = load_rules(path)
    assert ruleset.sets["airports"] == (-7, 460001234, 460001235)
    assert ruleset.rules[0].where == InSet("cell", (-7, 460001234, 460001235), "airports")
    assert ruleset.set_files == {"airports": str(tmp_path / "airport_cells.txt")}


def test_csv_set_file_column(tmp_path):
    path = write_rules(tmp_path, "name,cell\nPEK T2,460001234\nPEK T3, 460001235\n", "cells.csv", "cell")
    assert load_rules(path).sets["airports"] == (460001234, 460001235)


def test_a_set_file_compiles_exactly_like_the_inline_list(tmp_path):
    path = write_rules(tmp_path, "460001235\n460001234\n")
    inline = parse_rules(AIRPORT_RULES.replace('{{ file = "{file}"{column} }}', "[460001234, 460001235]"))
    from_file, from_list = compile_program(load_rules(path)), compile_program(inline)
    assert from_file.keys() == from_list.keys()
    for key, value in from_file.items():
        assert str(value) == str(from_list[key]), key


def test_an_empty_set_file_matches_nothing(tmp_path):
    path = write_rules(tmp_path, "# switched off for now\n\n")
    engine = Engine.from_files(path)
    assert engine.process(at_cell(0, 1, 460001234)).num_rows == 0


@pytest.mark.parametrize(("content", "line", "text"), [
    ("460001234\nPEK\n", "line 2", "PEK"),
    ("1\n2\n99999999999999999999\n", "line 3", "99999999999999999999"),
    ("1.5\n", "line 1", "1.5"),
])
def test_bad_line_names_rules_file_set_file_and_line(tmp_path, content, line, text):
    path = write_rules(tmp_path, content)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    message = str(info.value)
    assert str(path) in message and "airports" in message and "airport_cells.txt" in message
    assert line in message and text in message


def test_bad_csv_value_names_its_line(tmp_path):
    path = write_rules(tmp_path, "name,cell\nT2,460001234\nT3,\nT4,x\n", "cells.csv", "cell")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    message = str(info.value)
    assert "cells.csv" in message and "row 2 after the header" in message and "airports" in message


def test_unknown_csv_column_lists_the_columns(tmp_path):
    path = write_rules(tmp_path, "name,cgi\nT2,460001234\n", "cells.csv", "cell")
    with pytest.raises(RulesError, match=r"no column 'cell' \(columns: name, cgi\)"):
        load_rules(path)


def test_missing_set_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(AIRPORT_RULES.format(file="nowhere.txt", column=""))
    with pytest.raises(RulesError, match="nowhere.txt: cannot read"):
        load_rules(path)


@pytest.mark.parametrize("spec", ['{ file = 3 }', '{ path = "x.txt" }', '{ file = "x.csv", column = 1 }',
                                  '{ file = "x.csv", column = "cell", header = true }'])
def test_malformed_set_file_table(tmp_path, spec):
    with pytest.raises(RulesError, match=r"\[sets\]: a set file is"):
        parse_rules(f"[sets]\nairports = {spec}\n", base=tmp_path)


def test_relative_set_file_needs_a_base_directory(tmp_path):
    write_rules(tmp_path, "460001234\n")
    text = AIRPORT_RULES.format(file="airport_cells.txt", column="")
    with pytest.raises(RulesError, match="relative set file needs the rules file's directory"):
        parse_rules(text, source="inline")
    assert parse_rules(text, base=tmp_path).sets["airports"] == (460001234,)
    absolute = AIRPORT_RULES.format(file=tmp_path / "airport_cells.txt", column="")
    assert parse_rules(absolute).sets["airports"] == (460001234,)


def test_restore_needs_no_set_file(tmp_path):
    path = write_rules(tmp_path, "460001234\n460001235\n")
    engine = Engine.from_files(path)
    assert engine.process(at_cell(460001234)).num_rows == 1
    engine.checkpoint(tmp_path / "ckpt")
    (tmp_path / "airport_cells.txt").unlink()
    path.unlink()
    restored = Engine.restore(tmp_path / "ckpt")
    assert restored.ruleset.sets["airports"] == (460001234, 460001235)
    assert restored.process(at_cell(460001235)).num_rows == 1
    restored.checkpoint(tmp_path / "ckpt2")  # and a restored engine checkpoints its sets again
    assert Engine.restore(tmp_path / "ckpt2").ruleset.sets["airports"] == (460001234, 460001235)


def test_reload_rereads_set_files_and_a_changed_set_is_a_changed_rule(tmp_path):
    path = write_rules(tmp_path, "460001234\n")
    engine = Engine.from_files(path)
    assert engine.reload_rules(path)["kept"] == ["airport_lounge"]
    (tmp_path / "airport_cells.txt").write_text("460001234\n460001999\n")
    assert engine.reload_rules(path)["fresh"] == ["airport_lounge"]
    assert engine.process(at_cell(460001999)).num_rows == 1
