"""Readers and load_splits: every bad row names file:line and the fix; chat supervises only the final assistant turn;
generated splits are disjoint and reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dg_pipeline.core.errors import InputError
from dg_pipeline.data import (
    BoardCodec,
    build_board_tokenizer,
    chat_examples,
    generate_boards,
    load_splits,
    read_boards,
    read_chat_jsonl,
    read_kaggle_csv,
)
from dg_pipeline.data.tokenizer import CHAT_EOS_IDS, build_char_tokenizer
from dg_pipeline.settings import DataSettings, group_settings

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
PUZZLE_4, SOLUTION_4 = "1030040221000320", "1234341221434321"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ---------------------------------------------------------------- Sudoku files


def test_kaggle_csv_accepts_dots_as_blanks_and_normalises_them_to_zero(tmp_path):
    path = write(tmp_path / "k.csv", f"quizzes,solutions\n{PUZZLE_4.replace('0', '.')},{SOLUTION_4}\n\n")
    assert [tuple(b) for b in read_kaggle_csv(path)] == [(PUZZLE_4, SOLUTION_4)]


def test_a_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_and_crlf_reads_the_same(tmp_path):
    path = tmp_path / "k.csv"
    path.write_bytes(f"\ufeffquizzes,solutions\r\n{PUZZLE_4},{SOLUTION_4}\r\n".encode())
    assert [tuple(b) for b in read_kaggle_csv(path)] == [(PUZZLE_4, SOLUTION_4)]


@pytest.mark.parametrize(
    "row,says",
    [
        (f"{PUZZLE_4[:-1]},{SOLUTION_4}", "puzzle has 15 characters, expected 16 for a 4x4 board"),
        (f"{PUZZLE_4[:5]}a{PUZZLE_4[6:]},{SOLUTION_4}", "puzzle has non-digit character 'a' at row 2 col 2"),
        (f"{PUZZLE_4[:6]}3{PUZZLE_4[7:]},{SOLUTION_4}", "solution contradicts clue at row 2 col 3"),
        (f"{PUZZLE_4},{SOLUTION_4},extra", "row has 3 field(s), the header has 2"),
    ],
)
def test_a_bad_csv_row_names_the_file_line_and_the_fault(tmp_path, row, says):
    path = write(tmp_path / "k.csv", f"quizzes,solutions\n{PUZZLE_4},{SOLUTION_4}\n{row}\n")
    with pytest.raises(InputError) as err:
        read_kaggle_csv(path, size=4)
    assert str(err.value).startswith(f"{path}:3: {says}")
    assert "(fix: " in str(err.value)


def test_a_csv_without_the_kaggle_header_is_refused_at_line_1(tmp_path):
    path = write(tmp_path / "k.csv", f"{PUZZLE_4},{SOLUTION_4}\n")
    with pytest.raises(InputError, match=r"k\.csv:1: header is .* expected columns `quizzes,solutions`"):
        read_kaggle_csv(path)


def test_a_board_of_another_size_than_data_size_is_refused(tmp_path):
    path = jsonl(tmp_path / "b.jsonl", [{"puzzle": PUZZLE_4, "solution": SOLUTION_4}])
    with pytest.raises(InputError, match=r"b\.jsonl:1: puzzle has 16 characters, expected 81 for a 9x9 board"):
        read_boards(path, size=9)


@pytest.mark.parametrize(
    "line,says",
    [
        ('{"puzzle": "1030", ', "invalid JSON at column"),
        (json.dumps({"puzzle": PUZZLE_4}), "missing key 'solution'"),
        (json.dumps({"puzzle": 1030040221000320, "solution": SOLUTION_4}), "'puzzle' is a int, not a string"),
        (json.dumps([PUZZLE_4, SOLUTION_4]), "expected a JSON object, got list"),
    ],
)
def test_a_bad_board_jsonl_line_names_the_file_line_and_the_fault(tmp_path, line, says):
    path = jsonl(tmp_path / "b.jsonl", [{"puzzle": PUZZLE_4, "solution": SOLUTION_4}, "", line])
    with pytest.raises(InputError) as err:
        read_boards(path)
    assert str(err.value).startswith(f"{path}:3: {says}")  # line 2 is blank and skipped


def test_the_format_of_a_file_without_a_known_extension_is_read_from_its_content(tmp_path):
    as_jsonl = jsonl(tmp_path / "boards.txt", [{"puzzle": PUZZLE_4, "solution": SOLUTION_4}])
    as_csv = write(tmp_path / "boards.data", f"quizzes,solutions\n{PUZZLE_4},{SOLUTION_4}\n")
    assert read_boards(as_jsonl) == read_boards(as_csv)


def test_the_shipped_samples_read_cleanly():
    assert len(read_boards(SAMPLES / "sudoku4_kaggle.csv", size=4)) == 5
    assert len(read_boards(SAMPLES / "sudoku9_kaggle.csv", size=9)) == 5
    assert len(read_boards(SAMPLES / "sudoku4.jsonl", size=4)) == 3
    assert len(read_chat_jsonl(SAMPLES / "chat_prompt_completion.jsonl")) == 4
    assert len(read_chat_jsonl(SAMPLES / "chat_messages.jsonl")) == 3


# ---------------------------------------------------------------- chat files


def test_only_the_final_assistant_turn_is_supervised_and_the_rest_is_the_templated_prompt(tmp_path):
    tok = build_char_tokenizer()
    conversation = [
        {"role": "user", "content": "pick a prime"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "another"},
        {"role": "assistant", "content": "5 too"},
    ]
    path = jsonl(tmp_path / "c.jsonl", [{"messages": conversation}])
    [example] = chat_examples(read_chat_jsonl(path), tok, eos_token_ids=CHAT_EOS_IDS)
    # Exactly what the template writes for the turn, through its end-of-turn token (<turn|>, a stop id).
    assert tok.decode(example.response_ids) == "5 too<turn|>"
    assert example.response_ids[-1] == tok.convert_tokens_to_ids("<turn|>") == 106
    prompt = tok.decode(example.prompt_ids)
    assert prompt == (
        "<bos><|turn>user\npick a prime<turn|>\n<|turn>model\n7<turn|>\n"
        "<|turn>user\nanother<turn|>\n<|turn>model\n"
    )
    assert example.meta == {"prompt": prompt, "completion": "5 too", "source": f"{path}:1"}


def test_a_prompt_completion_row_is_one_user_turn_and_plain_text_without_a_chat_template(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    [templated] = chat_examples(read_chat_jsonl(path), build_char_tokenizer(), eos_token_ids=CHAT_EOS_IDS)
    [plain] = chat_examples(read_chat_jsonl(path), build_char_tokenizer(chat_template=False),
                            eos_token_ids=CHAT_EOS_IDS)
    assert templated.meta["prompt"] == "<bos><|turn>user\n2+2?<turn|>\n<|turn>model\n"
    assert plain.meta["prompt"] == "2+2?"
    four = build_char_tokenizer().convert_tokens_to_ids("4")
    assert templated.response_ids == [four, 106]  # the template's end of turn
    assert plain.response_ids == [four, 1]  # no template: the tokenizer's <eos>, one of the stop ids


@pytest.mark.parametrize(
    "row,says",
    [
        ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
         "the last message is from 'user', not the assistant"),
        ({"prompt": "q", "completion": "  "}, "empty completion"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty completion"),
        ({"question": "q", "answer": "a"}, "missing key"),
        ({"prompt": "q"}, "missing key 'completion'"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
         'message 0 needs "role" and "content"'),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "no prompt"),
        ("not json", "invalid JSON"),
    ],
)
def test_a_bad_chat_row_names_the_file_line_and_the_fault(tmp_path, row, says):
    path = jsonl(tmp_path / "c.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(InputError) as err:
        read_chat_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: {says}")
    assert "fix: " in str(err.value)


def test_the_developer_role_is_a_system_turn_and_list_content_keeps_its_text_parts(tmp_path):
    tok = build_char_tokenizer()
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
    ]
    [example] = chat_examples(read_chat_jsonl(jsonl(tmp_path / "c.jsonl", [{"messages": messages}])), tok,
                              eos_token_ids=CHAT_EOS_IDS)
    assert example.meta["prompt"] == "<bos><|turn>system\nbe brief<turn|>\n<|turn>user\n2+2?<turn|>\n<|turn>model\n"
    assert tok.decode(example.response_ids) == "4<turn|>"


def test_a_non_text_content_part_is_refused_naming_the_row_the_message_and_the_part_type(tmp_path):
    image = {"type": "image_url", "image_url": {"url": "x.png"}}
    rows = [{"prompt": "ok", "completion": "fine"},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, image]},
                          {"role": "assistant", "content": "a cat"}]}]
    path = jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(InputError) as err:
        read_chat_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: message 0 content part 1 is of type 'image_url'; only text parts")


CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}


def test_tool_calls_and_reasoning_are_kept_where_the_template_writes_them(tmp_path):
    tok = build_char_tokenizer()
    answer = {"role": "assistant", "content": "4", "reasoning_content": "2 and 2", "tool_calls": [CALL]}
    path = jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "2+2?"}, answer]}])
    [example] = chat_examples(read_chat_jsonl(path), tok, eos_token_ids=CHAT_EOS_IDS)
    assert tok.decode(example.response_ids) == (
        '<|channel>thought\n2 and 2<channel|>4<|tool_call>call:add{"a": 2, "b": 2}<tool_call|><turn|>'
    )


@pytest.mark.parametrize("key,value", [("tool_calls", [CALL]), ("reasoning_content", "2 and 2")])
def test_tool_calls_or_reasoning_the_template_would_drop_are_refused_naming_the_row_and_the_key(tmp_path, key, value):
    answer = {"role": "assistant", "content": "4", key: value}
    path = jsonl(tmp_path / "c.jsonl", [{"prompt": "ok", "completion": "fine"},
                                        {"messages": [{"role": "user", "content": "2+2?"}, answer]}])
    records = read_chat_jsonl(path)
    plain_template = build_char_tokenizer()
    plain_template.chat_template = (  # writes only role and content, as many templates do
        "{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<turn|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
    )
    with pytest.raises(InputError) as err:
        chat_examples(records, plain_template, eos_token_ids=CHAT_EOS_IDS)
    assert str(err.value).startswith(f"{path}:2: message 1 has \"{key}\" but the tokenizer's chat template does not")
    with pytest.raises(InputError) as err:
        chat_examples(records, build_char_tokenizer(chat_template=False), eos_token_ids=CHAT_EOS_IDS)
    assert str(err.value).startswith(f"{path}:2: \"{key}\" needs a chat template")


def test_a_template_turn_that_ends_in_none_of_the_models_stop_ids_is_refused(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    with pytest.raises(InputError) as err:  # the tokenizer's <eos> alone: the model would never stop at <turn|>
        chat_examples(read_chat_jsonl(path), build_char_tokenizer(), eos_token_ids=(1,))
    assert str(err.value).startswith(f"{path}:1: the chat template ends the assistant turn")
    assert "eos_token_id in the model's generation_config.json" in str(err.value)


def test_a_prompt_longer_than_max_prompt_length_names_the_row_and_the_key(tmp_path):
    rows = [{"prompt": "short", "completion": "a"}, {"prompt": "x" * 40, "completion": "b"}]
    path = jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(InputError) as err:
        chat_examples(read_chat_jsonl(path), build_char_tokenizer(chat_template=False), max_prompt_length=30)
    assert str(err.value).startswith(f"{path}:2: prompt is 40 tokens, longer than data.max_prompt_length=30")


# ---------------------------------------------------------------- load_splits


def sudoku_cfg(**overrides):
    group = OmegaConf.load(REPO / "conf" / "data" / "sudoku4.yaml")
    return group_settings(DataSettings, group, {"n_train": 300, "n_val": 40, "n_eval": 60, "workers": 1, **overrides})


def puzzles(examples) -> set[str]:
    return {e.meta["puzzle"] for e in examples}


def test_generated_splits_are_disjoint_by_puzzle_and_hold_the_asked_counts(tmp_path):
    splits = load_splits(sudoku_cfg(), build_board_tokenizer(), tmp_path, seed=1)
    train, val, held_out = puzzles(splits.train), puzzles(splits.val), puzzles(splits.eval)
    assert (len(train), len(val), len(held_out)) == (300, 40, 60)
    assert not (train & val or train & held_out or val & held_out)
    # The layout of docs/ARCHITECTURE.md: <bos> board <sep> -> solution <eos>.
    codec, first = BoardCodec(build_board_tokenizer()), splits.train[0]
    assert first.prompt_ids == [codec.bos_id, *codec.encode(first.meta["puzzle"]), codec.sep_id]
    assert first.response_ids == [*codec.encode(first.meta["solution"]), codec.eos_id]


def test_generated_files_are_reused_while_the_parameters_match_and_remade_otherwise(tmp_path):
    tok = build_board_tokenizer()
    first = load_splits(sudoku_cfg(), tok, tmp_path, seed=1)
    train_file = tmp_path / "data" / "train.jsonl"
    assert json.loads((tmp_path / "data" / "params.json").read_text())["n_train"] == 300
    stamp = train_file.stat().st_mtime_ns

    again = load_splits(sudoku_cfg(), tok, tmp_path, seed=1)
    assert train_file.stat().st_mtime_ns == stamp
    assert [e.meta for e in again.train] == [e.meta for e in first.train]

    more = load_splits(sudoku_cfg(n_train=350), tok, tmp_path, seed=1)
    assert train_file.stat().st_mtime_ns != stamp and len(more.train) == 350
    assert [e.meta for e in more.eval] == [e.meta for e in first.eval]  # the held-out set does not move

    other_seed = load_splits(sudoku_cfg(), tok, tmp_path, seed=2)
    assert puzzles(other_seed.eval) != puzzles(first.eval)


def test_a_training_file_without_an_eval_file_is_split_three_ways_without_overlap(tmp_path):
    boards = generate_boards(4, 120, 4, 10, seed=9)
    rows = [{"puzzle": b.puzzle, "solution": b.solution} for b in boards]
    path = jsonl(tmp_path / "train.jsonl", rows + rows[:10])  # duplicates in the file are dropped
    cfg = sudoku_cfg(train_path=str(path), n_train=None, n_val=20, n_eval=30)
    splits = load_splits(cfg, build_board_tokenizer(), tmp_path, seed=0)
    train, val, held_out = puzzles(splits.train), puzzles(splits.val), puzzles(splits.eval)
    assert (len(train), len(val), len(held_out)) == (70, 20, 30)
    assert not (train & val or train & held_out or val & held_out)
    assert not (tmp_path / "data").exists()  # nothing generated


def test_an_eval_file_alone_keeps_its_boards_and_the_generated_training_boards_avoid_them(tmp_path):
    held = generate_boards(4, 50, 4, 10, seed=1)  # the same stream the training boards come from
    path = jsonl(tmp_path / "eval.jsonl", [{"puzzle": b.puzzle, "solution": b.solution} for b in held])
    splits = load_splits(sudoku_cfg(eval_path=str(path), n_eval=None), build_board_tokenizer(), tmp_path, seed=1)
    assert [e.meta["puzzle"] for e in splits.eval] == [b.puzzle for b in held]
    assert not (puzzles(splits.train) | puzzles(splits.val)) & puzzles(splits.eval)
    assert len(splits.train) == 300 and len(splits.val) == 40


def test_chat_without_a_train_path_names_the_key(tmp_path):
    cfg = group_settings(DataSettings, OmegaConf.load(REPO / "conf" / "data" / "chat.yaml"))  # train_path: ???
    with pytest.raises(InputError, match=r"data\.train_path is required for recipe=chat"):
        load_splits(cfg, build_char_tokenizer(), tmp_path, seed=0)


def test_chat_splits_hold_out_eval_and_val_prompts_from_training(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(30)]
    path = jsonl(tmp_path / "chat.jsonl", rows + rows[:5])
    cfg = group_settings(DataSettings, OmegaConf.load(REPO / "conf" / "data" / "chat.yaml"),
                         {"train_path": str(path), "n_val": 4, "n_eval": 6})
    splits = load_splits(cfg, build_char_tokenizer(), tmp_path, seed=0, eos_token_ids=CHAT_EOS_IDS)
    prompts = [{e.meta["completion"] for e in s} for s in (splits.train, splits.val, splits.eval)]
    assert [len(p) for p in prompts] == [20, 4, 6]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_an_unknown_kind_and_a_too_small_max_prompt_length_name_their_keys(tmp_path):
    with pytest.raises(InputError, match=r"data\.kind='images': unknown data kind"):
        load_splits(group_settings(DataSettings, {"kind": "images"}), build_board_tokenizer(), tmp_path, seed=0)
    with pytest.raises(InputError, match=r"data\.max_prompt_length=10: a 4x4 prompt is 18 tokens .*>=18"):
        load_splits(sudoku_cfg(max_prompt_length=10), build_board_tokenizer(), tmp_path, seed=0)
