"""The defence × attack protocol in the fine-tuning regime of the PAR paper (arXiv 2412.00727, §4): a clean
foundation CLIP, a backdoor planted into it by fine-tuning on poisoned pairs, then cleaning at a fine-tuning
learning rate on disjoint clean pairs, every defence with the same budget.

`benchmarks/defence_matrix.py` runs it over every attack and defence (docs/defence_matrix.md); `parclip demo` runs
one attack of it with fewer defences, and adds retrieval. Both take their settings from here (`settings`), train
and measure through the same stages (`stages`), cached the same way (`cache`), so the demo's numbers are cells of
the benchmark's matrix.
"""
from .cache import cached, canonical, config_spec, key_of
from .report import fmt, markdown_table, plot_curves, plot_matrix
from .run import curves_stage, foundation_stage, matrix_stage, plant_stage, protocol_record, run_all
from .settings import CURVES, DEFENCES, LABELS, MODEL, SYNTH, TARGET, TEMPLATES, TRIGGER_PARAMS, Settings
from .stages import evaluate_model, make_trigger, select_lr, stage_cell, stage_plant

__all__ = ["CURVES", "DEFENCES", "LABELS", "MODEL", "SYNTH", "TARGET", "TEMPLATES", "TRIGGER_PARAMS", "Settings",
           "cached", "canonical", "config_spec", "curves_stage", "evaluate_model", "fmt", "foundation_stage", "key_of",
           "make_trigger", "markdown_table", "matrix_stage", "plant_stage", "plot_curves", "plot_matrix",
           "protocol_record", "run_all", "select_lr", "stage_cell", "stage_plant"]
