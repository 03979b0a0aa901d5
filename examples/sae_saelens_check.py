"""Cross-check causalpatch's SAE format and maths against SAELens' own code.

1. SAELens' ``SAE.load_from_disk`` loads the folder ``causalpatch sae train`` wrote (the SAE
   shipped in ``tests/data/saes``): same encode and decode as ``causalpatch.sae.load_sae``.
2. ``causalpatch.sae.load_sae`` loads folders written by SAELens' ``save_model`` (standard,
   topk with ``rescale_acts_by_decoder_norm``, jumprelu): same encode and decode.
3. A ``sae_lens.SAE`` object attached directly (``sae_patching(model, sae_lens_sae, ...)``)
   gives the same effects as the causalpatch copy loaded from its folder.

SAELens is not a dependency. With it installed (``pip install sae-lens``) this just imports it;
without, pass ``--saelens DIR``, a folder holding the unpacked ``sae_lens`` wheel (``pip
download --no-deps sae-lens`` and unzip): then only SAELens' SAE modules are imported, with
TransformerLens' ``HookPoint`` stubbed as the identity module it is outside a hooked model.
Checked with SAELens 6.54.12: every difference is exactly 0.

Run: ``python examples/sae_saelens_check.py [--saelens DIR]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tests" / "data" / "saes" / "smollm2-blocks.20.resid_post-topk-2048"


def import_saelens(folder: Path | None) -> types.SimpleNamespace:
    """SAELens' SAE classes: the installed package, or the SAE modules of an unpacked wheel."""
    try:
        if folder is not None:
            raise ImportError
        import sae_lens
        from sae_lens import (SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE,
                              StandardSAEConfig, TopKSAE, TopKSAEConfig)
        from sae_lens.saes.sae import SAEMetadata
        version = sae_lens.__version__
    except ImportError:
        if folder is None:
            raise SystemExit("sae_lens is not installed: pass --saelens DIR (an unpacked wheel)")
        sys.path.insert(0, str(folder))
        if "transformer_lens" not in sys.modules:
            try:
                import transformer_lens.hook_points  # noqa: F401
            except ImportError:
                class HookPoint(torch.nn.Module):
                    def forward(self, x: torch.Tensor) -> torch.Tensor:
                        return x

                class HookedRootModule(torch.nn.Module):
                    def setup(self) -> None:
                        pass

                tl = types.ModuleType("transformer_lens")
                tl.__path__ = []  # type: ignore[attr-defined]
                hp = types.ModuleType("transformer_lens.hook_points")
                hp.HookPoint, hp.HookedRootModule = HookPoint, HookedRootModule  # type: ignore
                ht = types.ModuleType("transformer_lens.HookedTransformer")
                ht.HookedRootModule = HookedRootModule  # type: ignore[attr-defined]
                sys.modules.update({"transformer_lens": tl, "transformer_lens.hook_points": hp,
                                    "transformer_lens.HookedTransformer": ht})
        dist = next(folder.glob("sae_lens-*.dist-info"), None)
        version = dist.name[len("sae_lens-"):-len(".dist-info")] if dist else "unknown"
        package = types.ModuleType("sae_lens")  # without its __init__ (training runners)
        package.__path__ = [str(folder / "sae_lens")]  # type: ignore[attr-defined]
        package.__version__ = version  # type: ignore[attr-defined]
        package.logger = logging.getLogger("sae_lens")  # type: ignore[attr-defined]
        saes = types.ModuleType("sae_lens.saes")
        saes.__path__ = [str(folder / "sae_lens" / "saes")]  # type: ignore[attr-defined]
        sys.modules.update({"sae_lens": package, "sae_lens.saes": saes})
        from sae_lens.registry import register_sae_class
        from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
        from sae_lens.saes.sae import SAE, SAEMetadata
        from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

        for name, cls, cfg in (("standard", StandardSAE, StandardSAEConfig),
                               ("topk", TopKSAE, TopKSAEConfig),
                               ("jumprelu", JumpReLUSAE, JumpReLUSAEConfig)):
            register_sae_class(name, cls, cfg)
    return types.SimpleNamespace(
        SAE=SAE, SAEMetadata=SAEMetadata, version=version,
        kinds=[(StandardSAE, StandardSAEConfig, {}),
               (TopKSAE, TopKSAEConfig, {"k": 8, "rescale_acts_by_decoder_norm": True}),
               (JumpReLUSAE, JumpReLUSAEConfig, {})])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saelens", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sl = import_saelens(args.saelens)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_model

    from causalpatch import sae_patching
    from causalpatch.sae import load_sae

    print(f"SAELens {sl.version}")
    worst = 0.0
    with torch.no_grad():
        theirs, ours = sl.SAE.load_from_disk(str(SHIPPED)), load_sae(SHIPPED)
        x = torch.randn(64, ours.d_in) * 20 + ours.b_dec
        d_enc = float((theirs.encode(x) - ours.encode(x)).abs().max())
        d_dec = float((theirs.decode(theirs.encode(x)) - ours.decode(ours.encode(x))).abs().max())
    print(f"1. SAELens loads {SHIPPED.name} as {type(theirs).__name__} at "
          f"{theirs.cfg.metadata.hook_name}: |encode diff| {d_enc:.1e}, |decode diff| {d_dec:.1e}")
    worst = max(worst, d_enc, d_dec)
    model = tiny_model("llama")
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Mary and John went to the store, Mary gave a drink to"
    with tempfile.TemporaryDirectory() as tmp:
        for cls, cfg_cls, extra in sl.kinds:
            cfg = cfg_cls(d_in=64, d_sae=96, metadata=sl.SAEMetadata(
                hook_name="blocks.1.hook_resid_post", model_name="LlamaForCausalLM"), **extra)
            sae = cls(cfg)
            with torch.no_grad():
                for p in sae.parameters():
                    p.copy_(torch.randn_like(p) * 0.2)
                if hasattr(sae, "threshold"):
                    sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.3)
            folder = Path(tmp) / cfg.architecture()
            sae.save_model(folder)
            mine = load_sae(folder)
            with torch.no_grad():
                x = torch.randn(16, 64)
                d_enc = float((mine.encode(x) - sae.encode(x)).abs().max())
                d_dec = float((mine.decode(sae.encode(x)) - sae.decode(sae.encode(x))).abs().max())
            r1 = sae_patching(model, sae, clean, corrupted, correct=" Mary", incorrect=" John")
            r2 = sae_patching(model, mine, clean, corrupted, correct=" Mary", incorrect=" John")
            d_eff = float((r1.effect_matrix - r2.effect_matrix).abs().max())
            print(f"2./3. {cfg.architecture()}: load_sae(save_model folder) |encode diff| "
                  f"{d_enc:.1e}, |decode diff| {d_dec:.1e}; sae_patching with the sae_lens object "
                  f"vs the loaded copy |effect diff| {d_eff:.1e}")
            worst = max(worst, d_enc, d_dec, d_eff)
    print("all equal" if worst == 0 else f"largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
