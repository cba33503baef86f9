"""Prompt schedule files: tab-separated lines, the official interactive CSV, header-less CSV; errors name file:line."""

import pytest

from helios.sampling.prompts import read_schedule

OFFICIAL = '''id,prompt_index,prompt
6,1,"The vortex intensifies, pulling an anchor from the sand."
6,0,"Underwater tornado affecting the ocean floor."
8,1,"A serene woman with pink hair."
'''


def test_tab_separated_lines(tmp_path):
    path = tmp_path / "story.tsv"
    path.write_text("# a fox's day\n2\ta red fox wakes up\n\n1\ta fox in the snow, at night\n")
    assert read_schedule(path) == [("a red fox wakes up", 2), ("a fox in the snow, at night", 1)]


def test_the_official_interactive_csv(tmp_path):
    path = tmp_path / "prompt_interactive_helios.csv"
    path.write_text(OFFICIAL)
    # One video per id, prompts in prompt_index order, each held for --interpolate_time chunks (7 by default).
    assert read_schedule(path, video_id="6") == [
        ("Underwater tornado affecting the ocean floor.", 7),
        ("The vortex intensifies, pulling an anchor from the sand.", 7),
    ]
    assert read_schedule(path, chunks_per_prompt=2, video_id="8") == [("A serene woman with pink hair.", 2)]
    with pytest.raises(ValueError, match=r"holds 2 videos \(ids 6, 8\)"):
        read_schedule(path)
    with pytest.raises(ValueError, match="no rows with id 9"):
        read_schedule(path, video_id="9")


def test_csv_with_a_chunk_column_and_without_a_header(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,n_chunks,refined_prompt\nshort,2,a longer prompt\nplain,1,\n")
    assert read_schedule(tmp_path / "a.csv") == [("a longer prompt", 2), ("plain", 1)]
    (tmp_path / "b.csv").write_text('3,a cat, sitting\n1,"a dog, running"\n')
    assert read_schedule(tmp_path / "b.csv") == [("a cat, sitting", 3), ("a dog, running", 1)]


@pytest.mark.parametrize("name,text,message", [
    ("s.tsv", "2\tok\n2 no tab here\n", r"s.tsv:2: expected 'n_chunks<TAB>prompt'"),
    ("s.tsv", "\n0\tzero chunks\n", r"s.tsv:2: the number of chunks must be a positive integer, got '0'"),
    ("s.tsv", "x\tnot a number\n", r"s.tsv:1: the number of chunks"),
    ("s.tsv", "# only a comment\n", "no prompts"),
    ("s.csv", "prompt,chunks\nfine,1\nbad,-2\n", r"s.csv:3: the number of chunks"),
    ("s.csv", "2,\n", r"s.csv:1: .*no prompt"),
    ("s.csv", "prompt_index,prompt\nfirst,x\n", r"s.csv:2: prompt_index must be an integer"),
])
def test_errors_name_the_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_schedule(tmp_path / name)


def test_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="missing.tsv: cannot read it"):
        read_schedule(tmp_path / "missing.tsv")
