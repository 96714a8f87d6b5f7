"""Draw a mod's block grid as an SVG picture: ``Explanation.to_svg()``.

    python examples/explain_svg.py [OUT.svg]

Explains `causal & doc(ids)` for three packed documents at 8192 positions (64 x 64 blocks
of 128) and writes the picture (to a temporary folder unless OUT.svg is given). Then reads
the file back and checks that its cells add up to the report's block counts. The same
picture comes from the shell:
`dslc explain "causal & doc(ids)" --seq 8192 --tensor ids=segments:3000,1000,4192 --svg doc.svg`.
"""

from __future__ import annotations

import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

import scoremod

SVG = "{http://www.w3.org/2000/svg}"


def main() -> None:
    ids = np.repeat(np.arange(3, dtype=np.int32), [3000, 1000, 4192])
    result = scoremod.compile("causal & doc(ids)").explain(8192, block=(128, 128), ids=ids)
    print(f"{result.grid_shape} blocks: {result.counts}, density {result.density:.1%}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(tmp) / "doc.svg")
        path.write_text(result.to_svg(), encoding="utf-8")
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")

        # Each class's rects (one per run of equal cells, one cell per block here) add up to its count.
        root = ET.parse(path).getroot()
        area = {g.get("class"): sum(int(r.get("width")) * int(r.get("height")) for r in g.iter(f"{SVG}rect"))
                for g in root.iter(f"{SVG}g") if g.get("class") in ("full", "partial", "empty")}
        assert area == result.counts, (area, result.counts)


if __name__ == "__main__":
    main()
