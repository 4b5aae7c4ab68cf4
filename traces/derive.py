"""Rewrite the bundled profiles from the boxes' specifications (:mod:`traces.costs.boxes`).

``python -m traces.derive [--out-dir DIR]``
"""
from __future__ import annotations

import json
from pathlib import Path

from traces.common.cli import ArgumentParser, run_cli
from traces.common.files import write_json
from traces.costs.boxes import SPECS, build
from traces.formats.profile_file import BUNDLED, Profile


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m traces.derive", description="Rewrite the bundled derived profiles.")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "data" / "profiles"))
    ap.add_argument("--check", action="store_true", help="only check that the bundled files are up to date")
    a = ap.parse_args(argv)
    stale = []
    for name, spec in SPECS.items():
        data = build(spec)
        Profile(data, where=f"derived {name}")
        path = Path(a.out_dir) / BUNDLED[name]
        if a.check:
            if not path.is_file() or json.loads(path.read_text()) != json.loads(json.dumps(data)):
                stale.append(str(path))
        else:
            write_json(path, data)
            print(f"wrote {path}")
    if stale:
        print("stale: " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
