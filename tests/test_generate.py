"""qlora generate: exact output contract, sampling flags, stop strings, streaming, batch files."""

import io
import json
import subprocess
import sys

import pytest

from conftest import ROW, ROW_WITH_INPUT
from qlora.config import GenerationSection
from qlora.errors import RunInterrupted, UserError
from qlora.files import complete_lines
from qlora.generate import (StopAwareStreamer, chat, cut_from_rows, decode_escapes, generate, generate_file,
                             load_run, read_prompt_rows, row_line, rows_already_written)

GREEDY = GenerationSection(max_new_tokens=60)


@pytest.fixture(scope="module")
def loaded(memorised_run):
    return load_run(memorised_run)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "qlora.cli", "generate", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_stdout_is_exactly_the_generated_text(memorised_run):
    result = cli(memorised_run, "--temperature", "0", "--prompt", ROW["instruction"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == ROW["output"] + "\n"


def test_several_prompts_are_separated_by_a_blank_line(memorised_run):
    result = cli(memorised_run, "--prompt", ROW["instruction"], "--prompt", ROW["instruction"])
    assert result.stdout == f"{ROW['output']}\n\n{ROW['output']}\n"


def test_stream_prints_the_same_text(memorised_run):
    result = cli(memorised_run, "--stream", "--prompt", ROW["instruction"])
    assert result.stdout == ROW["output"] + "\n"


def test_stop_typed_in_a_shell_reads_its_escapes_as_meant(memorised_run):
    """`--stop "\\n    "` in bash passes a backslash and an n: it ends the answer at the first indented line."""
    result = cli(memorised_run, "--temperature", "0", "--prompt", ROW["instruction"], "--stop", "\\n    ")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "def reverse(s):\n"


def test_decode_escapes_leaves_other_backslashes_as_typed():
    assert [decode_escapes(t) for t in ("a\\tb\\r", "\\\\n", "\\d+", "é\\n", "end\\")] == [
        "a\tb\r", "\\n", "\\d+", "é\n", "end\\"]


def test_beam_search(loaded):
    assert generate(loaded, [(ROW["instruction"], "")], GREEDY.model_copy(update={"num_beams": 3})) == [ROW["output"]]


def test_beam_search_cannot_stream_and_says_so(memorised_run):
    result = cli(memorised_run, "--prompt", ROW["instruction"], "--num-beams", "3", "--stream")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("error: num_beams=3: beam search picks its text only")


def test_stop_string_ends_the_output_before_it(loaded):
    sampling = GREEDY.model_copy(update={"stop": ["[::", "never"]})
    expected = ROW["output"].split("[::")[0]
    assert generate(loaded, [(ROW["instruction"], "")], sampling) == [expected]
    out = io.StringIO()
    generate(loaded, [(ROW["instruction"], "")], sampling, streamer=StopAwareStreamer(loaded, sampling, out))
    assert out.getvalue() == expected


def test_same_seed_same_sample(loaded):
    sampling = GREEDY.model_copy(update={"temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 7})
    prompts = [(ROW_WITH_INPUT["instruction"], ROW_WITH_INPUT["input"])] * 2
    first = generate(loaded, prompts, sampling)
    assert generate(loaded, prompts, sampling) == first
    assert first[0] != first[1] or len(set(generate(loaded, prompts * 3, sampling))) > 1  # really sampling


def test_left_padded_batch_gives_the_unbatched_answer(loaded):
    long_prompt = ("Explain this code in detail and then rewrite it to be faster. " * 5, "x = 1")
    texts = generate(loaded, [long_prompt, (ROW["instruction"], "")], GREEDY, batch_size=2)
    assert texts[1] == ROW["output"]


def test_batch_jsonl_round_trip(loaded, tmp_path):
    rows = [ROW_WITH_INPUT, {"instruction": ROW["instruction"], "id": 7}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert generate_file(loaded, source, read_prompt_rows(source), tmp_path / "out.jsonl", GREEDY, 2) == (2, 0)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "generation"} for r in out] == rows
    assert out[1]["generation"] == ROW["output"] and isinstance(out[0]["generation"], str)


def test_batch_file_with_a_bad_row_names_it(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(ROW) + "\n\n" + json.dumps({"input": "no instruction"}) + "\n")
    with pytest.raises(UserError, match=r"row 1 \(line 3\) has no instruction"):
        read_prompt_rows(source)


def test_an_interrupted_batch_file_keeps_its_rows_and_the_same_command_continues(loaded, tmp_path, monkeypatch):
    rows = [{"instruction": ROW["instruction"], "id": i} for i in range(5)]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []

    def interrupted_after_two_batches(loaded, prompts, sampling, batch_size):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(loaded, prompts, sampling, batch_size)

    real_generate = generate
    monkeypatch.setattr("qlora.generate.generate", interrupted_after_two_batches)
    with pytest.raises(RunInterrupted, match=f"4 of 5 rows are in {out}; run the same command"):
        generate_file(loaded, source, rows, out, GREEDY, 2)
    with out.open("a") as f:
        f.write(row_line(rows[4], ROW["output"])[:60])  # and a crash in the middle of the next line
    calls.clear()
    assert generate_file(loaded, source, rows, out, GREEDY, 2) == (1, 4)
    assert calls == [1]  # only the missing row was generated
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == [0, 1, 2, 3, 4]
    assert {r["generation"] for r in written} == {ROW["output"]}
    assert generate_file(loaded, source, rows, out, GREEDY, 2) == (0, 5) and calls == [1]


def test_chat_answers_each_line_until_exit(loaded, capsys):
    lines = iter([ROW["instruction"], "", "exit", "not reached"])
    chat(loaded, GREEDY, read=lambda prompt: next(lines))
    assert capsys.readouterr().out == ROW["output"] + "\n"


def test_usage_errors_exit_2_before_loading_anything(tmp_path):
    assert cli(tmp_path, "--prompt", "x", "--top-p", "3").returncode == 2
    assert cli(tmp_path).returncode == 2
    result = cli(tmp_path, "--prompt", "x")
    assert result.returncode == 2 and "not a qlora run directory" in result.stderr


def test_a_finished_output_file_is_left_alone_without_loading_a_model(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps(ROW) + "\n")
    out.write_text(json.dumps({**ROW, "generation": "x"}) + "\n")
    result = cli(tmp_path / "no-run", "--input-file", source, "--output-file", out)  # no model anywhere
    assert result.returncode == 0 and "all 1 rows are already in" in result.stderr
    assert out.read_text() == json.dumps({**ROW, "generation": "x"}) + "\n"


CUT_ROWS = [{"instruction": "Écris \"ça\"", "id": 0}, {"instruction": "Tab\there", "generation": "old", "n": [1, 2]}]
CUT_GENERATIONS = ["déjà vu \U0001F600 \"quoted\" back\\slash\nnew line \x01 \u2028", ""]


@pytest.mark.parametrize("index", [0, 1])
def test_its_own_line_cut_at_any_byte_is_recognised_and_only_it_is_cut(tmp_path, index):
    """A crash can cut the last line anywhere, even inside a character or an escape: every such cut is proven to be
    this command's own (the start of what it writes for that row) and cut off; the whole lines stay."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in CUT_ROWS))
    whole = "".join(row_line(r, g) + "\n" for r, g in zip(CUT_ROWS[:index], CUT_GENERATIONS)).encode()
    line = (row_line(CUT_ROWS[index], CUT_GENERATIONS[index]) + "\n").encode()
    for cut in range(1, len(line)):
        out.write_bytes(whole + line[:cut])
        assert rows_already_written(out, source, CUT_ROWS) == index and out.read_bytes() == whole + line[:cut]
        complete_lines(out, "--output-file", cut_from_rows(CUT_ROWS))
        assert out.read_bytes() == whole


@pytest.mark.parametrize("content", [
    b'{"accuracy": 0.93}',  # a user's one-line file: the report
    "".join(row_line(r, "x") + "\n" for r in CUT_ROWS).encode() + b'{"instr',  # a line past the last row
    (row_line(CUT_ROWS[0], "x") + "\n" + row_line(CUT_ROWS[0], "x")[:30]).encode(),  # the wrong row's start
    (row_line(CUT_ROWS[0], "x") + "\n" + "  ").encode(),
    row_line(CUT_ROWS[0], "x").encode()[:-1] + b', "extra": 1}',  # more than a generation after the fields
    row_line(CUT_ROWS[0], "x").encode()[:-4] + b"\xff\xfe",  # not UTF-8 where a character is cut
    row_line(CUT_ROWS[0], "x\ty").encode()[:-6] + b"\t",  # a raw tab, which json.dumps escapes
])
def test_a_last_line_this_command_did_not_write_is_refused_and_the_file_left_byte_identical(tmp_path, content):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in CUT_ROWS))
    out.write_bytes(content)
    for check in (lambda: rows_already_written(out, source, CUT_ROWS),
                  lambda: generate_file(None, source, CUT_ROWS, out, GREEDY)):  # refused before any model is used
        with pytest.raises(UserError, match=r"--output-file: .*out.jsonl line \d+ has no newline and is not the start"):
            check()
        assert out.read_bytes() == content


def test_a_users_one_line_file_survives_the_command(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "results.json"
    source.write_text(json.dumps(ROW) + "\n")
    out.write_bytes(b'{"accuracy": 0.93}')
    result = cli(tmp_path / "no-run", "--input-file", source, "--output-file", out)
    assert result.returncode == 2 and out.read_bytes() == b'{"accuracy": 0.93}'
    assert result.stderr.splitlines() == [f"error: --output-file: {out} line 1 has no newline and is not the start of "
                                          "a line this command writes, so the file is not its earlier output and is "
                                          "left as it is; name another file"]
