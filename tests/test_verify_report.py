"""Console tables, the markdown table and the plots, all drawn from given records/data."""

import numpy as np
from rich.console import Console

from dg_pipeline.data.tokenizer import VOCAB
from dg_pipeline.verify.plots import ACCEPTED, OUTPUT, REFERENCE, RENOISED, plot_step_sweep, plot_trajectory, trajectory_grid
from dg_pipeline.verify.record import GateThresholds, finalize_record, gate_checks, write_record
from dg_pipeline.verify.report import gate_table, load_stage_records, print_stage_table, stages_markdown


def record(stage, accuracy, passed_floor=0.0, **extra):
    r = dict(
        stage=stage, input="/in", metric="solved", accuracy=accuracy, n_eval=8, tokens_per_second=120.0,
        tokens_per_forward=3.5, mean_denoising_steps=6.0, ar_accuracy=0.25, ar_tokens_per_second=60.0,
        speedup_vs_ar=2.0, device="cpu (1 threads)", batch_size=4, tokens_per_second_batch=400.0,
        cell_accuracy=0.9, **extra,
    )
    return finalize_record(r, gate_checks(accuracy, 2.0, GateThresholds(min_accuracy=passed_floor)))


def render(renderable) -> str:
    console = Console(record=True, width=220)
    console.print(renderable)
    return console.export_text()


def test_the_gate_table_shows_diffusion_next_to_ar_and_every_check_with_its_verdict():
    text = render(gate_table(record("sft", 0.5, passed_floor=0.6)))
    assert "stage=sft" in text and "FAIL" in text
    assert "solved (accuracy)" in text and "0.500" in text and "0.250" in text
    assert "tokens/s @ batch 1" in text and "120.0" in text and "60.0" in text
    assert "tokens/s @ batch 4" in text and "400.0" in text
    assert "min_accuracy" in text and "0.5" in text and ">= 0.6" in text


def test_a_simulated_record_says_so_in_its_title():
    assert "simulated quantization" in render(gate_table(record("quantize", 0.5, simulated=True)))


def test_the_stage_table_reads_verify_json_files_in_pipeline_order_with_variant_labels(tmp_path):
    write_record(tmp_path / "quantize" / "fp8", record("quantize", 0.45))
    write_record(tmp_path / "sft", record("sft", 0.5))
    write_record(tmp_path / "export" / "fp8", record("export", 0.45, passed_floor=0.9))
    paths = sorted(tmp_path.glob("**/verify.json"))
    labels = [label for label, _ in load_stage_records(paths)]
    assert labels == ["sft", "quantize/fp8", "export/fp8"]
    console = Console(record=True, width=220)
    print_stage_table(paths, console=console)
    text = console.export_text()
    assert text.index("sft") < text.index("quantize/fp8") < text.index("export/fp8")
    assert "FAIL" in text and "PASS" in text


def test_the_markdown_table_has_one_row_per_stage_and_a_header():
    md = stages_markdown({"sft": record("sft", 0.5), "quantize/nvfp4": record("quantize", 0.4, simulated=True)})
    lines = md.strip().splitlines()
    assert lines[0].startswith("| stage | metric | accuracy |")
    assert set(lines[1]) <= set("|-")
    assert lines[2].startswith("| sft | solved | 0.500 |") and lines[2].endswith("| PASS |")
    assert lines[3].startswith("| quantize/nvfp4 (sim) |")
    assert "2.00x" in lines[2]


def test_plots_are_written_as_png_files(tmp_path):
    sweep = [dict(max_denoising_steps=s, accuracy=a, tokens_per_forward=t, mean_denoising_steps=s / 2)
             for s, a, t in ((4, 0.1, 4.0), (8, 0.3, 2.0), (16, 0.4, 1.5))]
    p1 = plot_step_sweep(sweep, "solved", tmp_path / "sweep.png")
    cells = np.random.default_rng(0).integers(0, len(VOCAB), (5, 20))
    kinds = np.where(np.arange(20)[None, :] < 4 * np.arange(1, 6)[:, None], ACCEPTED, RENOISED)
    p2 = plot_trajectory(cells, kinds, VOCAB, tmp_path / "traj.png")
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sweep.png", "traj.png"]  # no temporaries left


def test_a_very_wide_canvas_is_cut_to_stay_readable(tmp_path):
    assert plot_trajectory(np.zeros((3, 256), int), np.zeros((3, 256), int), VOCAB, tmp_path / "wide.png").exists()


class Step:
    def __init__(self, block, accepted, canvas, argmax):
        self.block, self.temperature = block, 0.8
        self.accepted, self.canvas, self.argmax = accepted, canvas, argmax


def test_the_trajectory_grid_shows_each_blocks_steps_then_its_output_and_its_reference_slice():
    steps = [
        Step(0, [True, False], [7, 3], [7, 8]),
        Step(0, [True, True], [7, 8], [7, 8]),
        Step(1, [False, True], [5, 1], [9, 1]),
    ]
    cells, kinds, labels = trajectory_grid(steps, reference_ids=[7, 8, 1], pad_id=0)
    assert labels == [
        "block 0 step 1  T=0.80", "block 0 step 2  T=0.80", "block 0 output", "block 0 reference",
        "block 1 step 1  T=0.80", "block 1 output", "block 1 reference",
    ]
    assert cells.tolist() == [[7, 3], [7, 8], [7, 8], [7, 8], [5, 1], [9, 1], [1, 0]]  # reference padded
    assert kinds[:, 0].tolist() == [ACCEPTED, ACCEPTED, OUTPUT, REFERENCE, RENOISED, OUTPUT, REFERENCE]
