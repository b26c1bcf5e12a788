"""The labels every stage speaks (DESIGN.md, "Labels"): 1 = melanoma, 0 = other lesions, shown to
people as "Melanoma" / "Non-Melanoma"; and the diagnosis codes a diagnosis head learns. Torch-free."""

MELANOMA, NON_MELANOMA = 1, 0
CLASS_NAMES = ("Non-Melanoma", "Melanoma")  # index = label

# A diagnosis head (model.py --targets diagnosis) has one output per diagnosis code of train/
# (HAM10000's dx: akiec, bcc, bkl, df, mel, nv, vasc); its melanoma output is this one.
MELANOMA_DIAGNOSIS = "mel"
UNKNOWN_DIAGNOSIS = "unknown"


def diagnosis_for(label, diagnosis):
    """The label decides melanoma: a melanoma is 'mel' whatever else is recorded, and another
    lesion recorded as 'mel' (a metadata file that disagrees with the labels) is 'unknown'."""
    if label == MELANOMA:
        return MELANOMA_DIAGNOSIS
    if not diagnosis or diagnosis == MELANOMA_DIAGNOSIS:
        return UNKNOWN_DIAGNOSIS
    return diagnosis
