"""Write docs/teacache-fits.md: every TeaCache fit of the model zoo, with its source.

    python scripts/fits_table.py

Run it after a zoo entry's fits change (`scripts/calibrate.py --write-config`); `tests/test_zoo.py`
checks that the table lists exactly what the zoo holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from teacache_models.zoo import list_zoo, load_zoo_entry

HEADER = """# TeaCache fits of the model zoo

Every rescaling polynomial this package uses for a released (or shipped) checkpoint, highest degree
first. They are written in one place only, the zoo entry named in the first column (`configs/<name>.yaml`,
under `teacache.fits` or carried by its presets); this table cites them (written by
`scripts/fits_table.py`), and `tests/test_zoo.py` checks that it lists exactly what the zoo holds. A
pipeline loaded with a zoo entry hands its fits to the transformer (`set_teacache_fits`); no model class
carries coefficients.

| zoo entry | indicator | coefficients | borrowed from | source |
|---|---|---|---|---|
"""


def table() -> str:
    rows = []
    for name in list_zoo():
        entry = load_zoo_entry(name)
        # A Wan2.2 A14B entry with per-expert fits: one row per expert, named `entry (expert)`.
        per_owner = {f"{name} ({e})": fits for e, fits in entry.expert_fits.items()} or {name: entry.fits}
        for owner, fits in per_owner.items():
            for indicator, fit in fits.items():
                coefficients = ", ".join(repr(c) for c in fit.coefficients)
                lender = f"`{fit.borrowed_from}`" if fit.borrowed_from else ""
                rows.append(f"| `{owner}` | `{indicator}` | {coefficients} | {lender} | {fit.source} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    # No options: parsing still answers --help and refuses an unknown argument instead of writing the file.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    path = Path(__file__).resolve().parent.parent / "docs" / "teacache-fits.md"
    path.write_text(table())
    print(f"{path}: {table().count(chr(10)) - HEADER.count(chr(10))} fits")
