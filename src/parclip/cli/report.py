"""`parclip report`: many eval results in one table and a chart (parclip.evaluation.report)."""
from __future__ import annotations

from parclip.cli.common import RESULT_FILES
from parclip.utils.flags import Command, arg


def _cmd_report(args) -> int:
    from parclip.evaluation.report import format_markdown, report_rows, write_report

    rows = report_rows(args.results)
    print(format_markdown(rows))
    write_report(rows, markdown=args.out, csv_path=args.csv, plot=args.plot)
    return 0


REPORT = Command(
    "report", "gather eval results into one table and a chart", run=_cmd_report,
    description="Read any number of `parclip eval` / `parclip eval-retrieval` result JSONs and print one table: "
    "model, task, clean accuracy (zero-shot top-1 or image→text R@1) and the ASR of every attack (asr, or asr_text "
    "for retrieval).",
    epilog="example:\n  parclip report results/*.json --out table.md --csv table.csv --plot table.png",
    args=(RESULT_FILES,
          arg("--out", default=None, help="write the Markdown table here"),
          arg("--csv", default=None, help="write the table as CSV here"),
          arg("--plot", default=None, help="write a bar chart of clean accuracy and ASR per model (PNG)")))
