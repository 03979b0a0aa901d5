"""Command-line start-up and argument-error latency, measured as a user sees it.

Each case runs the real ``causalpatch`` console script in a fresh subprocess; the figure is the
minimum wall time of ``--repeat`` runs (default 5), which filters out noise from other load on
the machine. The load average is printed too, since a busy machine slows every case.

    .venv/bin/python benchmarks/bench_cli.py            # all cases, min of 5
    .venv/bin/python benchmarks/bench_cli.py --repeat 3 --markdown

Cases: ``--help``, ``patch --help``, ``models``; argument errors that need nothing
(empty prompt, component typo, bad --out), and ones that read the model's config and tokenizer
(--layers out of range, a two-token answer, unequal lengths with --by-position, an unknown model
name), for the embedded ``smollm2`` and a tiny local folder; and, for reference, ``import torch``.
Results are in docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("causalpatch")
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def _patch(model: str, *extra: str) -> list[str]:
    return [str(EXE), "patch", "--model", model, "--clean", CLEAN, "--corrupted", CORRUPTED,
            "--correct", " Mary", "--incorrect", " John", "--out",
            str(Path(tempfile.gettempdir()) / "bench-cli-out"), *extra]


def _tiny_folder() -> str:
    """The tests' tiny LLaMA saved as a local Hugging Face folder (built once)."""
    folder = Path(tempfile.gettempdir()) / "causalpatch-bench-tiny-llama"
    if not (folder / "tokenizer.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import tiny_hf_model, tiny_tokenizer

        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
        tiny_hf_model("llama").save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return str(folder)


def cases() -> list[tuple[str, list[str], int]]:
    """``(name, argv, expected exit code)``."""
    tiny = _tiny_folder()
    a_file = Path(tempfile.gettempdir()) / "bench-cli-a-file"
    a_file.write_text("x")
    return [
        ("causalpatch --help", [str(EXE), "--help"], 0),
        ("causalpatch patch --help", [str(EXE), "patch", "--help"], 0),
        ("causalpatch models", [str(EXE), "models"], 0),
        ("error: empty prompt", _patch("smollm2", "--clean", " "), 2),
        ("error: component typo (attn_heads)", _patch("smollm2", "--component", "attn_heads"), 2),
        ("error: --out is a file", _patch("smollm2")[:-2] + ["--out", str(a_file)], 2),
        ("error: --layers 0,99 (smollm2)", _patch("smollm2", "--layers", "0,99"), 2),
        ("error: two-token answer (smollm2)", _patch("smollm2", "--correct", " Eiffel"), 2),
        ("error: unequal lengths --by-position (smollm2)",
         _patch("smollm2", "--corrupted", CORRUPTED + " the"), 2),
        ("error: --layers 0,99 (tiny local folder)", _patch(tiny, "--layers", "0,99"), 2),
        ("error: 'Mary' without space (tiny folder)", _patch(tiny, "--correct", "Mary"), 2),
        ("error: unknown model (smolm2, offline)", _patch("smolm2"), 2),
        ("reference: python -c 'import torch'", [sys.executable, "-c", "import torch"], 0),
    ]


def measure(argv: list[str], expected: int, repeat: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - t0
        if done.returncode != expected:
            raise SystemExit(f"{argv[1:3]}: exit code {done.returncode}, expected {expected}:\n"
                             f"{done.stderr[-2000:]}")
        best = min(best, elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (min is kept)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
          f"{os.cpu_count()} cores; min of {args.repeat} runs")
    rows = []
    for name, argv, expected in cases():
        seconds = measure(argv, expected, args.repeat)
        rows.append((name, seconds))
        print(f"{seconds:7.2f} s  {name}", flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.markdown:
        print("\n| case | seconds (min of %d) |\n|---|---:|" % args.repeat)
        for name, seconds in rows:
            print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
