"""The screenshot of the HTML report in ``docs/reports.md``: headless Chromium, with its JSON.

Renders one report (:func:`causalpatch.write_report`) from the result JSON files that
``examples/ioi_smollm2.py`` writes to its ``--out`` folder (residual stream by position, heads
denoising, heads noising on 32 IOI pairs of SmolLM2-135M-Instruct), opens it in headless
Chromium (the flags ``tests/results/test_report.py`` uses), and writes the screenshot with a
JSON beside it (``scripts/provenance.py``: command, commit, the inputs' SHA-256, the Chromium
version, the window)::

    python examples/ioi_smollm2.py --out out/ioi_example      # the results (about 2 minutes)
    python scripts/report_screenshot.py --results out/ioi_example \\
        --out docs/img/report.png                                 # a few seconds

Needs Debian's ``chromium`` (``apt-get install chromium``; ``make test`` installs it).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REPO_ROOT, write_figure_json

#: The results ``examples/ioi_smollm2.py`` saves, in report order.
RESULTS = ("resid_post.json", "heads.json", "heads_noise.json")
TITLE = "IOI on SmolLM2-135M-Instruct"
WINDOW = (1400, 2000)
#: The seed of the rendered results' IOI pairs (``IOIDataset(seed=0)`` in the example).
DATA_SEED = 0


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        sys.exit("headless Chromium is needed: `apt-get update && apt-get install -y chromium`")
    return found


def screenshot(page: Path, shot: Path, profile: Path) -> None:
    """Render ``page`` in headless Chromium at :data:`WINDOW` and save a PNG to ``shot``."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--hide-scrollbars",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}"]
    proc = subprocess.run([chromium_binary(), *flags, page.as_uri()], capture_output=True,
                          text=True, timeout=180, check=False)
    if proc.returncode != 0 or not shot.exists() or shot.stat().st_size < 50_000:
        sys.exit(f"Chromium did not write a screenshot:\n{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "out" / "ioi_example",
                        help="the --out folder of examples/ioi_smollm2.py")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "img" / "report.png")
    args = parser.parse_args()
    started = time.time()
    inputs = [args.results / name for name in RESULTS]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `python examples/ioi_smollm2.py --out "
                 f"{args.results}` first")
    from causalpatch import PatchingResult, write_report

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        write_report(inputs, page, title=TITLE)
        shot = Path(tmp) / "report.png"
        screenshot(page, shot, Path(tmp) / "chromium-profile")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(shot.read_bytes())
    version = subprocess.run([chromium_binary(), "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    rendered = [{"file": name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                 "component": result.component, "n_pairs": result.n_pairs,
                 "direction": result.direction}
                for name, p, result in zip(RESULTS, inputs,
                                           map(PatchingResult.from_json, inputs))]
    write_figure_json(
        args.out, seed=DATA_SEED,
        settings={"report": f"write_report({list(RESULTS)}, title={TITLE!r})",
                  "results_made_by": f"python examples/ioi_smollm2.py --out {args.results}",
                  "chromium": version, "window": list(WINDOW), "plotly": "inline"},
        data={"rendered": rendered}, started=started)
    print(f"wrote {args.out} and its JSON")


if __name__ == "__main__":
    main()
