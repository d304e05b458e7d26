"""Fetch the weights of model-zoo entries (or Hub repositories) into the Hugging Face cache.

For each NAME (a `weights_manifest.yaml` entry such as flux1-dev, or a Hub id 'owner/repo') it first
prints every file that will be fetched with its size and the total, then downloads only the manifest's
components and verifies the sha256 digests the manifest lists. Afterwards the models load offline
(HF_HUB_OFFLINE=1).

    python scripts/download_weights.py flux1-dev wan2.1-t2v-1.3b --token hf_...
    python scripts/download_weights.py --dry-run --components transformer qwen-image
"""

from __future__ import annotations

import argparse
import sys

from teacache_models.weights import load_manifest, plan_download, resolve_weights
from teacache_models.weights.download import describe
from teacache_models.weights.errors import WeightsUnavailableError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", metavar="NAME", help="manifest entry or Hub repository id")
    parser.add_argument("--cache-dir", help="Hugging Face cache folder (default: huggingface_hub's)")
    parser.add_argument("--token", help="Hub token, needed for gated repositories (default: HF_TOKEN or login)")
    parser.add_argument("--revision", help="branch, tag or commit (default: the manifest's)")
    parser.add_argument("--components", nargs="+", help="only these subfolders, e.g. transformer")
    parser.add_argument("--manifest", help="another weights manifest file")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    args = parser.parse_args(argv)
    known = load_manifest(args.manifest)
    status = 0
    for name in args.names:
        options = dict(cache_dir=args.cache_dir, token=args.token, revision=args.revision, manifest=args.manifest)
        try:
            if name in known and known[name].approx_download_gb is not None:
                print(f"{name}: about {known[name].approx_download_gb:g} GB in all (manifest estimate)")
            plan = plan_download(name, components=args.components, **options)
            print("\n".join(describe(plan)), flush=True)
            if not args.dry_run:
                folder = resolve_weights(name, components=args.components, **options)
                print(f"{name}: ready in {folder}", flush=True)
        except (ValueError, WeightsUnavailableError) as error:
            print(f"error: {error}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
