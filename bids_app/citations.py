"""References the app asks users to cite: (short name, reference, DOI or None)."""

CITATIONS = [
    ("DeepISLES", "de la Rosa E, et al. DeepISLES: a clinically validated ischemic stroke segmentation "
     "model from the ISLES'22 challenge. Nature Communications (2025).", "10.1038/s41467-025-62373-x"),
    ("ISLES'22", "Hernandez Petzsche MR, et al. ISLES 2022: A multi-center magnetic resonance imaging stroke "
     "lesion segmentation dataset. Scientific Data 9, 762 (2022).", "10.1038/s41597-022-01875-5"),
    ("Nipype", "Gorgolewski K, et al. Nipype: a flexible, lightweight and extensible neuroimaging data "
     "processing framework in Python. Frontiers in Neuroinformatics 5:13 (2011).", "10.3389/fninf.2011.00013"),
    ("PyBIDS", "Yarkoni T, et al. PyBIDS: Python tools for BIDS datasets. Journal of Open Source Software "
     "4(40), 1294 (2019).", "10.21105/joss.01294"),
    ("MONAI", "Cardoso MJ, et al. MONAI: An open-source framework for deep learning in healthcare. "
     "arXiv:2211.02701 (2022).", None),
    ("NiBabel", "Brett M, et al. NiBabel: access a cacophony of neuro-imaging file formats. Zenodo.", None),
    ("PyTorch", "Paszke A, et al. PyTorch: An imperative style, high-performance deep learning library. "
     "NeurIPS 32 (2019).", None),
]


def cite(name: str) -> str:
    """Full reference text of ``name`` with its DOI."""
    for short, text, doi in CITATIONS:
        if short == name:
            return f"{text} doi:{doi}" if doi else text
    raise KeyError(name)
