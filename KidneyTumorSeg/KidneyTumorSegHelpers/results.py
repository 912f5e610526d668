"""Turning the library's measurements (``--stats`` JSON) into table rows and CSV columns (no Slicer imports).

The stats document is the library's contract::

    {"kidneys": [{"side": "left"|"right"|"midline", "volume_ml", "tumor_volume_ml", "centroid_lps_mm"}],
     "tumors": {"count", "total_volume_ml", "largest_diameter_mm", "items": [...]},
     "cysts": {same as tumors}, "labels_present": [...]}

Missing parts (a model without cysts, an older library) are shown as absent, never as zero.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

TABLE_COLUMNS = ("Structure", "Volume (mL)", "Details")

_SIDE_ORDER = {"right": 0, "left": 1, "midline": 2}


def _number(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{digits}f}"


def _largestConfidence(group: dict):
    """The model's confidence in the largest lesion of a stats group (items come largest first); None when the
    stats do not say (measured from edited segments, or no lesion)."""
    items = [i for i in group.get("items") or [] if isinstance(i, dict)]
    return items[0].get("confidence") if items else None


def _lesionRow(title: str, group: Optional[dict]) -> Optional[Tuple[str, str, str]]:
    if not isinstance(group, dict):
        return None
    count = int(group.get("count") or 0)
    if count == 0:
        return (title, "0.0", "none found")
    details = f"{count} found"
    if group.get("largest_diameter_mm") is not None:
        details += f"; largest diameter {_number(group['largest_diameter_mm'])} mm"
    confidence = _largestConfidence(group)
    if confidence is not None:
        details += f"; model confidence in the largest {_number(confidence, 2)}"
    return (title, _number(group.get("total_volume_ml")), details)


def tableRows(stats: dict) -> List[Tuple[str, str, str]]:
    """Rows (structure, volume in mL, details) for the results table.

    One row per kidney (right first, as a radiologist reads: patient's right on the
    image's left), then tumors, then cysts when the model reports them.
    """
    rows: List[Tuple[str, str, str]] = []
    kidneys = sorted(stats.get("kidneys") or [], key=lambda k: _SIDE_ORDER.get(k.get("side"), 3))
    for kidney in kidneys:
        side = kidney.get("side") or "unknown side"
        tumorMl = kidney.get("tumor_volume_ml")
        details = "no tumor" if not tumorMl else f"tumor {_number(tumorMl)} mL"
        rows.append((f"Kidney ({side})", _number(kidney.get("volume_ml")), details))
    if not kidneys:
        rows.append(("Kidney", "0.0", "no kidney found"))
    for title, key in (("Tumors", "tumors"), ("Cysts", "cysts")):
        row = _lesionRow(title, stats.get(key))
        if row:
            rows.append(row)
    return rows


CSV_COLUMNS = ("case", "status", "message", "right_kidney_ml", "left_kidney_ml", "other_kidney_ml",
               "tumor_count", "tumor_total_ml", "tumor_largest_diameter_mm", "tumor_largest_confidence",
               "cyst_count", "cyst_total_ml", "seconds", "segmentation_file")


def csvRow(case: str, status: str, message: str = "", stats: Optional[dict] = None,
           seconds: Optional[float] = None, segmentationFile: str = "") -> Dict[str, str]:
    """One batch-mode measurements row (keys = :data:`CSV_COLUMNS`); empty cells for unknowns."""
    row = {key: "" for key in CSV_COLUMNS}
    row.update(case=case, status=status, message=message, segmentation_file=segmentationFile)
    if seconds is not None:
        row["seconds"] = f"{seconds:.1f}"
    if stats:
        other = 0.0
        for kidney in stats.get("kidneys") or []:
            side = kidney.get("side")
            if side in ("right", "left"):
                key = f"{side}_kidney_ml"
                previous = float(row[key]) if row[key] else 0.0
                row[key] = f"{previous + float(kidney.get('volume_ml') or 0.0):.2f}"
            else:
                other += float(kidney.get("volume_ml") or 0.0)
                row["other_kidney_ml"] = f"{other:.2f}"
        for prefix, key in (("tumor", "tumors"), ("cyst", "cysts")):
            group = stats.get(key)
            if isinstance(group, dict):
                row[f"{prefix}_count"] = str(int(group.get("count") or 0))
                row[f"{prefix}_total_ml"] = f"{float(group.get('total_volume_ml') or 0.0):.2f}"
                if prefix == "tumor" and group.get("largest_diameter_mm") is not None:
                    row["tumor_largest_diameter_mm"] = f"{float(group['largest_diameter_mm']):.1f}"
                if prefix == "tumor" and _largestConfidence(group) is not None:
                    row["tumor_largest_confidence"] = f"{float(_largestConfidence(group)):.2f}"
    return row


def summaryText(stats: dict) -> str:
    """One status line after a run, e.g. ``2 kidneys, 1 tumor (12.3 mL), no cyst``."""
    kidneys = len(stats.get("kidneys") or [])
    parts = [f"{kidneys} kidney{'s' if kidneys != 1 else ''}"]
    for word, key in (("tumor", "tumors"), ("cyst", "cysts")):
        group = stats.get(key)
        if not isinstance(group, dict):
            continue
        count = int(group.get("count") or 0)
        if count:
            parts.append(f"{count} {word}{'s' if count != 1 else ''} ({_number(group.get('total_volume_ml'))} mL)")
        else:
            parts.append(f"no {word}")
    return ", ".join(parts)


def notesText(stats: dict) -> str:
    """The library's notes for the user (e.g. a scan that does not look contrast-enhanced) as one
    sentence to append to the status line, or "" when there are none."""
    notes = [str(n) for n in (stats or {}).get("notes") or [] if str(n).strip()]
    return (" Note: " + "; ".join(notes) + ".") if notes else ""


def writeCsv(path: str, rows: Sequence[dict]) -> None:
    """Write measurement rows (see :func:`csvRow`) with the :data:`CSV_COLUMNS` header."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
