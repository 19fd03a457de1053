"""legcomp.quantification: per-leg muscle and fat volumes (mL) and fat fractions from label maps."""

from legcomp.quantification.core import (COLUMNS, UNITS, Quantification, quantification_json, quantify,
                                         quantify_files, write_quantification)
from legcomp.quantification.fat import describe_fat_rule, fat_fraction, fat_mask, parse_fat_rule
from legcomp.quantification.mapping import (LabelMapping, apply_label_mapping, load_label_mapping, mapping_stage,
                                            shipped_mappings)

__all__ = ["COLUMNS", "UNITS", "Quantification", "quantify", "quantify_files", "write_quantification",
           "quantification_json", "describe_fat_rule", "fat_fraction", "fat_mask", "parse_fat_rule", "LabelMapping",
           "apply_label_mapping", "load_label_mapping", "mapping_stage", "shipped_mappings"]
