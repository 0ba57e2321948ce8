from twisted.application.service import ServiceMaker

measuring = ServiceMaker("measuring", "measuring.server.tap", "Run Dask formulas over Parquet data for TCP clients.", "measuring")  # fmt: skip
