"""Scorers: turn one generated response (token ids) into a score against its Example.

- Sudoku (`metric = "solved"`): the response is read up to the first EOS/pad; a board is *solved* when it is a
  complete valid grid that keeps every clue (the data package's `validate_board`, so a solution that differs from
  the reference but is valid still counts). Two cell accuracies against the reference solution:
  `cell_accuracy` = correct cells / blank cells of the puzzle (the cells the model had to fill), and
  `cell_accuracy_all` = correct cells / all cells (clues included, so copying the clues counts). A missing or
  non-digit cell counts as wrong.
- Prompt/completion (`metric = "exact_match"`): exact match of the decoded response and the decoded reference
  response (each up to its first stop id, special tokens dropped, stripped); `token_accuracy` = positions where the
  generated token equals the reference response token / reference length, both up to and including their first
  stop id, any of which counts as the stop (stopping on time counts, with <turn|> as with <eos>).
A response ends at the model's stop ids (`eos_token_ids`: its generation config's eos list, e.g. [1, 106]) or pad;
without them, at the tokenizer's eos/pad.

`scorer_for(kind, tokenizer, eos_token_ids)` picks one from `data.kind`; `aggregate(scores)` averages them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.examples import BoardCodec
from dg_pipeline.data.sudoku import BoardError, validate_board


@dataclass(frozen=True)
class Score:
    """One example's score: `correct` is the task metric; `extras` the secondary fractions (cell/token acc.)."""

    correct: bool
    extras: dict[str, float] = field(default_factory=dict)
    text: str = ""  # the decoded response, for reports
    reason: str = ""  # why it is wrong (empty when correct)


class Scorer(Protocol):
    metric: str

    def score(self, generated_ids: Sequence[int], example) -> Score: ...

    def strata(self, example) -> dict: ...


def response_until_stop(ids: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    """The generated tokens before the first EOS/pad (the response proper)."""
    stop = set(stop_ids)
    out = []
    for t in ids:
        t = int(t)
        if t in stop:
            break
        out.append(t)
    return out


def stop_ids(tokenizer, eos_token_ids: Sequence[int] | None = None) -> list[int]:
    """Where a response ends: the model's eos ids (else the tokenizer's eos) and pad."""
    eos = list(eos_token_ids) if eos_token_ids else [tokenizer.eos_token_id]
    return [i for i in (*eos, tokenizer.pad_token_id) if i is not None]


class SudokuScorer:
    """Solved = a complete valid grid keeping every clue; plus cell accuracies vs the reference solution."""

    metric = "solved"

    def __init__(self, tokenizer, eos_token_ids: Sequence[int] | None = None):
        self.codec = BoardCodec(tokenizer)
        self.stop_ids = stop_ids(tokenizer, eos_token_ids)

    def decode_board(self, generated_ids: Sequence[int]) -> str:
        """The generated digits up to EOS/pad; a non-digit token reads as '?' (never a valid cell)."""
        return self.codec.decode(response_until_stop(generated_ids, self.stop_ids))

    def score(self, generated_ids: Sequence[int], example) -> Score:
        puzzle, solution = _board_meta(example)
        board = self.decode_board(generated_ids)
        try:
            validate_board(puzzle, board)
            solved, reason = True, ""
        except BoardError as e:
            solved, reason = False, e.problem
        return Score(solved, board_cell_accuracy(board, puzzle, solution), text=board, reason=reason)

    def strata(self, example) -> dict[str, int]:
        """What the gate splits accuracy by besides the source: the puzzle's clue count."""
        puzzle, _ = _board_meta(example)
        return {"clues": sum(ch not in "0." for ch in puzzle)}


def board_cell_accuracy(board: str, puzzle: str, solution: str) -> dict[str, float]:
    """`cell_accuracy` over the puzzle's blank cells and `cell_accuracy_all` over every cell (see module doc)."""
    puzzle = puzzle.replace(".", "0")
    hits = [i < len(board) and board[i] == answer for i, answer in enumerate(solution)]
    blanks = [i for i, clue in enumerate(puzzle) if clue == "0"]
    return {
        "cell_accuracy": sum(hits[i] for i in blanks) / len(blanks) if blanks else 1.0,
        "cell_accuracy_all": sum(hits) / len(hits),
    }


def _board_meta(example) -> tuple[str, str]:
    meta = getattr(example, "meta", None) or {}
    if "puzzle" not in meta or "solution" not in meta:
        raise InputError(
            "a Sudoku eval example has no meta['puzzle'] / meta['solution']; read eval boards with the data "
            "package's Sudoku readers (data.kind=sudoku), or set data.kind=chat for prompt/completion files"
        )
    return str(meta["puzzle"]), str(meta["solution"])


class CompletionScorer:
    """Exact match after strip; token accuracy vs the reference response tokens."""

    metric = "exact_match"

    def __init__(self, tokenizer, eos_token_ids: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids(tokenizer, eos_token_ids)
        self.eos_ids = set(self.stop_ids) - {tokenizer.pad_token_id}

    def score(self, generated_ids: Sequence[int], example) -> Score:
        text = self.tokenizer.decode(response_until_stop(generated_ids, self.stop_ids), skip_special_tokens=True)
        # The reference text is what the reference tokens say (the template's turn: thought channel, tool calls).
        reference_ids = self._through_stop(example.response_ids)
        reference = self.tokenizer.decode(response_until_stop(reference_ids, self.stop_ids), skip_special_tokens=True)
        exact = text.strip() == reference.strip()
        generated = self._through_stop(generated_ids)
        hits = sum(g == r or (g in self.eos_ids and r in self.eos_ids) for g, r in zip(generated, reference_ids))
        token_accuracy = hits / len(reference_ids) if reference_ids else float(exact)
        return Score(exact, {"token_accuracy": token_accuracy}, text=text, reason="" if exact else "text differs")

    def strata(self, example) -> dict:
        return {}

    def _through_stop(self, ids: Sequence[int]) -> list[int]:
        """`ids` up to and including the first eos id (the response proper and its stop)."""
        out = []
        for t in ids:
            out.append(int(t))
            if out[-1] in self.eos_ids:
                break
        return out


SCORERS = {"sudoku": SudokuScorer, "chat": CompletionScorer}


def scorer_class(kind: str) -> type[Scorer]:
    """The scorer class of a data kind (data.kind); its `metric` is known before a tokenizer is."""
    if kind not in SCORERS:
        raise InputError(f"data.kind={kind}: no scorer for it; choose one of {sorted(SCORERS)}")
    return SCORERS[kind]


def scorer_for(kind: str, tokenizer, eos_token_ids: Sequence[int] | None = None) -> Scorer:
    """The scorer of a data kind (data.kind); `eos_token_ids`: the model's stop ids (None = the tokenizer's eos)."""
    return scorer_class(kind)(tokenizer, eos_token_ids)


def aggregate(scores: Sequence[Score]) -> dict[str, float]:
    """Mean of the metric (`accuracy`) and of every extra; empty input gives accuracy 0."""
    n = len(scores)
    out = {"accuracy": sum(s.correct for s in scores) / n if n else 0.0}
    for key in scores[0].extras if scores else ():
        out[key] = sum(s.extras[key] for s in scores) / n
    return out
