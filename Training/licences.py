"""The licence a model package's weights carry: the terms of the data they were trained on.

Why: weights learned from a dataset are a derivative of it. The KiTS19 / KiTS23 label maps every recipe here
trains on (directly, as phantoms, or as synthesis maps) are CC BY-NC-SA 4.0, whose share-alike and non-commercial
terms the weights inherit; a package that said "Apache-2.0" would tell a hospital pipeline it may do what the data's
licence forbids. So ``export`` and ``compose`` take the licence from the training data's own record unless told
otherwise (``--licence``), and say "unspecified" rather than guess when the data records none.

Where a dataset records its licence (first found wins):

* ``phantoms.json`` (``python -m Training phantoms`` / ``validation-phantoms``): its ``licence`` field;
* a ``LICENSE`` / ``LICENSE.txt`` / ``LICENSE.md`` / ``LICENCE`` file in the folder: its first non-empty line
  (the KiTS label folders ship the CC legal code, whose first line names the licence).

Licence texts are reduced to SPDX identifiers where they name a Creative Commons 4.0 licence or Apache 2.0, so
that the same terms worded two ways (a record's "CC BY-NC-SA 4.0 (derived from ...)" and the legal code's
"Attribution-NonCommercial-ShareAlike 4.0 International") count once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

from .phantom_dataset import PHANTOMS_JSON

UNSPECIFIED = ("unspecified: the training data recorded no licence; the weights carry the terms of their training "
               "data (set them with --licence)")
_LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt")


def spdx_id(text: str) -> str:
    """``text`` (a licence name or a record's licence field) as an SPDX identifier where it names a Creative Commons
    4.0 licence or Apache 2.0 (e.g. ``"CC BY-NC-SA 4.0 (derived ...)"`` -> ``"CC-BY-NC-SA-4.0"``); otherwise the text,
    stripped."""
    t = " ".join(text.split())
    if re.search(r"\bapache\b", t, re.IGNORECASE) and "2.0" in t:
        return "Apache-2.0"
    cc = re.search(r"\bCC[ -]BY\b|\bAttribution\b", t, re.IGNORECASE) and re.search(r"\b4\.0\b", t)
    if not cc:
        return t
    parts = ["CC", "BY"]
    if re.search(r"NonCommercial|\bNC\b", t, re.IGNORECASE):
        parts.append("NC")
    if re.search(r"NoDerivatives|NoDerivs|\bND\b", t, re.IGNORECASE):
        parts.append("ND")
    elif re.search(r"ShareAlike|\bSA\b", t, re.IGNORECASE):
        parts.append("SA")
    return "-".join(parts) + "-4.0"


def dataset_licence(dataset: Optional[str | Path]) -> Optional[str]:
    """The licence (SPDX identifier where known) that the dataset folder ``dataset`` records, or None."""
    if not dataset:
        return None
    folder = Path(dataset)
    record = folder / PHANTOMS_JSON
    if record.is_file():
        try:
            text = json.loads(record.read_text()).get("licence")
        except (OSError, ValueError, AttributeError):
            text = None
        if isinstance(text, str) and text.strip():
            return spdx_id(text)
    for name in _LICENCE_FILES:
        path = folder / name
        if path.is_file():
            try:
                with path.open(encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if line.strip():
                            return spdx_id(line)
            except OSError:
                return None
    return None


def combined_licence(licences: Iterable[Optional[str]]) -> str:
    """One licence field for weights made from several sources: the distinct known licences joined by ``" AND "``
    (SPDX's conjunction: every one applies), or :data:`UNSPECIFIED` if any source recorded none."""
    seen: list[str] = []
    for licence in licences:
        if not licence or licence == UNSPECIFIED:
            return UNSPECIFIED
        for part in str(licence).split(" AND "):
            part = spdx_id(part)
            if part not in seen:
                seen.append(part)
    return " AND ".join(seen) if seen else UNSPECIFIED
