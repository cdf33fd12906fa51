"""Names and places of one session's files (bids_app/paths.py)."""

from bids_app.paths import bids_uri


def test_bids_uri_through_a_symbolic_link(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    link = tmp_path / "link"
    link.symlink_to(raw)
    dwi = raw.resolve() / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"  # discovery resolves the dataset root
    for root in (raw, link):
        assert bids_uri(root.absolute(), dwi) == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    outside = tmp_path / "elsewhere.nii.gz"
    assert bids_uri(raw, outside) == str(outside)
