"""Scorers: what counts as solved / exact, and how cell and token accuracy are defined."""

import pytest

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.verify.scorers import CompletionScorer, Score, SudokuScorer, aggregate, scorer_for

SOLUTION = "1234341221434321"  # rows 1234 / 3412 / 2143 / 4321
PUZZLE = "1030040020000301"  # 6 clues, 10 blanks
OTHER_VALID_GRID = "2143341212344321"  # a complete valid grid that breaks the clue 1 at row 1 col 1


class Ex:
    def __init__(self, response_ids, **meta):
        self.prompt_ids, self.response_ids, self.meta = [], response_ids, meta


@pytest.fixture(scope="module")
def tok():
    return build_board_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def board_example(tok):
    return Ex(ids(tok, SOLUTION + "<eos>"), puzzle=PUZZLE, solution=SOLUTION)


def test_a_complete_valid_grid_keeping_every_clue_is_solved(tok):
    s = SudokuScorer(tok).score(ids(tok, SOLUTION + "<eos><pad><pad>"), board_example(tok))
    assert s.correct and s.reason == ""
    assert s.extras == {"cell_accuracy": 1.0, "cell_accuracy_all": 1.0}
    assert s.text == SOLUTION


def test_tokens_after_eos_are_ignored(tok):
    s = SudokuScorer(tok).score(ids(tok, SOLUTION + "<eos>99<sep>"), board_example(tok))
    assert s.correct


def test_a_wrong_digit_is_not_solved_and_costs_one_blank_cell(tok):
    wrong = SOLUTION[:1] + "1" + SOLUTION[2:]  # cell 2 is a blank of the puzzle
    s = SudokuScorer(tok).score(ids(tok, wrong + "<eos>"), board_example(tok))
    assert not s.correct
    assert "repeats 1 in row 1" in s.reason
    assert s.extras["cell_accuracy"] == pytest.approx(9 / 10)
    assert s.extras["cell_accuracy_all"] == pytest.approx(15 / 16)


def test_a_valid_grid_that_changes_a_clue_is_not_solved(tok):
    s = SudokuScorer(tok).score(ids(tok, OTHER_VALID_GRID + "<eos>"), board_example(tok))
    assert not s.correct
    assert "contradicts clue at row 1 col 1" in s.reason


def test_an_incomplete_board_is_not_solved_and_missing_cells_count_as_wrong(tok):
    s = SudokuScorer(tok).score(ids(tok, SOLUTION[:8] + "<eos>"), board_example(tok))
    assert not s.correct
    assert "8 characters, expected 16" in s.reason
    # blanks among the first 8 cells: positions 1, 3, 4, 6, 7 -> 5 of 10 blanks right
    assert s.extras["cell_accuracy"] == pytest.approx(5 / 10)
    assert s.extras["cell_accuracy_all"] == pytest.approx(8 / 16)


def test_a_non_digit_token_inside_the_board_is_not_solved(tok):
    s = SudokuScorer(tok).score(ids(tok, SOLUTION[:5] + "<sep>" + SOLUTION[6:] + "<eos>"), board_example(tok))
    assert not s.correct
    assert "non-digit" in s.reason and s.text[5] == "?"


def test_a_sudoku_example_without_its_boards_is_a_clear_error(tok):
    with pytest.raises(InputError, match=r"meta\['puzzle'\]"):
        SudokuScorer(tok).score(ids(tok, SOLUTION), Ex([]))


def test_completion_exact_match_ignores_surrounding_whitespace_and_special_tokens(tok):
    ex = Ex(ids(tok, "1234<eos>"), completion=" 1234\n")
    s = CompletionScorer(tok).score(ids(tok, "1234<eos><pad>"), ex)
    assert s.correct and s.extras["token_accuracy"] == 1.0


def test_completion_token_accuracy_counts_eos_as_a_reference_token(tok):
    ex = Ex(ids(tok, "1234<eos>"), completion="1234")
    s = CompletionScorer(tok).score(ids(tok, "1299<eos>"), ex)
    assert not s.correct
    assert s.extras["token_accuracy"] == pytest.approx(3 / 5)  # 1, 2 and <eos> of 5 reference tokens


def test_completion_reference_text_defaults_to_the_decoded_reference_tokens(tok):
    s = CompletionScorer(tok).score(ids(tok, "42<eos>"), Ex(ids(tok, "42<eos>")))
    assert s.correct


def test_the_data_kind_picks_the_scorer(tok):
    assert scorer_for("sudoku", tok).metric == "solved"
    assert scorer_for("chat", tok).metric == "exact_match"
    with pytest.raises(InputError, match="data.kind=poetry"):
        scorer_for("poetry", tok)


def test_aggregate_averages_the_metric_and_every_extra():
    out = aggregate([Score(True, {"cell_accuracy": 1.0}), Score(False, {"cell_accuracy": 0.5})])
    assert out == {"accuracy": 0.5, "cell_accuracy": 0.75}


def test_an_answer_ending_in_turn_end_scores_in_full_when_it_is_one_of_the_models_stop_ids():
    from dg_pipeline.data.tokenizer import CHAT_EOS_IDS, build_char_tokenizer

    chat = build_char_tokenizer()
    generated = ids(chat, "ab<turn|>junk")  # the model ends its turn; the tail is never read
    for reference in ("ab<turn|>", "ab<eos>"):  # the template's turn, or completion + <eos>
        s = CompletionScorer(chat, CHAT_EOS_IDS).score(generated, Ex(ids(chat, reference)))
        assert s.correct and s.extras["token_accuracy"] == 1.0 and s.text == "ab"
    # Reading only up to the tokenizer's <eos>: the turn's end and the junk after it count against the answer.
    old = CompletionScorer(chat).score(generated, Ex(ids(chat, "ab<eos>")))
    assert not old.correct and old.extras["token_accuracy"] == pytest.approx(2 / 3)
