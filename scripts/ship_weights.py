"""Copy a trained network into the bundled weights, keeping the history of its provenance.

The new ``<stem>.provenance.json`` is the training run's own provenance (written by ``legcomp
train``) with the file it replaces kept under ``"previous"`` and free-text notes (e.g. how the
weights were validated) under ``"notes"``.

    python scripts/ship_weights.py RUN_DIR/thigh_stage2.pt --note "leave-one-source-out: ..."
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "legcomp" / "data" / "weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", help="trained <region>_stage<k>.pt (its .provenance.json beside it)")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--extra", default=None, help="JSON file merged into the provenance (e.g. bench scores)")
    a = ap.parse_args()
    src = Path(a.weights)
    prov_src = src.with_name(src.name.replace(".pt", ".provenance.json"))
    new = json.loads(prov_src.read_text()) if prov_src.is_file() else {"trained_on": "unknown"}
    dst = BUNDLED / src.name
    old_prov = dst.with_name(dst.name.replace(".pt", ".provenance.json"))
    if old_prov.is_file():
        new["previous"] = json.loads(old_prov.read_text())
    if a.note:
        new["notes"] = a.note
    if a.extra:
        new.update(json.loads(Path(a.extra).read_text()))
    shutil.copyfile(src, dst)
    old_prov.write_text(json.dumps(new, indent=1) + "\n")
    print(f"{src} -> {dst} ({dst.stat().st_size / 1e6:.1f} MB); provenance {old_prov}")


if __name__ == "__main__":
    main()
