"""legcomp.evaluation: DSC, HD95 (mm), volume and fat-volume errors of predicted label maps."""

from legcomp.evaluation.core import (METRIC_COLUMNS, Evaluation, evaluate_paths, evaluate_subject, exact_fat_volumes,
                                     summarize, summary_markdown, write_evaluation)
from legcomp.evaluation.metrics import dice, hausdorff95, relative_error_pct, surface_distances

__all__ = ["METRIC_COLUMNS", "Evaluation", "evaluate_paths", "evaluate_subject", "exact_fat_volumes", "summarize",
           "summary_markdown", "write_evaluation", "dice", "hausdorff95", "relative_error_pct", "surface_distances"]
