"""Label values of the output label maps (KiTS19 convention plus cyst)."""

BACKGROUND = 0
KIDNEY = 1
TUMOR = 2
CYST = 3

#: name -> value, the vocabulary model manifests use for their classes.
LABEL_VALUES = {"background": BACKGROUND, "kidney": KIDNEY, "tumor": TUMOR, "cyst": CYST}
