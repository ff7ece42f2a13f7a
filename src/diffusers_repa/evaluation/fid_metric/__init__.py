"""The `evaluate` metric folder (``evaluate.load(str(FID_METRIC_PATH))``); a package so that wheels ship the script."""
