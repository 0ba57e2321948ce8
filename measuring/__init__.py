"""Run Dask formulas over Parquet data for clients over TCP; see README.md."""

__version__ = "0.1.0"
