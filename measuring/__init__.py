"""Run Dask formulas over Parquet data for clients over TCP; see README.md."""

import os

__version__ = "0.1.0"

#: The folder holding this ``measuring`` package (a checkout, or site-packages): what a
#: subprocess needs on its PYTHONPATH to import this same code.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
