"""KV cache memory and decode speed vs DynamicCache and QuantizedCache(quanto): ``nqkv bench``.

The measurement lives in :mod:`nqkv_core.lab.bench` (the ``nqkv bench`` command); this script takes the
same arguments (``--help``), e.g.

    python benchmarks/bench_cache.py --quick --rounds 3 --budget 1GiB --markdown kv_cache.md
"""

import sys

from nqkv_core.lab.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
