"""The catalog format: every kind of bad line is reported with its file and line, all at once."""

from __future__ import annotations

import json

import pytest

from rcllm.data.catalog import CatalogError, load_catalog, write_catalog


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def catalog_error(path, **kwargs) -> str:
    with pytest.raises(CatalogError) as info:
        load_catalog(path, **kwargs)
    return str(info.value)


def test_valid_catalog_keeps_fields_order_and_skips_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "catalog.jsonl",
        [
            '{"id": "1", "title": "Toy Story", "year": 1995, "categories": ["Animation"], "studio": "Pixar"}',
            "",
            "   ",
            '{"id": "2", "title": "Heat", "year": null, "text": "A heist.", "description": null}',
        ],
    )
    items = load_catalog(path)
    assert [i["id"] for i in items] == ["1", "2"]
    assert items[0]["studio"] == "Pixar"  # unknown fields are kept
    assert items[1]["year"] is None


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "1", "title": ', "malformed JSON"),
        ('["1", "Heat"]', "expected a JSON object, got array"),
        ('{"title": "Heat"}', "missing id"),
        ('{"id": "", "title": "Heat"}', "id is empty"),
        ('{"id": 7, "title": "Heat"}', "id must be a string"),
        ('{"id": "1"}', "missing title"),
        ('{"id": "1", "title": "  "}', "title is empty"),
        ('{"id": "1", "title": 3}', "title must be a string"),
        ('{"id": "1", "title": "Heat", "year": "1995"}', "year must be an integer or null"),
        ('{"id": "1", "title": "Heat", "year": true}', "year must be an integer or null"),
        ('{"id": "1", "title": "Heat", "categories": "Crime"}', "categories must be a list of strings"),
        ('{"id": "1", "title": "Heat", "categories": ["Crime", 2]}', "categories must be a list of strings"),
        ('{"id": "1", "title": "Heat", "text": ["a"]}', "text must be a string"),
        ('{"id": "1", "title": "Heat", "description": 5}', "description must be a string"),
    ],
)
def test_each_bad_line_is_reported_with_file_and_line(tmp_path, line, problem):
    path = write_lines(tmp_path / "catalog.jsonl", ['{"id": "0", "title": "Fine"}', "", line])
    message = catalog_error(path)
    assert f"{path}:3: {problem}" in message
    assert f"{path}:1:" not in message


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        ['{"id": "a", "title": "A"}', '{"id": "b", "title": "B"}', '{"id": "a", "title": "A again"}'],
    )
    assert f"{path}:3: duplicate id 'a' (first on line 1)" in catalog_error(path)


def test_every_problem_is_listed_up_to_max_errors_then_counted(tmp_path):
    lines = ['{"id": %d, "title": "x"}' % n for n in range(30)]
    path = write_lines(tmp_path / "c.jsonl", lines)
    message = catalog_error(path, max_errors=5)
    assert "30 problems" in message
    assert f"{path}:5: id must be a string" in message
    assert f"{path}:6:" not in message
    assert "and 25 more" in message


def test_item_over_max_item_tokens_is_refused(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        ['{"id": "short", "title": "Up"}', '{"id": "long", "title": "The Lord of the Rings: The Return of the King"}'],
    )

    def words(item):
        return len(item["title"].split())

    message = catalog_error(path, max_item_tokens=4, count_tokens=words)
    assert f"{path}:2: item 'long' is 10 tokens, over max_item_tokens=4" in message
    assert f"{path}:1:" not in message
    assert [i["id"] for i in load_catalog(path, max_item_tokens=10, count_tokens=words)] == ["short", "long"]
    with pytest.raises(ValueError, match="count_tokens"):
        load_catalog(path, max_item_tokens=4)


def test_invalid_utf8_is_a_line_problem(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "1", "title": "ok"}\n{"id": "2", "title": "Mis\xe9rables"}\n')
    assert f"{path}:2: not valid UTF-8" in catalog_error(path)


def test_write_catalog_round_trips_atomically(tmp_path):
    items = [{"id": "1", "title": "Misérables, Les", "year": 1995, "categories": ["Drama"]}, {"id": "2", "title": "B"}]
    path = tmp_path / "out" / "catalog.jsonl"
    write_catalog(items, path)
    assert load_catalog(path) == items
    assert [p.name for p in path.parent.iterdir()] == ["catalog.jsonl"]  # no temp file left behind
    assert "Misérables" in path.read_text(encoding="utf-8")  # readable UTF-8, not \\u escapes


def test_write_catalog_refuses_bad_items_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "catalog.jsonl"
    write_catalog([{"id": "1", "title": "A"}], path)
    with pytest.raises(CatalogError, match="2: duplicate id '1'"):
        write_catalog([{"id": "1", "title": "A"}, {"id": "1", "title": "B"}], path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"id": "1", "title": "A"}]
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.jsonl"]


def test_failed_write_leaves_no_temp_file_and_the_old_file_intact(tmp_path):
    path = tmp_path / "catalog.jsonl"
    write_catalog([{"id": "1", "title": "A"}], path)
    with pytest.raises(TypeError):  # not JSON-serializable: fails halfway through the write
        write_catalog([{"id": "1", "title": "A"}, {"id": "2", "title": "B", "extra": object()}], path)
    assert load_catalog(path) == [{"id": "1", "title": "A"}]
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.jsonl"]
