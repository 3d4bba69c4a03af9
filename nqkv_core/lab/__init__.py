"""The lab: evaluation, reports, benchmarks, normality analysis, model/corpus loading and the CLI.

Built on the library (``nqkv_core``); the library never imports from here.
"""
