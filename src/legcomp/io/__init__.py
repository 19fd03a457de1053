"""Reading and writing Dixon studies (NIfTI folders, the seed study's layouts, DICOM series)."""

from legcomp.io.dicom import is_dicom_folder, read_dicom_study
from legcomp.io.nifti import (find_studies, load_nifti, read_label_map, read_label_record, read_study,
                              region_from_path, write_study)
from legcomp.io.study import CONTRASTS, DixonStudy, make_study

__all__ = ["CONTRASTS", "DixonStudy", "find_studies", "is_dicom_folder", "read_dicom_study", "load_nifti", "make_study", "read_label_map", "read_label_record",
           "read_study", "region_from_path", "write_study"]
