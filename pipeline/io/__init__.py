"""The only code that touches file formats: checkpoints now; NIfTI, DICOM series and DICOM SEG to come."""
