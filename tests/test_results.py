"""Result files: a summary rebuilt from unchanged results keeps its bytes and stamp."""


def test_a_summary_rebuilt_with_the_same_results_keeps_its_file_and_stamp(tmp_path):
    import json

    from controltune.results import write_json_unless_same

    path = tmp_path / "summary.json"
    write_json_unless_same(path, {"created": "then", "versions": {"torch": "1"}, "rows": [1, 2]})
    before = path.read_bytes()
    write_json_unless_same(path, {"created": "now", "versions": {"torch": "2"}, "rows": [1, 2]})
    assert path.read_bytes() == before  # same results: not a new result
    write_json_unless_same(path, {"created": "now", "versions": {"torch": "2"}, "rows": [1, 3]})
    assert json.loads(path.read_text()) == {"created": "now", "versions": {"torch": "2"}, "rows": [1, 3]}
    path.write_text("{torn")  # an unreadable file is replaced, not trusted
    write_json_unless_same(path, {"created": "now", "versions": {}, "rows": []})
    assert json.loads(path.read_text())["rows"] == []
