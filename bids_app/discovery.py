"""Find the diffusion inputs of every subject/session of a BIDS dataset with pybids.

Four layouts are recognised per subject/session, without being told which:

- ``isles22``: ISLES'22 names, a 3-D trace ``*_dwi.nii.gz`` with ``*_adc.nii.gz`` (not BIDS suffixes);
- ``bids-trace``: BIDS 1.11 ``*_trace.nii.gz`` with ``*_ADC.nii.gz``;
- ``rec-trace``: the scanner's maps stored as ``*_rec-TRACE_dwi`` (or ``rec-TRACEW``) with
  ``*_rec-ADC_dwi``, as dcm2niix-based conversions name them (e.g. OpenNeuro ds004889, SOOP); they are
  found with the ``dwi`` entry of ``bids_filter``;
- ``raw-dwi``: a 4-D ``*_dwi.nii.gz`` with ``.bval``/``.bvec`` (trace and ADC computed later).

A session whose files cannot be used is still returned, with ``problem`` set, so that the workflow
fails that session alone with a clear message. Nothing is ever written inside the dataset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib

from bids_app.errors import BIDSValidationError, InputError, NoDataError, UsageError

LOGGER = logging.getLogger("deepisles.discovery")
IMG_EXT = [".nii.gz", ".nii"]
FILTER_KEYS = ("dwi", "trace", "adc", "flair")
_NON_KEY = {"suffix", "extension", "datatype"}
REC_TRACE = {"trace", "tracew"}  # ``rec-`` labels of a scanner trace map stored as ``*_dwi``
REC_ADC = {"adc"}


@dataclass
class SessionInputs:
    subject: str
    session: str | None
    layout: str  # 'isles22' | 'bids-trace' | 'rec-trace' | 'raw-dwi'
    dwi: Path | None  # None only when ``problem`` says the DWI is missing
    adc: Path | None
    bval: Path | None
    bvec: Path | None
    flair: Path | None
    notes: list[str] = field(default_factory=list)
    problem: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        out["notes"] = list(self.notes)
        return out

    @property
    def entities(self) -> dict:
        ent = {"subject": self.subject}
        if self.session is not None:
            ent["session"] = self.session
        return ent


def normalize_label(label: str, prefix: str) -> str:
    """``'sub-01'`` -> ``'01'``; ``'01'`` -> ``'01'`` (``prefix`` is ``'sub'`` or ``'sub-'``)."""
    return str(label).strip().removeprefix(prefix.rstrip("-") + "-")


def _shorten(items, limit: int = 10) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "") if items else "none"


# ----------------------------------------------------------------------------- checks
def check_description(root: Path) -> dict:
    """Require a ``dataset_description.json`` with ``Name`` and ``BIDSVersion``."""
    path = root / "dataset_description.json"
    if not path.is_file():
        raise BIDSValidationError(f"{path}: missing (every BIDS dataset needs one; or skip BIDS validation)")
    try:
        desc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BIDSValidationError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(desc, dict):
        raise BIDSValidationError(f"{path}: must hold a JSON object")
    missing = [k for k in ("Name", "BIDSVersion") if not desc.get(k)]
    if missing:
        raise BIDSValidationError(f"{path}: missing required field(s) {', '.join(missing)}")
    return desc


def _check_filter(bids_filter) -> dict:
    from bids.layout import Query

    if not bids_filter:
        return {k: {} for k in FILTER_KEYS}
    if not isinstance(bids_filter, dict):
        raise UsageError("bids_filter must be a JSON object with keys among " + ", ".join(FILTER_KEYS))
    unknown = sorted(set(bids_filter) - set(FILTER_KEYS))
    if unknown:
        raise UsageError(f"bids_filter: unknown key(s) {', '.join(unknown)}; expected {', '.join(FILTER_KEYS)}")
    out = {}
    for key in FILTER_KEYS:
        filt = dict(bids_filter.get(key) or {})
        if "suffix" in filt:
            raise UsageError(f"bids_filter['{key}']: 'suffix' cannot be changed (it defines the layout)")
        conv = {"*": Query.ANY, None: Query.NONE}
        out[key] = {k: (conv[v] if v is None or v == "*" else v) for k, v in filt.items()}
    return out


def _index(root: Path, database_dir):
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    kwargs = {}
    if database_dir:
        db = Path(database_dir).expanduser().resolve()
        if db == root or root in db.parents:  # never write inside the dataset: index in memory
            LOGGER.warning("%s is inside the BIDS dataset %s: pybids index kept in memory", db, root)
        else:
            try:
                db.mkdir(parents=True, exist_ok=True)
                kwargs = {"database_path": str(db), "reset_database": True}
            except OSError as exc:
                LOGGER.warning("cannot create the pybids database folder %s (%s): index kept in memory", db, exc)
    # validate=False keeps non-BIDS names (ISLES'22 _adc); no metadata: sidecars are never parsed, so
    # an invalid JSON or non-UTF-8 sidecar cannot stop discovery
    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False)
    if kwargs:
        try:
            return BIDSLayout(str(root), validate=False, derivatives=False, indexer=indexer, **kwargs)
        except Exception as exc:  # e.g. a read-only work folder: retry in memory
            LOGGER.warning("pybids database in %s failed (%s): indexing in memory", kwargs["database_path"], exc)
    try:
        return BIDSLayout(str(root), validate=False, derivatives=False, indexer=indexer)
    except Exception as exc:  # pybids raises many kinds
        raise BIDSValidationError(f"{root}: pybids could not index the dataset ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- helpers
def _rec(f) -> str:
    return str(f.entities.get("reconstruction") or "").lower()


def _ent(f) -> dict:
    """Entities that pair files; a ``rec-TRACE``/``rec-ADC`` label names the map, so it does not count."""
    skip = _NON_KEY | ({"reconstruction"} if _rec(f) in REC_TRACE | REC_ADC else set())
    return {k: str(v) for k, v in f.entities.items() if k not in skip}


def _split_rec_maps(found: dict) -> None:
    """Move ``*_rec-TRACE_dwi`` to the traces and ``*_rec-ADC_dwi`` to the ADCs (in place)."""
    dwis = found["dwi"]
    found["trace"] += [f for f in dwis if _rec(f) in REC_TRACE]
    found["adc"] += [f for f in dwis if _rec(f) in REC_ADC]
    found["dwi"] = [f for f in dwis if _rec(f) not in REC_TRACE | REC_ADC]


def _trace_layout(f) -> str:
    return "rec-trace" if f.entities.get("suffix") == "dwi" else "bids-trace"


def _volumes(path: Path) -> tuple[int | None, str | None]:
    """Number of volumes from the NIfTI header alone, or ``(None, why)`` when unknown."""
    if path.is_symlink() and not path.exists():
        return None, "broken symbolic link"
    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:
        return None, f"header unreadable ({type(exc).__name__})"
    if sum(int(d) != 1 for d in shape[3:]) > 1:  # e.g. x y z 2 2: not a series of volumes
        return None, f"{len(shape)}-D image of shape {tuple(int(d) for d in shape)}"
    n = 1
    for d in shape[3:]:
        n *= int(d)
    return n, None


def _run(f) -> int:
    try:
        return int(f.entities.get("run", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _sort_key(f):
    return (_run(f), f.filename)


def _sidecar_file(img, ext: str, files: list):
    """The ``.bval``/``.bvec`` that applies to ``img`` (inheritance: entities a subset, folder above)."""
    ent, folder = _ent(img), Path(img.path).parent
    best = None
    for f in files:
        if f.entities.get("extension") != ext or f.entities.get("suffix") != "dwi":
            continue
        fent, ffolder = _ent(f), Path(f.path).parent
        if any(ent.get(k) != v for k, v in fent.items()):
            continue
        if ffolder != folder and ffolder not in folder.parents:
            continue
        rank = (len(ffolder.parts), len(fent))
        if best is None or rank > best[0]:
            best = (rank, Path(f.path))
    return best[1] if best else None


def _match(img, others: list):
    """``(file, differences, note)``: the file of ``others`` whose entities best match ``img``."""
    if not others:
        return None, 0, None
    ent = _ent(img)

    def score(o):
        oe = _ent(o)
        return (sum(ent.get(k) != oe.get(k) for k in set(ent) | set(oe)), _run(o), o.filename)

    best = min(others, key=score)
    diff = score(best)[0]
    note = f"{best.filename} paired with {img.filename} although their entities differ" if diff else None
    return best, diff, note


# ----------------------------------------------------------------------------- discovery
def discover(bids_dir, participant_labels=None, session_labels=None, bids_filter=None,
             validate=True, database_dir=None) -> list[SessionInputs]:
    """Return one :class:`SessionInputs` per selected subject/session holding diffusion data."""
    root = Path(bids_dir).expanduser()
    if not root.exists():
        raise InputError(root, "BIDS directory not found")
    if not root.is_dir():
        raise InputError(root, "not a directory")
    root = root.resolve()
    if validate:
        check_description(root)
    filters = _check_filter(bids_filter)
    layout = _index(root, database_dir)

    subjects = sorted(layout.get_subjects())
    sessions = sorted(layout.get_sessions())
    want_sub = _select(participant_labels, "sub", subjects, "participant", root)
    want_ses = _select(session_labels, "ses", sessions, "session", root)

    def get(key, suffixes):
        query = {"suffix": suffixes, "extension": IMG_EXT, "return_type": "object"}
        query.update(filters[key])
        try:
            return layout.get(**query)
        except ValueError as exc:
            raise UsageError(f"bids_filter['{key}']: {exc}") from None

    found = {"dwi": get("dwi", "dwi"), "trace": get("trace", "trace"),
             "adc": get("adc", ["adc", "ADC"]), "flair": get("flair", "FLAIR")}
    _split_rec_maps(found)
    aux = layout.get(suffix="dwi", extension=[".bval", ".bvec"], return_type="object")
    groups: dict[tuple, dict] = {}
    for kind, files in found.items():
        for f in files:
            sub, ses = f.entities.get("subject"), f.entities.get("session")
            if sub is None or (want_sub is not None and sub not in want_sub):
                continue
            if want_ses is not None and ses not in want_ses:
                continue
            groups.setdefault((str(sub), None if ses is None else str(ses)), {k: [] for k in found})[kind].append(f)

    results = []
    for (sub, ses), files in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        if not (files["dwi"] or files["trace"] or files["adc"]):
            continue  # FLAIR only: not a diffusion session
        results.append(_session(root, sub, ses, files, aux))
    if not results:
        what = [f"participant(s) {_shorten(sorted(want_sub))}" if want_sub else "",
                f"session(s) {_shorten(sorted(want_ses))}" if want_ses else "",
                "the given bids_filter" if bids_filter else ""]
        sel = " and ".join(w for w in what if w)
        raise NoDataError(f"{root}: no diffusion data (*_dwi, *_trace, *_adc/_ADC NIfTI) found"
                          + (f" for {sel}" if sel else ""))
    return results


def _select(labels, prefix, available, what, root) -> set | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [labels]
    want = {normalize_label(lab, prefix) for lab in labels}
    missing = sorted(want - set(available))
    if missing:
        raise NoDataError(f"{root}: {what} label(s) not found: {', '.join(missing)}; "
                          f"available: {_shorten(f'{prefix}-{a}' for a in available)}")
    return want


def _session(root, sub, ses, files, aux) -> SessionInputs:
    rel = lambda f: str(Path(f.path).relative_to(root))  # noqa: E731
    notes: list[str] = []
    adcs = sorted(files["adc"], key=_sort_key)
    cands = []  # ((pair 0/raw 1, entity differences, run, name), layout, image, adc, bval, bvec, notes)
    for img in sorted(files["trace"], key=_sort_key):
        adc, diff, note = _match(img, adcs)
        if adc is not None:
            cands.append(((0, diff) + _sort_key(img), _trace_layout(img), img, adc, None, None,
                          [note] if note else []))
    unusable = []
    for img in sorted(files["dwi"], key=_sort_key):
        nvol, why = _volumes(Path(img.path))
        bval = _sidecar_file(img, ".bval", aux)
        bvec = _sidecar_file(img, ".bvec", aux)
        extra = [f"{img.filename}: number of volumes unknown ({why})"] if why else []
        if bval and ((nvol or 0) > 1 or (nvol is None and not adcs)):
            if not bvec:
                extra.append(f"{img.filename}: no .bvec file found (directions cannot be checked)")
            cands.append(((1, 0) + _sort_key(img), "raw-dwi", img, None, bval, bvec, extra))
        elif nvol is None or nvol <= 2:
            adc, diff, note = _match(img, adcs)
            if adc is not None:
                extra += [note] if note else []
                cands.append(((0, diff) + _sort_key(img), "isles22", img, adc, None, None, extra))
            elif bval:
                unusable.append((img, nvol, f"{img.path}: missing ADC: one volume and no *_adc/_ADC "
                                            "(a .bval is present but a single volume cannot give an ADC)"))
            else:
                unusable.append((img, nvol, f"{img.path}: missing ADC: no *_adc/_ADC and no .bval/.bvec"))
        else:
            unusable.append((img, nvol, f"{img.path}: missing b-values: 4-D with {nvol} volumes "
                                        "but no .bval/.bvec to compute trace and ADC from"))
    flair = None
    if files["flair"]:
        flairs = sorted(files["flair"], key=_sort_key)
        flair = Path(flairs[0].path)
        if len(flairs) > 1:
            notes.append(f"FLAIR: chose {rel(flairs[0])} (lowest run, then file name); "
                         f"not used: {', '.join(rel(f) for f in flairs[1:])}")
    if not cands:
        if unusable or files["trace"]:
            imgs = [(f, 1, f"{f.path}: missing ADC: no *_adc/_ADC") for f in sorted(files["trace"], key=_sort_key)]
            img, nvol, problem = (imgs + unusable)[0]
            kind = (_trace_layout(img) if img in files["trace"]
                    else "raw-dwi" if (nvol or 0) > 2 else "isles22")
            notes.append(problem)
            return SessionInputs(sub, ses, kind, Path(img.path), None, None, None, flair, notes, problem)
        adc = adcs[0]
        problem = f"{adc.path}: missing DWI: no matching *_dwi or *_trace image"
        notes.append(problem)
        kind = "isles22" if adc.entities.get("suffix") == "adc" else _trace_layout(adc)
        return SessionInputs(sub, ses, kind, None, Path(adc.path), None, None, flair, notes, problem)

    cands.sort(key=lambda c: c[0])
    _, kind, img, adc, bval, bvec, extra = cands[0]
    notes.extend(extra)
    if len(cands) > 1:
        others = [rel(c[2]) + (f" + {rel(c[3])}" if c[3] is not None else "") for c in cands[1:]]
        notes.append(f"chose {rel(img)}" + (f" + {rel(adc)}" if adc is not None else "")
                     + f" among {len(cands)} candidates (trace+ADC pairs before raw DWI, then best entity "
                       f"match, lowest run, file name); not used: {', '.join(others)}")
    if kind == "raw-dwi" and adcs:
        notes.append(f"not used: {', '.join(rel(a) for a in adcs)} (the ADC is computed from the raw DWI)")
    for f, _, problem in unusable:
        if f is not img:
            notes.append(f"ignored {rel(f)} ({problem.split(': ', 2)[1]})")
    return SessionInputs(sub, ses, kind, Path(img.path), Path(adc.path) if adc is not None else None,
                         bval, bvec, flair, notes, None)
