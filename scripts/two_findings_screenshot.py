"""Render docs/img/two_findings.png: two findings of one QaTa-COV19 validation X-ray, drawn by the model into
two labels of the MRIS layer through the real widget (one finding per line of the prompt box).

    xvfb-run -a python scripts/two_findings_screenshot.py --out docs/img/two_findings.png [--model DIR]

Re-render it when the default model changes: the figure shows what that model draws.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT.parent / "shared/data/QaTa-COV19/Val_Folder/img/sub-S11250_ses-E24293_run-1_bp-chest_dx.png"
FINDINGS = [
    "Unilateral pulmonary infection, one infected area, all right lung.",
    "Unilateral pulmonary infection, one infected area, all left lung.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/img/two_findings.png")
    args = parser.parse_args()

    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from napari_mris._widget import MRISWidget
    from napari_mris.cli import fit_after_docking

    viewer = napari.Viewer(title="napari-mris: two findings")
    viewer.window._qt_window.resize(1100, 640)
    viewer.open(str(args.image), plugin="napari-mris")
    widget = MRISWidget(viewer, model=args.model)
    viewer.window.add_dock_widget(widget, name="MRIS", area="right")
    widget.set_prompt("\n".join(FINDINGS))
    widget.segment()
    deadline = time.monotonic() + 300
    while widget.is_running and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    fit_after_docking(viewer, widget)
    labels = viewer.layers["MRIS"]
    labels.opacity = 0.55
    print({int(k): int((labels.data == k).sum()) for k in (1, 2)}, widget.status_label.text())
    for _ in range(20):  # let the canvas draw the last state
        QApplication.processEvents()
        time.sleep(0.02)
    shot = Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)[..., :3])
    shot.thumbnail((900, 900))
    shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)  # a small PNG
    viewer.close()


if __name__ == "__main__":
    main()
