"""The study report: `build_report(results_dirs, out_dir)` writes index.html, report.md, figures/ and tables/."""
from forgetjax.report.build import build_report

__all__ = ["build_report"]
