"""
The worker runtime: the process that runs one job's formulas with Dask.

It never imports twisted or ``measuring.server`` (the import contracts in the test suite check
it): ``job`` runs a job, ``dataset`` reads Parquet, ``output`` describes and writes results,
``main`` is the process.
"""
